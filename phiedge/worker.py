"""Measure one artifact on its runtime in a child process; the measurement goes to a JSON file.

A runtime that crashes (a segfault in native code) takes down only this child: the build records the
signal as that artifact's failure and goes on checking the others.

    measure_files(artifact, reference, smoke, threads, folder, limits)   # measurement.json [+ the exact retry]
    result_of(artifact, limits, folder)                                  # -> ArtifactResult, judged

An artifact is measured with the settings it ships with. When that fails its limits and its runtime names exact
settings the artifact does not ship with (Runtime.exact_settings: OpenVINO's f32 CPU properties where int8/int4
ship with the CPU plugin's fast defaults), it is measured again with those (measurement-exact.json); passing so,
it ships with them (ArtifactResult.settings, carried into the bundle's manifest and used by `ask` / `validate`),
and the first verdict's failures are kept beside it.

Usage: python -m phiedge.worker FORMAT ARTIFACT_DIR THREADS OUT_JSON REFERENCE_NPZ [SMOKE_JSON] [--long-span]
       [--extra JSON]
(--long-span: the long regime on the long probe's span, phiedge.checks.probes.span; --extra: RuntimeSettings.extra)
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from .checks import ArtifactResult, Limits, judge
from .checks.measure import Measurement, ProbeSet, measure

log = logging.getLogger("phiedge")
FIRST, EXACT = "measurement.json", "measurement-exact.json"


def measure_in_child(artifact, reference: Path, smoke: Path | None, threads: int, out: Path, *,
                     long_span: bool = False, extra: dict | None = None) -> Measurement:
    """Run this module on `artifact` (dies with the build, shares the stage's writer locks); its Measurement,
    also left in `out`. A child that fails is a Measurement with the error."""
    from .cache import writer_fds
    from .memory import guarded
    cmd = [sys.executable, "-m", "phiedge.worker", artifact.format, str(artifact.path), str(threads), str(out),
           str(reference), *([str(smoke)] if smoke is not None else []), *(["--long-span"] if long_span else []),
           *(["--extra", json.dumps(extra)] if extra else [])]
    r = subprocess.run(guarded(cmd), capture_output=True, text=True, pass_fds=writer_fds())
    if r.returncode != 0 or not out.is_file():
        why = f"signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        m = Measurement(error=f"runtime failed ({why}): {last}")
        out.write_text(json.dumps(m.to_json(), indent=1))
        return m
    return Measurement.from_json(json.loads(out.read_text()))


def exact_retry(artifact) -> dict | None:
    """The settings an artifact is measured again with when it fails with its own (None: it has no others)."""
    from .runtimes import get
    return get(artifact.format).exact_settings(artifact.meta or {})


def measure_files(artifact, reference: Path, smoke: Path | None, threads: int, folder: Path, limits: Limits, *,
                  long_span: bool = False, settings: dict | None = None) -> None:
    """The artifact's measurement with its own settings in `folder`, and with its runtime's exact settings beside
    it when the first misses `limits` (a stage's cache key must then hold the limits: build._check_key).
    `settings`: RuntimeSettings.extra for both (a separate adapter applied to the artifact)."""
    folder.mkdir(parents=True, exist_ok=True)
    m = measure_in_child(artifact, reference, smoke, threads, folder / FIRST, long_span=long_span, extra=settings)
    extra = exact_retry(artifact)
    if extra and not judge(m, limits).passed:
        measure_in_child(artifact, reference, smoke, threads, folder / EXACT, long_span=long_span,
                         extra={**(settings or {}), **extra})


def result_of(artifact, limits: Limits, folder: Path) -> ArtifactResult:
    """The judged result of measure_files' files: the exact settings' when the artifact's own failed and those
    passed, else its own."""
    first = ArtifactResult.of(artifact, limits, _read(folder / FIRST))
    if first.passed or not (folder / EXACT).is_file():
        return first
    exact = ArtifactResult.of(artifact, limits, _read(folder / EXACT), settings=exact_retry(artifact),
                              own_settings_failures=first.verdict.failures)
    if not exact.passed:
        log.info("  %s %s fails with its runtime's exact settings too: %s", artifact.format, artifact.precision,
                 "; ".join(exact.verdict.failures))
    return exact if exact.passed else first


def _read(path: Path) -> Measurement:
    return Measurement.from_json(json.loads(path.read_text()))


def main() -> int:
    from .runtimes import RuntimeSettings, get
    argv = sys.argv[1:]
    extra = {}
    if "--extra" in argv:
        i = argv.index("--extra")
        extra = json.loads(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    args = [a for a in argv if a != "--long-span"]
    fmt, artifact_dir, threads, out = args[0], Path(args[1]), int(args[2]), Path(args[3])
    probes = ProbeSet.from_reference(Path(args[4]), Path(args[5]) if len(args) > 5 else None,
                                     long_span="--long-span" in argv)
    rt = get(fmt).load(artifact_dir, RuntimeSettings(threads=threads, extra=extra))
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
