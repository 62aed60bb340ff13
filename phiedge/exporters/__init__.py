"""Exporters, one module per format, found by name through a registry.

An exporter turns the merged Hugging Face checkpoint into one artifact folder per precision. Adding a
format means adding one module that defines a subclass with `@register`, and importing it below.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..errors import DiskSpaceError, ToolchainError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Artifact:
    format: str
    precision: str
    path: Path                      # the artifact folder
    files: tuple[str, ...] = ()     # relative names inside it
    meta: dict = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files)


class Exporter:
    """Base class: per-format facts are class constants, the work is `export`."""
    name: ClassVar[str]
    PRECISIONS: ClassVar[tuple[str, ...]]
    DEFAULT_PRECISION: ClassVar[str]
    USES_CALIBRATION: ClassVar[bool] = False    # export takes calibration text (the build's --docs)
    # Bytes per parameter of the output, per precision, for the up-front disk check.
    BYTES_PER_PARAM: ClassVar[dict[str, float]] = {}
    PEAK_WHY: ClassVar[str] = ""        # why `peak_bytes` is that large, for the memory check's message

    def check_precisions(self, precisions: list[str]) -> list[str]:
        out = []
        for p in precisions:
            canon = next((k for k in self.PRECISIONS if k.lower() == p.lower()), None)
            if canon is None:
                raise UsageError(f"{self.name} has no precision '{p}': known are {', '.join(self.PRECISIONS)}")
            out.append(canon)
        return out

    def estimate_bytes(self, n_params: int, precisions: list[str]) -> int:
        return int(sum(self.BYTES_PER_PARAM.get(p, 2.0) for p in precisions) * n_params)

    def peak_bytes(self, n_params: int, precision: str) -> int | None:
        """Memory the export needs at its peak, where it is measured to be the tool's own and large (the
        build refuses up front what cannot fit); None: small next to the build's other stages."""
        return None

    def export(self, merged_dir: Path, out_dir: Path, precisions: list[str], settings: dict) -> list[Artifact]:
        raise NotImplementedError


# What a tool prints when its disk filled up (errno 28 in C, Python, and the converters' own wording).
DISK_FULL = ("No space left on device", "ENOSPC", "[Errno 28]")


def run_tool(cmd: list[str], what: str) -> dict:
    """Run a tool to completion; its wall time and peak memory, or a ToolchainError with its last line (a
    DiskSpaceError when the tool ran out of disk). The tool dies with the build and shares the writer locks of
    the stage it writes into (phiedge.cache), so no sweep removes its output while it lives."""
    from ..cache import writer_fds
    from ..memory import guarded
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(guarded(cmd), stdout=out, stderr=subprocess.STDOUT, text=True, pass_fds=writer_fds())
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            out.seek(0)
            text = out.read()
            if os.environ.get("PHIEDGE_DEBUG"):
                sys.stderr.write(text)
            tail = [ln for ln in text.strip().splitlines() if ln.strip()]
            why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            if proc.returncode == -9:
                why += ", most likely the kernel's out-of-memory killer: see dmesg"
            full = next((ln.strip() for ln in reversed(tail) if any(m in ln for m in DISK_FULL)), None)
            if full:
                raise DiskSpaceError(f"{what} ran out of disk space ({full})")
            raise ToolchainError(f"{what} failed ({why}): {tail[-1].strip() if tail else 'no output'}; "
                                 f"rerun with PHIEDGE_DEBUG=1 for its full log")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}   # ru_maxrss: KiB


REGISTRY: dict[str, type[Exporter]] = {}


def register(cls: type[Exporter]) -> type[Exporter]:
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> Exporter:
    if name not in REGISTRY:
        raise UsageError(f"unknown format '{name}': known formats are {', '.join(sorted(REGISTRY))}; "
                         f"pass one of them to --formats")
    return REGISTRY[name]()


from . import gguf  # noqa: E402,F401  (registers itself)
from . import onnx  # noqa: E402,F401  (registers itself)
from . import openvino  # noqa: E402,F401  (registers itself)
from . import mlx  # noqa: E402,F401  (registers itself)
