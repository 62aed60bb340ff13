"""Stages as data, run by an executor.

A build is a list of `Stage`s: each has a name (its checklist line), the stages whose outputs it needs, what
it costs (estimated peak memory, CPUs) and the function that runs it. A cached stage also has a cache name, a
key (from the build's inputs and the outputs it needs) and the modules whose code it runs: its cache folder
is named by the key and by the fingerprint of that code only (phiedge.cache.code_fingerprint).

An executor runs a stage list in dependency order behind one interface, `run(stages, ctx, clock)`.
`SequentialExecutor` runs one stage at a time in this process. `ParallelExecutor` runs up to `jobs` stages at
once, each in a thread of this process (every heavy stage works in child processes of its own), starting a stage
only when its needs are done and its estimated peak memory fits beside the running stages' in the budget (a
stage that does not fit waits; one alone always starts: the build refuses up front a stage over the budget).
`phiedge.cluster.RayExecutor` runs the cached stages as Ray tasks behind the same interface.
"""
from __future__ import annotations

import errno
import logging
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .cache import StageCache
from .errors import DiskSpaceError
from .memory import TreeSampler

log = logging.getLogger("phiedge")


@dataclass
class Context:
    """What stages read: the request, the resolved inputs, the cache, and every finished stage's output."""
    req: Any
    cache: StageCache
    inputs: dict = field(default_factory=dict)      # model, adapter, config, ...
    outputs: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, stage: str) -> Any:
        return self.outputs[stage]


@dataclass(frozen=True)
class Hit:
    """An uncached stage's output with whether its work was already done (the input hashing's memo)."""
    value: Any
    hit: bool


@dataclass(frozen=True)
class Stage:
    name: str                                        # the checklist line, e.g. "export gguf Q4_K_M"
    run: Callable[[Context], Any] | None = None      # uncached: its output
    needs: tuple[str, ...] = ()
    peak_bytes: int | None = None                    # estimated peak memory, when it is known to be large
    cpus: int = 1
    disk_bytes: int | None = None                    # what it writes (the disk-full message)
    where: Path | None = None                        # where it writes (default: the stage cache)
    # A cached stage: its folder is cache_name-<key of key(ctx) and the code of `modules`>, made by make(ctx, dir),
    # read back by result(ctx, dir).
    cache_name: str | None = None
    key: Callable[[Context], dict] | None = None
    make: Callable[[Context, Path], None] | None = None
    result: Callable[[Context, Path], Any] | None = None
    modules: tuple[str, ...] = ()

    def execute(self, ctx: Context) -> tuple[Any, bool]:
        """(output, whether it came from the cache)."""
        if self.cache_name is None:
            out = self.run(ctx)
            return (out.value, out.hit) if isinstance(out, Hit) else (out, False)
        folder, hit = ctx.cache.stage(self.cache_name, self.key(ctx), lambda d: self.make(ctx, d),
                                      modules=self.modules)
        return (self.result(ctx, folder) if self.result else folder), hit


def ordered(stages: list[Stage]) -> list[Stage]:
    """Dependency order (stable: a stage comes as early as its needs allow, in list order otherwise)."""
    done: set[str] = set()
    out: list[Stage] = []
    pending = list(stages)
    names = {s.name for s in stages}
    while pending:
        ready = next((s for s in pending if all(n in done or n not in names for n in s.needs)), None)
        if ready is None:
            raise RuntimeError(f"stage graph has a cycle among {[s.name for s in pending]}")
        pending.remove(ready)
        out.append(ready)
        done.add(ready.name)
    return out


