"""Ray behind the executor interface: the build's own stages (phiedge.stages), each cached stage a Ray task.

`RayExecutor.run(stages, ctx, clock)` is the interface every executor has; `run_cells` runs several builds' stage
graphs at once (phiedge.matrix: one per (adapter, target)) and runs each distinct stage once. A stage's identity
is its cache folder (phiedge.cache.StageCache.identity: its cache name, its key, the code it runs), computed on
the driver when the stage's needs are done, so two builds that need the same export of the same merged model
share one task, and a stage already in the cache is read, never sent.

- Cached stages (merge, retriever, smoke reference, exports, checks) run as Ray tasks, each declaring its
  estimated peak memory (`memory`) and CPUs, so Ray places them only where they fit. The task runs the stage's
  own `make` into the shared stage cache (phiedge.cache: its per-stage lock keeps two nodes from building one
  stage); artifacts move through that storage, never through Ray's object store: a task returns its folder.
- Stages without a cache folder (input hashing, precision "auto"'s choice, the bundle) run on the driver.
- A task whose worker or node dies is retried by Ray (`max_retries`); a stage that fails fails only the builds
  that need it, and the others complete.

Without an address Ray starts a local cluster in this process, bound to 127.0.0.1.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import MemoryShortError, ToolchainError
from .stages import Clock, Context, Stage, ordered

log = logging.getLogger("phiedge")
INSTALL = "pip install 'phiedge[cluster]'"
RETRIES = 3            # Ray retries a task whose worker or node died this many times


def ray_module():
    try:
        import ray
    except ImportError:
        raise ToolchainError(f"phiedge matrix runs on Ray, which is not installed: {INSTALL}") from None
    return ray


def connect(address: str | None) -> dict:
    """Join the cluster at `address` (`auto`, `ray://HOST:10001`), or start a local one in this process on
    127.0.0.1; returns its alive nodes' {"memory", "cpus"} (bytes, count)."""
    ray = ray_module()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            # Ray binds the machine's network address by default; a cluster of this one machine needs loopback only.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
    return nodes()


def nodes() -> list[dict]:
    ray = ray_module()
    return [{"node": n["NodeID"][:12], "memory": int(n["Resources"].get("memory", 0)),
             "cpus": int(n["Resources"].get("CPU", 0))} for n in ray.nodes() if n.get("Alive")]


def largest_node(found: list[dict]) -> dict:
    return max(found, key=lambda n: n["memory"]) if found else {"memory": 0, "cpus": 0}


def shutdown() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


def _task(root: str, verify: str, name: str, parts: dict, modules: tuple, make: Callable, ctx: Context) -> dict:
    """One cached stage in a Ray worker: the stage cache's own `stage()` (lock, partial folder, rename) around the
    stage's `make`, with this node's view of the cache. Returns where it is, whether it was there, and its cost."""
    from .cache import StageCache
    from .memory import TreeSampler
    cache = StageCache(Path(root), verify=verify)
    ctx.cache = cache
    t0 = time.perf_counter()
    with TreeSampler() as mem:
        folder, hit = cache.stage(name, parts, lambda d: make(ctx, d), modules=modules)
    return {"folder": str(folder), "hit": hit, "seconds": round(time.perf_counter() - t0, 2),
            "peak_mb": mem.peak_mb, "pid": os.getpid(), "rebuilt": list(cache.rebuilt)}


@dataclass
class Cell:
    """One build's stage graph and context (a matrix cell), with its progress."""
    ctx: Context
    stages: list[Stage]
    clock: Clock
    label: str = ""
    done: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)      # stage -> why (its own error, or a need's)
    waiting: set[str] = field(default_factory=set)             # stages handed to a task (their own or shared)
    pending: list[Stage] = field(default_factory=list)
    errors: dict[str, BaseException] = field(default_factory=dict)   # a stage's own exception, to re-raise

    @property
    def error(self) -> str | None:
        return next(iter(self.failed.values()), None)


