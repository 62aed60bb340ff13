"""The check layer on its own: an ArtifactResult reads back from report.json as it was written, a Measurement
round-trips through JSON, the judge is a pure function, and every registered format, runtime and profile is
exercised by the suite (completeness)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import PACKAGES, SESSION
from phiedge import exporters, runtimes, targets
from phiedge.checks import ArtifactResult, Limits, Measurement, judge

TESTS = Path(__file__).resolve().parent


def test_results_read_back_as_written(session):
    for row in session.report["artifacts"]:
        r = ArtifactResult.from_json(row, session.bundle)
        # the report adds the variant's tokenizer record (phiedge.tokenizer_files) beside the check's own fields
        assert r.to_json() == {k: v for k, v in row.items() if k != "tokenizer"} and row["tokenizer"]["source"]
        assert Measurement.from_json(r.measurement.to_json()) == r.measurement
        assert r.artifact.path == session.bundle / row["path"] and r.size_bytes == row["size_bytes"]


def test_a_runtime_failure_is_the_verdict():
    m = Measurement(error="runtime failed (signal 11): segfault")
    v = judge(m, Limits.for_precision("Q4_K_M"))
    assert not v.passed and v.failures == ("runtime failed (signal 11): segfault",)


def test_limits_come_from_one_table():
    assert Limits.for_precision("int4-k_quant-mixed8") == Limits.for_precision("INT4")   # a variant: its base's row
    assert Limits.for_precision("F16").full_precision and not Limits.for_precision("Q8_0").full_precision
    assert Limits.for_precision("Q4_K_M", {"Q4_K_M": (0.5, 1.0, None)}).top1_min == 0.5
    with pytest.raises(KeyError, match="no parity thresholds for precision 'Q2_K'"):
        Limits.for_precision("Q2_K")


def test_every_format_runtime_and_profile_is_exercised():
    """Adding a format means adding it everywhere the suite looks: the session build, a runtime, a package to
    skip on, and a format-specific test module; every profile in targets/ is loaded by test_targets."""
    formats = set(exporters.REGISTRY)
    assert formats == set(runtimes.REGISTRY) == set(SESSION) == set(PACKAGES)
    for fmt in formats:
        assert (TESTS / f"test_{fmt}.py").is_file(), fmt
        assert exporters.get(fmt).CLI_FLAG.startswith("--")
    assert set(targets.available()) == {p.stem for p in (TESTS.parent / "targets").glob("*.toml")}


def test_top1_counts_a_flip_at_a_near_tie_as_agreeing():
    """A full-precision artifact that flips the reference's top-1 where the reference's own top-2 margin is within
    twice its logit tolerance passes top-1 (either token is within tolerance there); the same flip at a clear
    margin fails, in both the full-logit and the top-k (golden reference) comparisons."""
    import numpy as np

    from phiedge.checks.metrics import compare, compare_topk, failures
    limits = Limits.for_precision("fp16")                     # top-1 0.97, max |Δ| 0.25: near-tie ≤ 0.5
    ref = np.zeros((16, 8), np.float32)
    ref[:, 0] = 2.0
    for margin, passes in ((0.1, True), (1.5, False)):
        ref[:2, 1] = 2.0 - margin                             # two positions where token 1 is close behind
        cand = ref.copy()
        cand[:2, 1] += margin + 0.05                          # ... and the artifact prefers it
        full = compare(ref, cand)
        lp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
        idx = np.argsort(-ref, -1)[:, :4]
        topk = compare_topk(idx, np.take_along_axis(lp, idx, -1), cand)
        for m in (full, topk):
            assert m.top1 == 14 / 16 and len(m.flip_margins) == 2
            assert any("top1" in f for f in failures("short", m, limits)) is not passes, (margin, m)
    assert any("top1" in f for f in failures("short", full, Limits.for_precision("Q8_0")))   # no near-ties there


def test_a_quantized_smoke_answer_fails_only_below_its_top1_beyond_chance():
    """The teacher-forced answer of a quantized artifact is a sample of its tokens: at 24 tokens and 4-bit's
    top-1 0.70, 13 agreeing pass (P(X <= 13) = 0.074 for an artifact that agrees at 0.70) and 12 fail
    (0.031 < 5 %): a broken template or runtime agrees on almost nothing. The count is the binomial's own."""
    from math import comb

    from phiedge.checks.measure import Answer, AnswerProbe
    from phiedge.checks.metrics import min_agreeing
    limits = Limits.for_precision("int4")
    need = min_agreeing(24, limits.top1_min)
    cdf = lambda k: sum(comb(24, i) * 0.7 ** i * 0.3 ** (24 - i) for i in range(k + 1))   # noqa: E731
    assert need == 13 and cdf(need) >= 0.05 > cdf(need - 1)
    assert min_agreeing(64, 0.9) == 53 and min_agreeing(0, 0.7) == 0
    ref = tuple(range(100, 124))
    probe = AnswerProbe(prompt_ids=(1, 2), reference=ref, margins=(1.0,) * 24, retrieved_has_needle=True)
    for agree, passes in ((24, True), (13, True), (12, False), (0, False)):
        forced = ref[:agree] + (7,) * (24 - agree)
        v = judge(Measurement(smoke=Answer(probe, forced, "x", forced, 2, 0.1, 10.0)), limits)
        assert v.passed is passes, (agree, v.failures)
        assert v.agreement_min == 13 / 24
        if not passes:
            assert v.failures == (f"smoke: teacher-forced answer tokens agree with PyTorch at {agree / 24:.2f} "
                                  f"({agree}/24 < 13: below top-1 0.70 beyond chance)",)
