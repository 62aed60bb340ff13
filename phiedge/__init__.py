"""phiedge: merge a LoRA into Phi-4-mini, export edge artifacts, prove each one against the source model."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("phiedge")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0+unknown"


def open(bundle, *, runtime=None, adapter=None, key=None, threads=None):  # noqa: A001
    """The device side as a library: `with phiedge.open("bundle/") as s: s.chat(messages)` (phiedge.session)."""
    from .session import open as _open
    return _open(bundle, runtime=runtime, adapter=adapter, key=key, threads=threads)
