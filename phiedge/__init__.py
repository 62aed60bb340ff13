"""phiedge: merge a LoRA into Phi-4-mini, export edge artifacts, prove each one against the source model."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("phiedge")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0+unknown"
