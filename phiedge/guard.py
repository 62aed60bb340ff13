"""Start a child tool so that it dies with the build: `python -m phiedge.guard PARENT_PID PROGRAM ARGS...`.

Sets PR_SET_PDEATHSIG (SIGKILL when the build that started it dies, kill -9 included), refuses to start if that
build is already gone, then execs PROGRAM (the setting survives exec). Converters, exporters and runtime checks
all run through it (phiedge.memory.guarded), so no child keeps writing into a stage the build abandoned.
Linux only; elsewhere it execs PROGRAM unchanged.
"""
from __future__ import annotations

import os
import sys


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGKILL when `parent` dies; exit at once if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(137)


def main() -> None:
    die_with_parent(int(sys.argv[1]))
    os.execv(sys.argv[2], sys.argv[2:])


if __name__ == "__main__":
    main()
