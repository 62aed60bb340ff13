"""Measure one artifact on its runtime in a child process; the measurement goes to a JSON file.

A runtime that crashes (a segfault in native code) takes down only this child: the build records the
signal as that artifact's failure and goes on checking the others.

Usage: python -m phiedge.worker FORMAT ARTIFACT_DIR THREADS OUT_JSON REFERENCE_NPZ [SMOKE_JSON] [--long-span]
(--long-span: the long regime on the long probe's span, phiedge.checks.probes.span)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .checks.measure import Measurement, ProbeSet, measure


def measure_in_child(artifact, reference: Path, smoke: Path | None, threads: int, out: Path, *,
                     long_span: bool = False) -> Measurement:
    """Run this module on `artifact` (dies with the build, shares the stage's writer locks); its Measurement,
    also left in `out`. A child that fails is a Measurement with the error."""
    from .cache import writer_fds
    from .memory import guarded
    cmd = [sys.executable, "-m", "phiedge.worker", artifact.format, str(artifact.path), str(threads), str(out),
           str(reference), *([str(smoke)] if smoke is not None else []), *(["--long-span"] if long_span else [])]
    r = subprocess.run(guarded(cmd), capture_output=True, text=True, pass_fds=writer_fds())
    if r.returncode != 0 or not out.is_file():
        why = f"signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        m = Measurement(error=f"runtime failed ({why}): {last}")
        out.write_text(json.dumps(m.to_json(), indent=1))
        return m
    return Measurement.from_json(json.loads(out.read_text()))


def main() -> int:
    from .runtimes import RuntimeSettings, get
    args = [a for a in sys.argv[1:] if a != "--long-span"]
    fmt, artifact_dir, threads, out = args[0], Path(args[1]), int(args[2]), Path(args[3])
    probes = ProbeSet.from_reference(Path(args[4]), Path(args[5]) if len(args) > 5 else None,
                                     long_span="--long-span" in sys.argv[1:])
    rt = get(fmt).load(artifact_dir, RuntimeSettings(threads=threads))
    try:
        m = measure(rt, probes)
    finally:
        rt.close()
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(m.to_json(), indent=1))
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
