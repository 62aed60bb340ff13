"""GGUF end to end on real llama.cpp: build every level from the tiny Phi-4-mini, gate parity in both regimes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from phiedge import build, chat, errors, exporters, parity, probes
from phiedge.runtimes import RuntimeSettings, get
from conftest import run_cli, assert_pytorch_tokens

pytestmark = pytest.mark.gguf
LEVELS = ["F32", "F16", "Q8_0", "Q4_K_M"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="module")
def built(tiny, cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "dist"
    r = run_cli("build", "--model", str(tiny / "model"), "--adapter", str(tiny / "adapters/lora"),
                "--formats", "gguf", "--gguf-quant", ",".join(LEVELS), "--out", str(out), "--cache-dir", str(cache))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "✓ merge" in r.stderr and "✓ check gguf Q4_K_M" in r.stderr          # the checklist
    assert "PASS" in r.stdout
    return out


@pytest.fixture(scope="module")
def merged(built, cache) -> Path:
    """The merge stage: merged checkpoint and full-vocabulary reference logits (kept in the cache, not shipped)."""
    (stage,) = [p for p in cache.glob("merge-*") if (p / ".complete").exists()]
    return stage


def test_report_shape_and_every_level_passes(built):
    rep = json.loads((built / "report.json").read_text())
    assert rep["passed"] is True
    assert rep["merge"]["max_abs_vs_peft"] <= rep["merge"]["tolerance"] < rep["merge"]["max_abs_vs_base"]
    assert rep["probes"]["longrope_switch"] == 4096
    assert [a["precision"] for a in rep["artifacts"]] == LEVELS
    for a in rep["artifacts"]:
        assert a["format"] == "gguf" and a["passed"] and not a["failures"]
        assert (built / a["path"] / "model.gguf").stat().st_size == a["size_bytes"]
        for regime in ("short", "long"):
            m = a["parity"][regime]
            assert m["positions"] == probes.COMPARE_LAST
            assert set(m) >= {"top1", "kl", "max_abs"}
    sizes = [a["size_bytes"] for a in rep["artifacts"]]
    assert sizes == sorted(sizes, reverse=True), "each level is smaller than the one before"
    f32 = rep["artifacts"][0]
    assert f32["parity"]["short"]["kl"] < 1e-5 and f32["parity"]["long"]["kl"] < 1e-5
    assert_pytorch_tokens(f32["greedy"])


def test_probes_straddle_the_longrope_switch(merged):
    ref = np.load(merged / "reference.npz")
    assert len(ref["short_ids"]) < 4096 < len(ref["long_ids"])


def test_gate_catches_the_llama_cpp_context_trap(built, merged):
    """n_ctx=8192 makes llama.cpp use the long factors on a short prompt: the gate must fail it."""
    ref = np.load(merged / "reference.npz")
    rt = get("gguf").load(built / "gguf-F32", RuntimeSettings(n_ctx=8192))
    wrong = parity.compare(ref["short_logits"], rt.logits(ref["short_ids"].tolist(), probes.COMPARE_LAST))
    assert parity.failures("short", wrong, parity.thresholds_for("F32"))
    rt.close()
    rt = get("gguf").load(built / "gguf-F32")                     # our sizing: short factors
    assert rt.context_size(len(ref["short_ids"])) == 4096 < rt.context_size(len(ref["long_ids"]))
    right = parity.compare(ref["short_logits"], rt.logits(ref["short_ids"].tolist(), probes.COMPARE_LAST))
    assert not parity.failures("short", right, parity.thresholds_for("F32"))
    assert wrong.max_abs > 10 * right.max_abs


def test_tokenizer_and_template_match_hugging_face(built, merged):
    rt = get("gguf").load(built / "gguf-Q8_0")
    hf = Tokenizer.from_file(str(merged / "merged" / "tokenizer.json"))
    template, specials = chat.load_template(merged / "merged")
    messages = [{"role": "system", "content": "Context: x = 3.5 (see __init__)."},
                {"role": "user", "content": "Don't guess — what's  x?\n"}]
    text = chat.render(template, messages, specials)
    assert rt.chat_ids(messages) == hf.encode(text, add_special_tokens=False).ids
    assert rt.chat_template == template
    assert {hf.token_to_id("<|end|>"), hf.token_to_id("<|endoftext|>")} <= rt.stop_ids()
    rt.close()


def test_pre_tokenizer_decided_from_the_regex(built, tiny):
    rep = json.loads((built / "report.json").read_text())
    assert {a["meta"]["pre_tokenizer"] for a in rep["artifacts"]} == {"gpt-4o"}
    assert exporters.gguf.decide_pre_tokenizer(tiny / "model") == "gpt-4o"


def test_chat_generation_stops_at_end_token(built):
    rt = get("gguf").load(built / "gguf-F32")
    gen = rt.generate([{"role": "user", "content": "What does the with statement do?"}], max_new_tokens=48)
    assert gen.prompt_tokens > 5 and gen.ids and gen.text.strip()
    assert not set(gen.ids) & rt.stop_ids()
    rt.close()


def test_every_failure_is_listed_and_nothing_ships(tiny, cache, tmp_path):
    """Impossible thresholds: both artifacts fail, both are named, no output dir appears."""
    req = build.BuildRequest(model=str(tiny / "model"), adapter=str(tiny / "adapters/lora"),
                             formats={"gguf": ["F32", "Q8_0"]}, out=tmp_path / "dist", cache_dir=cache,
                             thresholds={"F32": (1.01, 0.0, 0.0), "Q8_0": (1.01, 0.0, 0.0)})
    with pytest.raises(errors.ParityError) as e:
        build.build(req)
    msg = str(e.value)
    assert "gguf F32: short top1" in msg and "gguf Q8_0: short top1" in msg and "long top1" in msg
    assert not (tmp_path / "dist").exists()
    rep = json.loads((tmp_path / "dist.partial" / "report.json").read_text())
    assert rep["passed"] is False and len(rep["artifacts"]) == 2


def test_broken_artifact_is_a_failure_not_a_crash(built, merged, tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    good = built / "gguf-Q8_0" / "model.gguf"
    (d / "model.gguf").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    art = exporters.Artifact(format="gguf", precision="Q8_0", path=d, files=("model.gguf",))
    row = build.check_artifact(art, merged / "reference.npz", 2, None, tmp_path)
    assert row["passed"] is False and "runtime failed" in row["failures"][0]


def test_f32_gguf_is_exact_with_an_f32_kv_cache(built, merged):
    """The converter writes exact weights: with llama.cpp's cache in f32 (no flash attention), the F32 GGUF
    is within 5e-3 of PyTorch in both regimes; the default f16 cache accounts for the rest of the gap."""
    ref = np.load(merged / "reference.npz")
    rt = get("gguf").load(built / "gguf-F32", RuntimeSettings(extra={"kv_cache_type": "f32", "flash_attn": False}))
    for regime in ("short", "long"):
        m = parity.compare(ref[f"{regime}_logits"], rt.logits(ref[f"{regime}_ids"].tolist(), probes.COMPARE_LAST))
        assert m.top1 == 1.0 and m.max_abs < 5e-3, (regime, m)
    rt.close()
