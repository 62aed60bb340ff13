"""Peak resident memory of a whole process tree, sampled: a build's stages run exporters and runtimes in
child processes, so the parent's own RSS says little about what a machine must hold.

    with TreeSampler() as s:          # this process and every descendant
        work()
    s.peak_mb

Each process counts its proportional share of the pages it has resident (PSS on Linux), so pages a forked
child shares with its parent count once. Sampling (every 0.2 s by default) can miss a spike shorter than the
interval; the exporters' own child processes are also measured exactly by `ru_maxrss` (exporters.run_tool),
and the report shows both.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import psutil


def available_bytes() -> int:
    """Memory a new process can get now: MemAvailable plus free swap, capped by a cgroup v2 limit."""
    avail = psutil.virtual_memory().available + psutil.swap_memory().free
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return avail


def tree_resident(pid: int) -> int:
    """Bytes resident in `pid` and all its descendants right now (processes that vanish count as 0).

    Each process counts its proportional set size where the OS reports one (Linux): a page shared by several
    processes of the tree counts once in the sum. Plain RSS counts it once per process, and a forked child
    shares all its parent's pages: at full size the OpenVINO export's tree summed to 31 GB of RSS on a
    25 GB machine (its own high-water mark: 23.1 GB)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += _resident(p)
        except psutil.Error:
            pass
    return total


def _resident(p: psutil.Process) -> int:
    try:
        pss = getattr(p.memory_full_info(), "pss", None)     # Linux: /proc/PID/smaps_rollup
    except psutil.AccessDenied:
        pss = None
    return pss if pss is not None else p.memory_info().rss


class TreeSampler:
    def __init__(self, pid: int | None = None, interval: float = 0.2):
        self.pid, self.interval = pid or os.getpid(), interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, tree_resident(self.pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "TreeSampler":
        self.peak = tree_resident(self.pid)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, tree_resident(self.pid))

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


def isolated(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a fresh process, its result or its exception here.

    For the stages that load the whole model in PyTorch (merge, reference, smoke reference): a model freed in
    a long-lived process mostly stays in its RSS (allocator fragmentation), and the next stage's model or
    exporter child then comes on top of it. Measured on the 3.8B benchmark model before this: the smoke
    reference left 12.5 GB resident in the build process while the exporters ran (the ONNX builder alone needs
    ~23.6 GB). A child gives everything back when it exits; what one child holds at its peak is its own
    business (merge.merge merges in place for that reason). It dies with the build (Linux), so a killed build
    leaves no orphan writing into the stage cache.

    Children fork from multiprocessing's fork server, which imports torch, transformers and peft once per build
    (phiedge._preload, ~8.5 s of CPU on a 2-core machine) and holds no model: each stage starts with them
    loaded instead of importing them again, and still gets a process of its own."""
    import concurrent.futures
    import multiprocessing

    from .cache import writer_paths
    level = logging.getLogger().getEffectiveLevel()
    forkserver = "forkserver" in multiprocessing.get_all_start_methods()      # not on Windows: spawned there
    ctx = multiprocessing.get_context("forkserver" if forkserver else "spawn")
    if forkserver:
        ctx.set_forkserver_preload(["phiedge._preload"])
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx, initializer=_child_init,
                                                initargs=(level, os.getpid(), writer_paths())) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def guarded(cmd: list[str]) -> list[str]:
    """`cmd` started through phiedge.guard: it dies with this process (kill -9 included)."""
    return [sys.executable, "-m", "phiedge.guard", str(os.getpid()), *cmd]


def _child_init(level: int, build: int, writer_locks: tuple[str, ...]) -> None:
    from .cache import hold_writer_locks
    from .guard import die_with_parent
    from .logs import configure
    die_with_parent(os.getppid())         # the fork server
    _exit_with(build)
    hold_writer_locks(writer_locks)       # the stage folder this child writes is not swept while it lives
    configure(verbose=level <= logging.DEBUG)


def _exit_with(build: int) -> None:
    """Exit (137, as a SIGKILL would) as soon as `build` has: a fork-server child's parent is the server, which
    lives while any child it forked does, so the parent-death signal alone would leave the child running."""
    import select
    try:
        fd = os.pidfd_open(build)         # Linux 5.3+: readable once the build has exited (zombie or reaped)
    except (AttributeError, OSError):
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            try:
                while psutil.Process(build).status() != psutil.STATUS_ZOMBIE:
                    threading.Event().wait(0.5)
            except psutil.Error:          # gone
                pass
        os._exit(137)
    threading.Thread(target=watch, name="exit-with-build", daemon=True).start()