@dataclass
class Task:
    sid: str
    stage: str
    ref: Any
    memory: int
    cpus: int
    waiters: list[tuple[Cell, Stage]] = field(default_factory=list)


class RayExecutor:
    """Cached stages as Ray tasks (at most `max_parallel` at once; default: what Ray can place), the rest on the
    driver; one task per distinct stage across every build it runs."""

    def __init__(self, max_parallel: int | None = None, on_change: Callable[[list[dict]], None] | None = None):
        self.max_parallel = max_parallel
        self.on_change = on_change
        self.tasks: dict[str, dict] = {}        # sid -> its record: stage, cells, state, seconds, peak, node...

    def run(self, stages: list[Stage], ctx: Context, clock: Clock) -> dict[str, Any]:
        cell = Cell(ctx, stages, clock)
        self.run_cells([cell])
        if cell.errors:
            raise next(iter(cell.errors.values()))
        if cell.failed:
            raise RuntimeError(cell.error)
        return ctx.outputs

    def run_cells(self, cells: list[Cell]) -> None:
        """Every cell's stages, in dependency order, sharing tasks by stage identity. A failing stage fails the
        cells that need it (recorded in `cell.failed`); the others go on."""
        ray = ray_module()
        remote = ray.remote(_task)
        running: dict[str, Task] = {}
        self._node_cpus = max((n["cpus"] for n in nodes()), default=1)
        for c in cells:
            c.pending = list(ordered(c.stages))
        while True:
            progressed = self._advance(cells, running, remote)
            if not running:
                if progressed:
                    continue
                break
            ready, _ = ray.wait([t.ref for t in running.values()], num_returns=1, timeout=1.0)
            for ref in ready:
                task = next(t for t in running.values() if t.ref == ref)
                del running[task.sid]
                self._finish(task, ray)
            self._changed()

    # ---------------------------------------------------------------------------------------------- internals

    def _advance(self, cells: list[Cell], running: dict[str, Task], remote) -> bool:
        """Start or settle every stage whose needs are done; whether anything moved."""
        moved = False
        for c in cells:
            names = {s.name for s in c.stages}
            for stage in list(c.pending):
                if stage.name in c.waiting:
                    continue
                bad = next((n for n in stage.needs if n in c.failed), None)
                if bad:
                    c.pending.remove(stage)
                    c.failed[stage.name] = c.failed[bad]
                    moved = True
                    continue
                if not all(n in c.done or n not in names for n in stage.needs):
                    continue
                moved = True
                if stage.cache_name is None:
                    c.pending.remove(stage)
                    self._local(c, stage)
                    continue
                try:
                    parts = stage.key(c.ctx)
                    sid = c.ctx.cache.identity(stage.cache_name, parts, stage.modules)
                except Exception as e:          # noqa: BLE001 (a key that cannot be computed fails its cell)
                    c.pending.remove(stage)
                    c.failed[stage.name], c.errors[stage.name] = f"{stage.name}: {e}", e
                    continue
                if c.ctx.cache.intact(sid):
                    c.pending.remove(stage)
                    self.tasks.setdefault(sid, {"stage": stage.name, "state": "cached", "cells": []})
                    self.tasks[sid]["cells"].append(c.label)
                    self._settle(c, stage, c.ctx.cache.root / sid, True, 0.0, None)
                    continue
                if sid not in running and self.max_parallel and len(running) >= self.max_parallel:
                    continue
                c.pending.remove(stage)
                c.waiting.add(stage.name)
                if sid not in running:
                    running[sid] = self._submit(c, stage, parts, sid, remote)
                running[sid].waiters.append((c, stage))
                self.tasks[sid]["cells"].append(c.label)
        return moved

    def _submit(self, c: Cell, stage: Stage, parts: dict, sid: str, remote) -> Task:
        memory = int(stage.peak_bytes or 0)
        cpus = max(1, min(int(c.ctx.req.threads), self._node_cpus))
        slim = Context(req=c.ctx.req, cache=None, inputs={k: v for k, v in c.ctx.inputs.items() if k != "clock"},
                       outputs={n: c.ctx.outputs[n] for n in stage.needs if n in c.ctx.outputs})
        opts = {"num_cpus": cpus, "max_retries": RETRIES, "retry_exceptions": False}
        if memory:
            opts["memory"] = memory
        ref = remote.options(**opts).remote(str(c.ctx.cache.root), c.ctx.cache.verify, stage.cache_name, parts,
                                            tuple(stage.modules), stage.make, slim)
        self.tasks[sid] = {"stage": stage.name, "state": "running", "cells": [], "memory": memory, "cpus": cpus}
        log.info("task %s (%s) submitted: %.2f GB, %d CPU", stage.name, c.label, memory / 1e9, cpus)
        return Task(sid, stage.name, ref, memory, cpus)

    def _finish(self, task: Task, ray) -> None:
        record = self.tasks[task.sid]
        try:
            out = ray.get(task.ref)
        except Exception as e:                  # noqa: BLE001 (the stage's own error, after Ray's retries)
            why = _cause(e)
            record.update(state="failed", error=why)
            for c, stage in task.waiters:
                c.waiting.discard(stage.name)
                c.failed[stage.name] = f"{stage.name}: {why}"
            return
        record.update(state="cached" if out["hit"] else "ran", seconds=out["seconds"], peak_mb=out["peak_mb"],
                      rebuilt=out["rebuilt"])
        for c, stage in task.waiters:
            c.waiting.discard(stage.name)
            self._settle(c, stage, Path(out["folder"]), out["hit"], out["seconds"], out["peak_mb"])

    def _settle(self, c: Cell, stage: Stage, folder: Path, hit: bool, seconds: float, peak_mb: float | None) -> None:
        """A cached stage's folder becomes its output in this cell (its `result` read here, with this cell's
        settings: a check's verdict is its own build's thresholds)."""
        try:
            out = stage.result(c.ctx, folder) if stage.result else folder
        except Exception as e:                  # noqa: BLE001
            c.failed[stage.name], c.errors[stage.name] = f"{stage.name}: {e}", e
            return
        (c.ctx.cache.hits if hit else c.ctx.cache.ran).append(stage.cache_name)
        c.ctx.outputs[stage.name] = out
        c.done.add(stage.name)
        c.clock.record(stage.name, seconds, peak_mb or 0.0, hit, out)

    def _local(self, c: Cell, stage: Stage) -> None:
        try:
            c.ctx.outputs[stage.name] = c.clock.run(stage, lambda: stage.execute(c.ctx),
                                                    stage.where or c.ctx.cache.root)
            c.done.add(stage.name)
        except Exception as e:                  # noqa: BLE001 (fails this cell only)
            c.failed[stage.name], c.errors[stage.name] = f"{stage.name}: {e}", e

    def _changed(self) -> None:
        if self.on_change:
            self.on_change(list(self.tasks.values()))


def check_fits(peaks: dict[str, int], found: list[dict]) -> None:
    """Refuse up front a stage whose estimate exceeds every node's memory, with the numbers."""
    node = largest_node(found)
    over = {s: p for s, p in peaks.items() if p > node["memory"]}
    if over:
        name, need = max(over.items(), key=lambda kv: kv[1])
        raise MemoryShortError(f"the {name} stage needs about {need / 1e9:.1f} GB of memory, more than any node of "
                               f"the cluster offers (the largest: {node['memory'] / 1e9:.1f} GB of Ray memory on "
                               f"{len(found)} node(s)): add a node with more memory, or build a smaller precision")


def _cause(e: BaseException) -> str:
    """The stage's own error line out of Ray's wrapping."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__
