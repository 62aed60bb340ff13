"""Checking an artifact, in one room.

    probes.py     the probe prompts (one per LongRoPE regime), the same token ids everywhere
    reference.py  PyTorch's side: reference logits, greedy answers and margins, the smoke reference (build time)
    golden.py     the bundle's top-k golden references, for the device
    measure.py    ProbeSet, measure(runtime, probes) -> Measurement: run by the build's worker and by validate
    metrics.py    KL / top-1 / max|Δ|, the threshold table, Limits, teacher-forced token agreement
    judge.py      judge(measurement, limits) -> Verdict: pure
    result.py     ArtifactResult(artifact, limits, measurement, verdict): frozen, to_json / from_json

Everything here but reference.py is device-path code (numpy only).
"""
from .judge import Verdict, judge, states
from .measure import Measurement, ProbeSet, measure
from .metrics import Limits, Metrics
from .result import ArtifactResult

__all__ = ["ArtifactResult", "Limits", "Measurement", "Metrics", "ProbeSet", "Verdict", "judge", "measure", "states"]
