"""`phiedge matrix matrix.toml`: one bundle per (adapter, target), every stage they share built once, on Ray.

A matrix is many builds: each cell is exactly the `phiedge build --adapter A --target T` a user would run (its own
BuildRequest, stage graph and bundle under `out/<adapter>/<target>/`), and the cells' graphs run together on Ray
(phiedge.cluster.RayExecutor), which runs a stage once whatever number of cells need it: the merge per adapter,
the retriever once, an export per (adapter, format, precision), a check per artifact and check settings. The
stage cache is the one every node reads and writes (a path they all see); a cell that fails (its parity, or a
stage it needs) fails alone, and the matrix lists it at the end. Re-running the same command resumes from the cache.

matrix.toml:

    model = "microsoft/Phi-4-mini-instruct"      # + revision = "..."
    targets = ["generic-cpu", "intel-cpu"]       # profiles (phiedge targets) or .toml paths
    docs = "./docs"
    out = "./bundles"                            # out/<adapter>/<target>/ + matrix.json, matrix.html
    [adapters]
    support = "./lora-support"                   # a folder or a Hub id
    [overrides.generic-cpu]                      # optional: a target's precisions of a format replaced
    gguf = ["Q4_K_M"]

Relative paths are read from the matrix file's folder. Optional keys: revision, cache_dir, threads,
adapter_mode, smoke_question, smoke_needle, smoke_answer, calibration_tokens.
"""
from __future__ import annotations

import html
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from . import calibration
from .errors import UsageError

log = logging.getLogger("phiedge")
KEYS = {"model", "revision", "targets", "docs", "out", "adapters", "overrides", "cache_dir", "threads",
        "adapter_mode", "smoke_question", "smoke_needle", "smoke_answer", "calibration_tokens"}


UNBOUNDED = 1 << 62      # a cell's own memory budget: the nodes' memory decides (cluster.check_fits)


class MatrixError(UsageError):
    """A matrix file that cannot be run as written."""


@dataclass(frozen=True)
class Matrix:
    path: Path
    model: str
    targets: tuple[str, ...]
    adapters: dict[str, str]
    out: Path
    docs: Path | None = None
    revision: str | None = None
    overrides: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    cache_dir: Path | None = None
    threads: int = 1
    adapter_mode: str = "merged"
    smoke: dict[str, str | None] = field(default_factory=dict)
    calibration_tokens: int = calibration.DEFAULT_TOKENS


