"""The merge and its proof, on every adapter flavour real users bring."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from phiedge import errors, merge, source


def _merge(tiny, kind, out, **kw):
    model = source.resolve(str(tiny / "model"))
    config = source.check_model(model)
    adapter = source.resolve(str(tiny / "adapters" / kind), kind="adapter")
    source.check_adapter(adapter, model, config)
    return merge.merge(model, adapter, config, out, **kw)


# adapter kind -> why it is here
KINDS = {
    "lora": "plain LoRA on the fused qkv_proj / gate_up_proj",
    "rslora": "rsLoRA scaling (alpha/sqrt(r)) with rank_pattern and alpha_pattern per module",
    "dora": "DoRA: magnitude vector rescales the merged weight column-wise",
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_merge_is_proven(tiny, tmp_path, kind):
    proof = _merge(tiny, kind, tmp_path / "merged")
    assert proof.max_abs_vs_peft <= proof.tolerance
    assert proof.max_abs_vs_base > 10 * proof.tolerance, "adapter must change the model"
    assert proof.top1_vs_peft == 1.0
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert saved == json.loads((tiny / "model" / "config.json").read_text()), "config is passed through verbatim"
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert "lm_head.weight" not in weights, "tied embeddings stay tied"
    assert not any("lora" in k for k in weights)


def test_plain_lora_merge_equals_the_formula(tiny, tmp_path):
    """Independent of PEFT: W' = W + (alpha/r) * B @ A for one fused module."""
    _merge(tiny, "lora", tmp_path / "merged")
    base = load_file(tiny / "model" / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    ad = load_file(tiny / "adapters" / "lora" / "adapter_model.safetensors")
    cfg = json.loads((tiny / "adapters" / "lora" / "adapter_config.json").read_text())
    key = "model.layers.1.self_attn.qkv_proj.weight"
    a = ad["base_model.model.model.layers.1.self_attn.qkv_proj.lora_A.weight"]
    b = ad["base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight"]
    expect = base[key] + (cfg["lora_alpha"] / cfg["r"]) * (b @ a)
    np.testing.assert_allclose(merged[key], expect, atol=1e-6)


def test_noop_adapter_is_refused(tiny, tmp_path):
    with pytest.raises(errors.MergeProofError, match="changes nothing.*--allow-noop-adapter"):
        _merge(tiny, "noop", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_noop_adapter_allowed_on_request(tiny, tmp_path):
    proof = _merge(tiny, "noop", tmp_path / "merged", allow_noop=True)
    assert proof.max_abs_vs_base <= proof.tolerance


def test_half_precision_checkpoints_are_scored_in_fp32(tiny):
    """A bf16 checkpoint's proof and reference run with fp32 arithmetic on its bf16 weights: closer to exact
    than bf16 arithmetic, weights left in bf16, torch's modules restored afterwards."""
    import torch
    from transformers import AutoModelForCausalLM

    from phiedge.checks import probes
    from phiedge.checks.reference import fp32_compute, last_logits
    ids = probes.make(tiny / "model", None)[0].ids[:96]
    exact = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    half = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want = exact(input_ids=torch.tensor([ids])).logits[0].numpy()
        bf16_math = half(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    fp32_math = last_logits(half, ids)
    keep = probes.COMPARE_LAST
    assert fp32_math.shape == want[-keep:].shape
    assert np.abs(fp32_math - want[-keep:]).max() < 0.5 * np.abs(bf16_math - want)[-keep:].max()
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    forward = torch.nn.Linear.forward
    with fp32_compute():
        assert torch.nn.Linear.forward is not forward
    assert torch.nn.Linear.forward is forward


def test_fp32_compute_upcasts_large_weights_in_slices(tiny, monkeypatch):
    """Sliced upcasting (Phi-4-mini's LM head would otherwise be a 2.4 GB fp32 copy) gives the same logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from phiedge import torch_compute
    from phiedge.checks import probes, reference
    ids = probes.make(tiny / "model", None)[0].ids[:96]
    half = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.bfloat16).eval()
    whole = reference.last_logits(half, ids)
    lm_head_fp32 = half.lm_head.weight.numel() * 4
    monkeypatch.setattr(torch_compute, "UPCAST_SLICE_BYTES", lm_head_fp32 // 7)  # every large matrix in 7+ slices
    sliced = reference.last_logits(half, ids)
    assert np.abs(sliced - whole).max() < 1e-4


def test_merge_leaves_the_base_files_untouched(tiny, tmp_path):
    """The merge adds the adapter into the base's weights in place, in a private memory map of its files."""
    import hashlib
    files = sorted((tiny / "model").glob("*.safetensors"))
    before = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    proof = _merge(tiny, "lora", tmp_path / "merged")
    assert proof.max_abs_vs_peft <= proof.tolerance < proof.max_abs_vs_base
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == before