class Clock:
    """Times each stage, measures the peak memory of the whole process tree, and prints the checklist line:
    what it produced, how long it took, or that it was cached. On a terminal, a progress bar over the build's
    stages shows the running stage and its clock. Stages run side by side (ParallelExecutor) share the tree:
    each one's peak is the tree's while it ran."""

    def __init__(self, bar: bool = True, label: str = ""):
        self.label = label              # whose checklist (phiedge matrix: the cell), shown on each line
        self.timings: dict[str, float] = {}
        self.peaks_mb: dict[str, float] = {}
        self.bar = None
        if bar and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=1, unit="stage", leave=False, dynamic_ncols=True,
                            bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} stages [{elapsed}]")

    def expect(self, total: int) -> None:
        """The number of stages, once the graph is laid out."""
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def run(self, stage: Stage, fn: Callable[[], tuple[Any, bool]], where: Path | None) -> Any:
        """`fn()` -> (output, cached), timed and measured. A full disk (ENOSPC here or in a tool) becomes one
        DiskSpaceError naming the stage, the folder it wrote and the space it needs."""
        ticker = self._tick(stage.name)
        t0 = time.perf_counter()
        try:
            with TreeSampler() as mem:
                out, cached = fn()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise disk_full(stage.name, Path(e.filename) if e.filename else where, stage.disk_bytes,
                            str(e.strerror)) from None
        except DiskSpaceError as e:
            raise disk_full(stage.name, where, stage.disk_bytes, str(e)) from None
        finally:
            ticker.set()
        self.record(stage.name, time.perf_counter() - t0, mem.peak_mb, cached, out)
        return out

    def record(self, name: str, seconds: float, peak_mb: float, cached: bool, out: Any = None) -> None:
        """A finished stage's checklist line, time and peak (run here, or elsewhere: phiedge.cluster's tasks)."""
        self.timings[name] = round(seconds, 2)
        self.peaks_mb[name] = peak_mb
        what = f"  {_size(out)}" if isinstance(out, Path) else ""
        line = (f"✓ {name:<24} {self.timings[name]:7.1f} s  peak {peak_mb / 1024:5.2f} GB"
                f"{'  (cached)' if cached else ''}{what}{f'  [{self.label}]' if self.label else ''}")
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
            self.bar.update(1)
        else:
            log.info(line)

    def _tick(self, name: str) -> threading.Event:
        """Refresh the bar every half second while a stage runs, so a long export visibly advances."""
        done = threading.Event()
        if self.bar is None:
            return done
        self.bar.set_description_str(name)

        def loop():
            while not done.wait(0.5):
                self.bar.refresh()
        threading.Thread(target=loop, daemon=True).start()
        return done


class SequentialExecutor:
    """One stage at a time, in dependency order, in this process (stages start their own children)."""

    def run(self, stages: list[Stage], ctx: Context, clock: Clock) -> dict[str, Any]:
        for stage in ordered(stages):
            ctx.outputs[stage.name] = clock.run(stage, lambda s=stage: s.execute(ctx), stage.where or ctx.cache.root)
        return ctx.outputs


class ParallelExecutor:
    """Ready stages side by side while their memory estimates fit in `budget` bytes and fewer than `jobs` run;
    stages start in dependency order, the earliest-listed ready stage first. A failed stage lets the running
    ones finish, starts no more, and raises."""

    def __init__(self, jobs: int, budget: int):
        self.jobs, self.budget = max(1, jobs), budget

    def run(self, stages: list[Stage], ctx: Context, clock: Clock) -> dict[str, Any]:
        import concurrent.futures as cf
        if self.jobs == 1:
            return SequentialExecutor().run(stages, ctx, clock)
        names = {s.name for s in stages}
        pending, running, done = list(ordered(stages)), {}, set()
        failure: BaseException | None = None
        with cf.ThreadPoolExecutor(self.jobs) as pool:
            while (pending and failure is None) or running:
                started = self._startable(pending, running, done, names) if failure is None else []
                if not started and not running:
                    raise RuntimeError(f"no stage can start: {[s.name for s in pending]} wait for stages not run")
                for stage in started:
                    pending.remove(stage)
                    running[pool.submit(clock.run, stage, lambda s=stage: s.execute(ctx),
                                        stage.where or ctx.cache.root)] = stage
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for f in finished:
                    stage = running.pop(f)
                    try:
                        ctx.outputs[stage.name] = f.result()
                        done.add(stage.name)
                    except BaseException as e:          # noqa: BLE001 (re-raised below, once the others end)
                        failure = failure or e
        if failure is not None:
            raise failure
        return ctx.outputs

    def _startable(self, pending: list[Stage], running: dict, done: set[str], names: set[str]) -> list[Stage]:
        out, used = [], sum(s.peak_bytes or 0 for s in running.values())
        for stage in pending:
            if len(running) + len(out) >= self.jobs:
                break
            if not all(n in done or n not in names for n in stage.needs):
                continue
            need = stage.peak_bytes or 0
            if (running or out) and used + need > self.budget:
                continue
            out.append(stage)
            used += need
        return out


def disk_full(stage: str, where: Path | None, need: int | None, detail: str) -> DiskSpaceError:
    probe = Path(where) if where else Path.cwd()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    needs = f"it needs about {_mb(need)}, " if need else ""
    return DiskSpaceError(f"the {stage} stage ran out of disk space in {probe} ({detail}; {needs}{_mb(free)} free): "
                          f"free space there or choose another --cache-dir/--out, then run the build again "
                          f"(it resumes; nothing partial was kept)")


def _mb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _size(path: Path) -> str:
    n = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