def load(path: Path) -> Matrix:
    """matrix.toml, validated: every problem is one line naming the key and the fix."""
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise MatrixError(f"{where}: cannot read the matrix file ({e.strerror}): check the path") from None
    except tomllib.TOMLDecodeError as e:
        raise MatrixError(f"{where}: not valid TOML ({e}): fix the file") from None
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise MatrixError(f"{where}: unknown key '{unknown[0]}': known keys are {', '.join(sorted(KEYS))}")
    for key in ("model", "targets", "out", "adapters"):
        if key not in data:
            raise MatrixError(f"{where}: missing key '{key}' (see `phiedge matrix --help` for the file's shape)")
    base = Path(path).resolve().parent

    def rel(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    def local(value: str) -> str:
        """A model or adapter: a folder relative to the matrix file, or a Hub id ("org/name", no such folder)."""
        return str(rel(value)) if (rel(value).exists() or value.startswith((".", "/", "~"))) else value

    targets = data["targets"]
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise MatrixError(f"{where}: 'targets' must be a list of target names, e.g. [\"generic-cpu\", \"intel-cpu\"]")
    adapters = data["adapters"]
    if not (isinstance(adapters, dict) and adapters and all(isinstance(v, str) for v in adapters.values())):
        raise MatrixError(f"{where}: [adapters] must name at least one adapter: name = \"folder or Hub id\"")
    bad = next((n for n in adapters if not n.replace("-", "").replace("_", "").isalnum()), None)
    if bad is not None:
        raise MatrixError(f"{where}: adapter name '{bad}' is a folder name in the output: use letters, digits, "
                          f"'-' and '_'")
    overrides = data.get("overrides", {})
    if not isinstance(overrides, dict) or any(
            t not in targets or not isinstance(o, dict) or
            any(not (isinstance(v, list) and all(isinstance(x, str) for x in v)) for v in o.values())
            for t, o in overrides.items()):
        raise MatrixError(f"{where}: [overrides.<target>] tables name a listed target and give format = "
                          f"[\"precision\", ...]")
    threads = data.get("threads", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise MatrixError(f"{where}: 'threads' must be a whole number >= 1, got {threads!r}")
    return Matrix(path=Path(path), model=local(str(data["model"])), targets=tuple(targets),
                  adapters={n: local(v) for n, v in adapters.items()}, out=rel(str(data["out"])),
                  docs=rel(str(data["docs"])) if data.get("docs") else None, revision=data.get("revision"),
                  overrides=overrides, cache_dir=rel(str(data["cache_dir"])) if data.get("cache_dir") else None,
                  threads=threads, adapter_mode=str(data.get("adapter_mode", "merged")),
                  smoke={k: data.get(f"smoke_{k}") for k in ("question", "needle", "answer")},
                  calibration_tokens=int(data.get("calibration_tokens", calibration.DEFAULT_TOKENS)))


@dataclass
class CellSpec:
    adapter: str
    target: str
    out: Path
    request: object          # phiedge.build.BuildRequest

    @property
    def label(self) -> str:
        return f"{self.adapter}/{self.target}"


def cells(m: Matrix) -> list[CellSpec]:
    """Every (adapter, target) as the BuildRequest `phiedge build --adapter NAME=PATH --target T` makes. Memory is
    the cluster's to judge (phiedge.cluster.check_fits against its nodes), not this machine's budget."""
    from .build import BuildRequest
    from .targets import resolve_plan
    out = []
    for target in m.targets:
        flags = {fmt: (precs, {}) for fmt, precs in m.overrides.get(target, {}).items()}
        plan, profile = resolve_plan(target, [], flags)
        for name, adapter in m.adapters.items():
            where = m.out / name / profile.name
            req = BuildRequest(model=m.model, revision=m.revision, adapters={name: adapter},
                               adapter_mode=m.adapter_mode, formats=plan, out=where, docs=m.docs,
                               cache_dir=m.cache_dir, threads=m.threads, max_memory=UNBOUNDED, jobs=1,
                               smoke_question=m.smoke.get("question"), smoke_needle=m.smoke.get("needle"),
                               smoke_answer=m.smoke.get("answer"), calibration_tokens=m.calibration_tokens,
                               **profile.request_fields(plan))
            out.append(CellSpec(name, profile.name, where, req))
    return out


def run(m: Matrix, *, address: str | None = None, max_parallel: int | None = None, dry_run: bool = False,
        live: bool = True) -> dict:
    """Plan every cell, run them on Ray (or only show the plan), finish each cell's bundle, write matrix.json and
    matrix.html. Returns the summary; a failed cell is in it, not raised. Inputs that cannot build (a target,
    an adapter, a stage larger than every node) are refused before anything runs."""
    from . import build as b
    from . import cluster
    from .stages import Clock
    specs = cells(m)
    found = cluster.connect(address)
    t0 = time.time()
    planned: list[tuple[CellSpec, cluster.Cell]] = []
    for spec in specs:
        clock = Clock(bar=False, label=spec.label)
        ctx, stages = b._plan(spec.request, spec.out, clock)
        cluster.check_fits({s.name: ctx.inputs["peaks"][s.name] for s in stages if s.name in ctx.inputs["peaks"]},
                           found)
        planned.append((spec, cluster.Cell(ctx, stages, clock, label=spec.label)))
    runnable = [c for _, c in planned]
    if dry_run:
        return {"dry_run": True, "tasks": plan_table(runnable), "nodes": found}
    executor = cluster.RayExecutor(max_parallel=max_parallel, on_change=_progress(live))
    executor.run_cells(runnable)
    results = [_finish(spec, cell) for spec, cell in planned]
    summary = {"matrix": str(m.path), "model": m.model, "targets": list(m.targets), "adapters": dict(m.adapters),
               "out": str(m.out), "nodes": found, "seconds": round(time.time() - t0, 1),
               "cells": results, "tasks": [{"id": sid, **t} for sid, t in executor.tasks.items()],
               "passed": all(r["passed"] for r in results)}
    m.out.mkdir(parents=True, exist_ok=True)
    (m.out / "matrix.json").write_text(json.dumps(summary, indent=1, default=str))
    (m.out / "matrix.html").write_text(render(summary))
    return summary


def _finish(spec: CellSpec, cell) -> dict:
    """A cell's bundle moved into place when every check passed (as `phiedge build` does), its record either way."""
    from . import build as b
    from . import bundle
    record = {"adapter": spec.adapter, "target": spec.target, "out": str(spec.out), "passed": False,
              "error": None, "artifacts": [], "seconds": None}
    if cell.failed:
        record["error"] = cell.error
        return record
    results = b._results(cell.ctx)
    failures = [f"{r.label}: {f}" for r in results for f in r.verdict.failures]
    record["seconds"] = round(sum(cell.clock.timings.values()), 1)
    record["artifacts"] = [{"label": r.label, "format": r.artifact.format, "precision": r.artifact.precision,
                            "size_bytes": r.size_bytes, "passed": r.passed,
                            "parity": {k: {"top1": m.top1, "kl": m.kl} for k in ("short", "long")
                                       if (m := r.measurement.regime(k)) is not None}}
                           for r in results]
    if failures:
        record["error"] = f"parity failed: {'; '.join(failures)}"
        return record
    bundle.swap_into_place(spec.out.with_name(spec.out.name + ".partial"), spec.out)
    record["passed"] = True
    return record


def plan_table(cells_: list) -> list[dict]:
    """--dry-run: every distinct stage of the matrix, whether the cache has it, the cells sharing it and what its
    task reserves. A stage whose needs are not all cached yet is listed by name (its key is known only then)."""
    from .stages import ordered
    rows: dict[str, dict] = {}
    for c in cells_:
        known: set[str] = set()
        for stage in ordered(c.stages):
            row_id, state = f"{stage.name} ({c.label})", "driver"
            if stage.cache_name is not None:
                state = "to build"
                if all(n in known for n in stage.needs if n in {s.name for s in c.stages}):
                    try:
                        sid = c.ctx.cache.identity(stage.cache_name, stage.key(c.ctx), stage.modules)
                        row_id = sid
                        if c.ctx.cache.intact(sid):
                            state = "cached"
                            folder = c.ctx.cache.root / sid
                            c.ctx.outputs[stage.name] = stage.result(c.ctx, folder) if stage.result else folder
                            known.add(stage.name)
                    except (KeyError, OSError, RuntimeError):
                        pass
            elif stage.name == "hash inputs":
                c.ctx.outputs[stage.name] = stage.execute(c.ctx)[0]
                known.add(stage.name)
            row = rows.setdefault(row_id, {"stage": stage.name, "state": state, "cells": [],
                                           "memory_gb": round((stage.peak_bytes or 0) / 1e9, 2),
                                           "cpus": c.ctx.req.threads if stage.cache_name else 0})
            row["cells"].append(c.label)
    return list(rows.values())


def _progress(live: bool):
    """Task states as they change: a rich table on a terminal, else one log line per change of the counts."""
    import sys
    last: dict = {}
    if live and sys.stderr.isatty():
        from rich.console import Console
        from rich.live import Live
        from rich.table import Table
        view = Live(console=Console(stderr=True), refresh_per_second=2, transient=True)
        view.start()

        def show(tasks: list[dict]) -> None:
            t = Table(title="phiedge matrix: tasks")
            for col in ("stage", "state", "cells", "seconds"):
                t.add_column(col)
            for r in tasks:
                t.add_row(r["stage"], r["state"], ", ".join(r.get("cells", [])), str(r.get("seconds", "")))
            view.update(t)
            if all(r["state"] != "running" for r in tasks):
                view.stop()
        return show

    def lines(tasks: list[dict]) -> None:
        counts = {s: sum(1 for r in tasks if r["state"] == s) for s in ("running", "ran", "cached", "failed")}
        if counts != last:
            last.clear()
            last.update(counts)
            log.info("matrix tasks: %s", ", ".join(f"{n} {s}" for s, n in counts.items()))
    return lines


def table(summary: dict) -> str:
    lines = [f"{'adapter':14}{'target':16}{'result':8}{'artifacts':>10}{'seconds':>9}  bundle"]
    for c in summary["cells"]:
        lines.append(f"{c['adapter']:14}{c['target']:16}{'PASS' if c['passed'] else 'FAIL':8}"
                     f"{len(c['artifacts']):>10}{c['seconds'] or 0:9.1f}  {c['out']}")
    ran = sum(1 for t in summary["tasks"] if t["state"] == "ran")
    cached = sum(1 for t in summary["tasks"] if t["state"] == "cached")
    lines.append(f"{len(summary['tasks'])} distinct stages: {ran} ran, {cached} from the cache; "
                 f"{summary['seconds']:.0f} s on {len(summary['nodes'])} node(s)")
    failed = [c for c in summary["cells"] if not c["passed"]]
    lines += [f"FAILED {c['adapter']}/{c['target']}: {c['error']}" for c in failed]
    return "\n".join(lines)


def render(summary: dict) -> str:
    """matrix.html: the (adapter x target) grid, each cell linking its bundle's report."""
    adapters = list(dict.fromkeys(c["adapter"] for c in summary["cells"]))
    targets = list(dict.fromkeys(c["target"] for c in summary["cells"]))
    by = {(c["adapter"], c["target"]): c for c in summary["cells"]}
    out = Path(summary["out"])

    def cell(c: dict) -> str:
        if c is None:
            return "<td></td>"
        link = Path(c["out"]).relative_to(out).as_posix() + "/report.html"
        arts = "".join(
            f"<li>{html.escape(a['format'])} {html.escape(a['precision'])}: {a['size_bytes'] / 1e6:.1f} MB, "
            + ", ".join(f"{k} top1 {p['top1']:.3f} KL {p['kl']:.4f}" for k, p in a["parity"].items())
            + ("" if a["passed"] else " <b>FAIL</b>") + "</li>" for a in c["artifacts"])
        head = (f"<a href='{html.escape(link)}'>PASS</a>" if c["passed"] else
                f"<b>FAIL</b>: {html.escape(c['error'] or '')}")
        return (f"<td class='{'pass' if c['passed'] else 'fail'}'>{head}<ul>{arts}</ul>"
                f"{'' if c['seconds'] is None else format(c['seconds'], '.0f') + ' s of stages'}</td>")
    rows = "".join(f"<tr><th>{html.escape(a)}</th>" + "".join(cell(by.get((a, t))) for t in targets) + "</tr>"
                   for a in adapters)
    ran = sum(1 for t in summary["tasks"] if t["state"] == "ran")
    return ("<!doctype html><meta charset='utf-8'><title>phiedge matrix</title><style>body{font-family:sans-serif;"
            "margin:2em}td,th{border:1px solid #ccc;padding:.5em;vertical-align:top}td.pass{background:#efe}"
            "td.fail{background:#fee}</style>"
            f"<h1>phiedge matrix: {html.escape(summary['model'])}</h1>"
            f"<p>{len(summary['cells'])} bundles, {len(summary['tasks'])} distinct stages ({ran} ran), "
            f"{summary['seconds']:.0f} s on {len(summary['nodes'])} node(s).</p>"
            "<table><tr><th>adapter \\ target</th>" + "".join(f"<th>{html.escape(t)}</th>" for t in targets)
            + "</tr>" + rows + "</table>")
