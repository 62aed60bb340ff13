"""Runtimes, one module per format, found through a registry. The contract every runtime keeps, and the code
they share (the generation loop and its sampler, streaming, the length check, stop ids), is phiedge.runtimes.base.

Device-path code: runtime modules import their runtime package lazily, never torch or transformers.
"""
from .base import (REGISTRY, Generation, Runtime, RuntimeSettings, Sampling, TokenStream, get,  # noqa: F401
                   register)

from . import gguf  # noqa: E402,F401  (registers itself)
from . import onnx  # noqa: E402,F401  (registers itself)
from . import openvino  # noqa: E402,F401  (registers itself)
from . import mlx  # noqa: E402,F401  (registers itself)
