"""`phiedge build`: resolve → check → merge (+ proof) → reference logits → export → parity gate → report.

Everything is written under `<out>.partial/` and renamed to `<out>` only when every stage passed, so an
interrupted or failed build never looks complete. A failed gate leaves `<out>.partial/report.json` for
inspection and raises ParityError listing every failure.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import exporters, parity, probes, report, source
from .errors import ParityError, UsageError

log = logging.getLogger("phiedge")


@dataclass
class BuildRequest:
    model: str = source.DEFAULT_MODEL
    adapter: str | None = None
    formats: dict[str, list[str]] = field(default_factory=lambda: {"gguf": ["Q4_K_M"]})
    out: Path = Path("dist")
    revision: str | None = None
    adapter_revision: str | None = None
    force: bool = False
    threads: int = os.cpu_count() or 1
    allow_noop_adapter: bool = False
    thresholds: dict | None = None        # precision -> (top1, kl, max_abs); a profile's overrides


@contextmanager
def stage(name: str, timings: dict):
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 2)
    log.info("✓ %-10s %6.1f s", name, timings[name])


def plan_formats(formats: list[str], precisions: dict[str, list[str]]) -> dict[str, list[str]]:
    """--formats plus per-format precision flags -> {format: [precision, ...]}, validated."""
    plan = {}
    for f in formats:
        exp = exporters.get(f)
        plan[f] = exp.check_precisions(precisions.get(f) or [exp.DEFAULT_PRECISION])
    if not plan:
        raise UsageError(f"no formats requested: pass --formats (known: {', '.join(sorted(exporters.REGISTRY))})")
    return plan


def build(req: BuildRequest) -> dict:
    timings: dict[str, float] = {}
    out = Path(req.out)
    # ---- cheap checks: nothing heavy runs before all of these pass
    with stage("resolve", timings):
        source.prepare_out(out, force=req.force)
        model = source.resolve(req.model, revision=req.revision, kind="model")
        config = source.check_model(model)
        adapter = None
        if req.adapter:
            adapter = source.resolve(req.adapter, revision=req.adapter_revision, kind="adapter")
            source.check_adapter(adapter, model, config)
        n_params = _param_count(model)
        weight_bytes = sum(v for k, v in model.files.items() if k.endswith(".safetensors"))
        need = weight_bytes + sum(exporters.get(f).estimate_bytes(n_params, p) for f, p in req.formats.items())
        source.check_disk(out.parent if not out.exists() else out, int(need * 1.1))
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    from . import merge  # build-time only: torch, transformers, peft
    with stage("merge", timings):
        proof = merge.merge(model, adapter, config, work / "merged", allow_noop=req.allow_noop_adapter)
    with stage("reference", timings):
        merge.reference(work / "merged", config, work / "reference.npz")
    artifacts = []
    for fmt, precs in req.formats.items():
        with stage(f"export {fmt}", timings):
            artifacts += exporters.get(fmt).export(work / "merged", work / fmt, precs, {"threads": req.threads})
    rows, failures = [], []
    with stage("parity", timings):
        for a in artifacts:
            row = check_artifact(a, work / "reference.npz", req.threads, req.thresholds, work)
            rows.append(row)
            failures += [f"{a.format} {a.precision}: {f}" for f in row["failures"]]
            _log_row(row)
    rep = report.build_report(model=model, adapter=adapter, proof=merge.proof_dict(proof), rows=rows,
                              timings=timings, config=config, out=out)
    report.write(rep, work)
    if failures:
        raise ParityError(f"parity failed for {len(failures)} check(s): {'; '.join(failures)} "
                          f"(report: {work / 'report.json'})")
    _swap_into_place(work, out)
    return rep


def check_artifact(a: exporters.Artifact, reference: Path, threads: int, overrides: dict | None,
                   root: Path) -> dict:
    """Run the artifact's runtime in a child process; compare with the table; list every failure."""
    row = {"format": a.format, "precision": a.precision, "path": str(a.path.relative_to(root)),
           "size_bytes": a.size_bytes, "meta": a.meta}
    limits = parity.thresholds_for(a.precision, overrides)
    row["thresholds"] = {"top1_min": limits[0], "kl_max": limits[1], "max_abs_max": limits[2]}
    r = subprocess.run([sys.executable, "-m", "phiedge.worker", a.format, str(a.path), str(reference), str(threads)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        why = f"signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        row.update(parity={"short": None, "long": None}, failures=[f"runtime failed ({why}): {last}"], passed=False)
        return row
    measured = json.loads(r.stdout.strip().splitlines()[-1])
    row["parity"] = {"short": measured["parity"].get("short"), "long": measured["parity"].get("long")}
    row["greedy"] = measured.get("greedy")
    fails = []
    for regime, m in row["parity"].items():
        if m is not None:
            fails += parity.failures(regime, parity.Metrics(**m), limits)
    row["failures"] = fails
    row["passed"] = not fails
    return row


def _log_row(row: dict) -> None:
    def fmt(m):
        return "n/a" if m is None else f"top1 {m['top1']:.3f} kl {m['kl']:.2g} max|Δ| {m['max_abs']:.3g}"
    log.info("  %s %-7s short: %s | long: %s  %s", row["format"], row["precision"], fmt(row["parity"]["short"]),
             fmt(row["parity"]["long"]), "PASS" if row["passed"] else "FAIL: " + "; ".join(row["failures"]))


def _swap_into_place(work: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _param_count(model: source.Source) -> int:
    n = 0
    for shape in source.model_tensors(model).values():
        p = 1
        for d in shape:
            p *= d
        n += p
    return n
