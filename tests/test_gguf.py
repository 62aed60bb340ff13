"""llama.cpp-specific behaviour on the session build's GGUF artifacts: the context-size LongRoPE trap, the F32
GGUF's exactness with an f32 KV cache, a broken artifact, and every failure listed (the contract common to all
runtimes is tests/test_runtimes.py)."""
from __future__ import annotations

import json

import pytest

from phiedge import build, errors, exporters
from phiedge.checks import Limits, probes
from phiedge.checks.metrics import compare, failures
from phiedge.runtimes import RuntimeSettings, get

pytestmark = pytest.mark.gguf


def test_probes_straddle_the_longrope_switch(session):
    ref, switch = session.reference, session.switch
    assert switch == json.loads((session.merged / "merged" / "config.json").read_text())[
        "original_max_position_embeddings"]
    assert len(ref["short_ids"]) < switch < len(ref["long_ids"]) == switch + probes.LONG_MARGIN


def test_gate_catches_the_llama_cpp_context_trap(session):
    """n_ctx=8192 makes llama.cpp use the long factors on a short prompt: the gate must fail it."""
    ref, path = session.reference, session.artifact("gguf", "F32")
    limits = Limits.for_precision("F32")
    rt = get("gguf").load(path, RuntimeSettings(n_ctx=8192))
    wrong = compare(ref["short_logits"], rt.logits(ref["short_ids"].tolist(), probes.COMPARE_LAST))
    assert failures("short", wrong, limits)
    rt.close()
    rt = get("gguf").load(path)                     # our sizing: short factors
    assert rt.context_size(len(ref["short_ids"])) == session.switch < rt.context_size(len(ref["long_ids"]))
    right = compare(ref["short_logits"], rt.logits(ref["short_ids"].tolist(), probes.COMPARE_LAST))
    assert not failures("short", right, limits)
    assert wrong.max_abs > 10 * right.max_abs
    rt.close()


def test_f32_gguf_is_exact_with_an_f32_kv_cache(session):
    """The converter writes exact weights: with llama.cpp's cache in f32 (no flash attention), the F32 GGUF
    is within 5e-3 of PyTorch in both regimes; the default f16 cache accounts for the rest of the gap."""
    ref = session.reference
    rt = get("gguf").load(session.artifact("gguf", "F32"),
                          RuntimeSettings(extra={"kv_cache_type": "f32", "flash_attn": False}))
    for regime in ("short", "long"):
        m = compare(ref[f"{regime}_logits"], rt.logits(ref[f"{regime}_ids"].tolist(), probes.COMPARE_LAST))
        assert m.top1 == 1.0 and m.max_abs < 5e-3, (regime, m)
    rt.close()


def test_every_failure_is_listed_and_nothing_ships(tiny, session, tmp_path):
    """Impossible thresholds: both artifacts fail, both are named, no output dir appears (the session's cache
    holds every stage: only the judging differs)."""
    req = build.BuildRequest(model=str(tiny / "model"), adapters={"lora": str(tiny / "adapters/lora")},
                             formats={"gguf": ["F32", "Q8_0"]}, out=tmp_path / "dist", cache_dir=session.cache,
                             thresholds={"F32": (1.01, 0.0, 0.0), "Q8_0": (1.01, 0.0, 0.0)})
    with pytest.raises(errors.ParityError) as e:
        build.build(req)
    msg = str(e.value)
    assert "gguf F32: short top1" in msg and "gguf Q8_0: short top1" in msg and "long top1" in msg
    assert not (tmp_path / "dist").exists()
    rep = json.loads((tmp_path / "dist.partial" / "report.json").read_text())
    assert rep["passed"] is False and len(rep["artifacts"]) == 2


def test_broken_artifact_is_a_failure_not_a_crash(session, tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    good = session.artifact("gguf", "Q8_0") / "model.gguf"
    (d / "model.gguf").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    art = exporters.Artifact(format="gguf", precision="Q8_0", path=d, files=("model.gguf",))
    r = build.check_artifact(art, session.merged / "reference.npz", 2, None, tmp_path)
    assert r.passed is False and "runtime failed" in r.verdict.failures[0]
    assert r.to_json()["failures"] == list(r.verdict.failures)



def test_teacher_forcing_reuses_the_greedy_steps_that_agree(session):
    """Teacher forcing takes its picks from the greedy answer's own steps while they agree with PyTorch's (those
    steps were fed PyTorch's prefix) and prefills only the rest: the same picks as a prefill of all of it."""
    from phiedge.checks.measure import ProbeSet, _forced
    probe = ProbeSet.from_reference(session.merged / "reference.npz").greedy
    prompt, want = list(probe.prompt_ids), list(probe.reference)
    for precision in ("F32", "Q4_K_M"):
        rt = get("gguf").load(session.artifact("gguf", precision))
        got = rt.generate_ids(prompt, len(want), stop_ids=rt.stop_ids()).ids
        whole = tuple(int(t) for t in rt.logits(prompt + want, len(want) + 1)[:len(want)].argmax(-1))
        assert _forced(rt, prompt, want, got) == whole, precision
        if precision == "F32":
            agree = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), len(want))
            assert whole[:agree] == tuple(want[:agree])      # an agreeing step is PyTorch's token, teacher-forced
        rt.close()


def _mapped_resident(path) -> int:
    """Bytes of `path` this process has resident through its memory mappings."""
    import os

    from phiedge import pages
    return sum(m.rss for m in pages.mappings(os.path.realpath(path)))


def test_repacked_weights_do_not_stay_resident_twice(session):
    """Where llama.cpp's CPU backend repacks weights into buffers of its own (not on AMX CPUs, where phiedge turns repacking off), the
    mapped pages it read them from are let go after the load (at full size 4.76 -> 3.39 GB), the freshly written
    file's too. Only the weights used from the file come back (here Q4_K_M's tensors that are not repacked), and
    the logits are those of repacking off with every page kept, within the kernels' rounding."""
    import gc

    import numpy as np

    from phiedge.runtimes.gguf import _cpu_has_amx
    if _cpu_has_amx():
        pytest.skip("this CPU's backend does not repack weights (AMX): nothing to let go")
    art = session.artifact("gguf", "Q4_K_M")
    model = next(art.glob("*.gguf"))
    ids = session.reference["short_ids"].tolist()
    plain = get("gguf").load(art, RuntimeSettings(threads=1, extra={"use_extra_bufts": False}))
    want = plain.logits(ids, probes.COMPARE_LAST)
    kept = _mapped_resident(model)
    plain.close()
    del plain
    gc.collect()                                    # llama.cpp unmaps the file when the model is freed
    rt = get("gguf").load(art, RuntimeSettings(threads=1))
    try:
        assert _mapped_resident(model) == 0
        got = rt.logits(ids, probes.COMPARE_LAST)
        assert 0 < _mapped_resident(model) < 0.8 * kept, (kept, _mapped_resident(model))
        np.testing.assert_allclose(got, want, atol=0.2, rtol=0)     # measured: 0.053 (kernels, not pages)
    finally:
        rt.close()
