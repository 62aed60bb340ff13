"""`make bench-matrix`: a build matrix run as a shell loop of `phiedge build` against `phiedge matrix`, on the tiny
fixture (2 adapters x 2 device targets sharing a GGUF precision, with documents), each from an empty cache.

    python scripts/bench_matrix.py [--out bench/matrix.json] [--work DIR]

Measured: wall time of each route and the stages each ran (the loop's from its builds' reports, the matrix's
from matrix.json). Modelled: the matrix on N nodes of this machine's shape, from the matrix's measured task times
and its stage graph — a lower bound of max(the critical path, the total task time / the task slots), plus the
driver's own time (planning, input hashing and the bundles), which does not scale. Its figures are the tiny fixture's:
they show the
sharing and the scheduling, not Phi-4-mini's hours.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / ".fixtures"
ADAPTERS = {"support": "lora", "legal": "rslora"}
TARGETS = {"edge-a": ["Q4_K_M"], "edge-b": ["Q4_K_M", "Q8_0"]}
DEMO = json.loads((ROOT / "demo" / "smoke.json").read_text())      # the demo documents' question and needle
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}


def phiedge(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("phiedge")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=ENV)


def targets(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, precs in TARGETS.items():
        rows = "".join(f'[[artifacts]]\nformat = "gguf"\nprecision = "{p}"\n' for p in precs)
        out[name] = folder / f"{name}.toml"
        out[name].write_text(f'name = "{name}"\ndescription = "bench-matrix"\n{rows}')
    return out


def run_loop(tiny: Path, work: Path, tpaths: dict[str, Path]) -> dict:
    """One `phiedge build` per cell, one after another, sharing one cache (what a user's shell loop does)."""
    cache, t0, ran, builds = work / "loop-cache", time.time(), 0, []
    for name, adapter in ADAPTERS.items():
        for target, path in tpaths.items():
            t = time.time()
            r = phiedge("build", "--model", str(tiny / "model"), "--adapter", f"{name}={tiny / 'adapters' / adapter}",
                        "--target", str(path), "--docs", str(ROOT / "demo" / "docs"),
                        "--smoke-question", DEMO["question"], "--smoke-needle", DEMO["needle"],
                        "--out", str(work / "loop" / name / target), "--cache-dir", str(cache), "--jobs", "1")
            if r.returncode:
                raise SystemExit(f"phiedge build {name}/{target} failed: {r.stderr[-2000:]}")
            rep = json.loads((work / "loop" / name / target / "report.json").read_text())
            ran += len(rep["cache"]["ran"])
            builds.append({"cell": f"{name}/{target}", "seconds": round(time.time() - t, 1),
                           "stages_ran": len(rep["cache"]["ran"]), "stages_cached": len(rep["cache"]["hits"])})
    return {"seconds": round(time.time() - t0, 1), "stages_ran": ran, "builds": builds}


def run_matrix(tiny: Path, work: Path, tpaths: dict[str, Path]) -> dict:
    adapters = "".join(f'{n} = "{tiny / "adapters" / a}"\n' for n, a in ADAPTERS.items())
    path = work / "matrix.toml"
    path.write_text(f'model = "{tiny / "model"}"\ntargets = {json.dumps([str(p) for p in tpaths.values()])}\n'
                    f'docs = "{ROOT / "demo" / "docs"}"\nout = "matrix"\ncache_dir = "matrix-cache"\n'
                    f'threads = 1\nsmoke_question = {json.dumps(DEMO["question"])}\n'
                    f'smoke_needle = {json.dumps(DEMO["needle"])}\n[adapters]\n{adapters}')
    t0 = time.time()
    r = phiedge("matrix", str(path))
    if r.returncode:
        raise SystemExit(f"phiedge matrix failed: {r.stderr[-2000:]}")
    summary = json.loads((work / "matrix" / "matrix.json").read_text())
    tasks = summary["tasks"]
    return {"seconds": round(time.time() - t0, 1), "ray_seconds": summary["seconds"],
            "stages_ran": sum(1 for t in tasks if t["state"] == "ran"), "tasks": tasks,
            "nodes": summary["nodes"]}


def scaling(tasks: list[dict], driver_seconds: float, slots_per_node: int, nodes=(1, 2, 4, 8, 16)) -> list[dict]:
    """The matrix on N nodes of this machine's shape (each running `slots_per_node` tasks at once): a lower bound
    of max(the critical path, the task time / slots) + the driver's own time, which does not scale. The critical
    path follows the stage graph: the smoke reference needs the merge and the retriever, an export the merge, a
    check both."""
    ran = [t for t in tasks if t["state"] == "ran"]
    work = sum(t.get("seconds") or 0 for t in ran)

    def longest(kind: str) -> float:
        return max((t.get("seconds") or 0 for t in ran if t["stage"].startswith(kind)), default=0.0)
    critical = max(max(longest("retriever"), longest("merge")) + longest("smoke reference"),
                   longest("merge") + longest("export")) + longest("check")
    return [{"nodes": n, "slots": n * slots_per_node,
             "seconds": round(max(critical, work / (n * slots_per_node)) + driver_seconds, 1)} for n in nodes]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "matrix.json")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "phiedge" / "bench-matrix")
    a = ap.parse_args()
    tiny = FIXTURES / "tiny-phi"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_phi.py"), str(tiny)], check=True)
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    tpaths = targets(a.work / "targets")
    loop = run_loop(tiny, a.work, tpaths)
    matrix = run_matrix(tiny, a.work, tpaths)
    task_seconds = sum(t.get("seconds") or 0 for t in matrix["tasks"] if t["state"] == "ran")
    task_cpus = max((t.get("cpus") or 1 for t in matrix["tasks"]), default=1)
    slots = max(1, sum(n["cpus"] for n in matrix["nodes"]) // task_cpus)
    driver = max(0.0, matrix["ray_seconds"] - task_seconds / slots)
    result = {"schema": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": {
                  "cpus": os.cpu_count(), "python": platform.python_version()},
              "cells": len(ADAPTERS) * len(TARGETS), "adapters": list(ADAPTERS), "targets": TARGETS,
              "loop": loop, "matrix": {k: v for k, v in matrix.items() if k != "tasks"},
              "matrix_tasks": matrix["tasks"],
              "speedup": round(loop["seconds"] / matrix["seconds"], 2),
              "task_seconds": round(task_seconds, 1), "slots_per_node": slots,
              "scaling_model": scaling(matrix["tasks"], round(driver, 1), slots)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(f"loop of phiedge build: {loop['seconds']:.0f} s, {loop['stages_ran']} stages ran")
    print(f"phiedge matrix:        {matrix['seconds']:.0f} s, {matrix['stages_ran']} stages ran "
          f"({len(matrix['nodes'])} node(s))")
    print("model: " + ", ".join(f"{s['nodes']} node(s) {s['seconds']:.0f} s" for s in result["scaling_model"]))
    print(f"wrote {a.out}")
    if a.out == Path(__file__).resolve().parents[1] / "bench" / "matrix.json":
        from bench_readme import write as write_readme
        write_readme()                       # bench/README.md: the tables, from the result files
    return 0


if __name__ == "__main__":
    sys.exit(main())
