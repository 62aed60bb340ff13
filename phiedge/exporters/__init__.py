"""Exporters, one module per format, found by name through a registry.

An exporter turns the merged Hugging Face checkpoint into one artifact folder per precision. Adding a
format means adding one module that defines a subclass of `base.Exporter` with `@register` (its precision
grammar, CLI flag and preflight are class constants), and importing it below.
"""
from .base import REGISTRY, Artifact, CliModifier, Exporter, get, register, run_tool  # noqa: F401

from . import gguf  # noqa: E402,F401  (registers itself)
from . import onnx  # noqa: E402,F401  (registers itself)
from . import openvino  # noqa: E402,F401  (registers itself)
from . import mlx  # noqa: E402,F401  (registers itself)
