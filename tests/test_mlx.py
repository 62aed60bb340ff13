"""MLX-specific behaviour on the session build's MLX artifacts: the gate catching what stock mlx-lm gets wrong
(its rope in the short regime, a chunked prefill across the switch), the folder running in plain mlx-lm, and
transformers 5's config layout (the contract common to all runtimes is tests/test_runtimes.py).

Cost (2 cores): MLX's CPU backend is slow (0.32.4: ~3 GFLOP/s matmuls, a 4200-token attention ~33 s per layer;
a 4200-token prefill of this 2-layer model ~95 s), which is why the suite's fixture switches at 1024
(tests/conftest.py SWITCH): the long probe is 1128 tokens, ~12 s."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import ROOT, run_cli
from phiedge import chat
from phiedge.checks import Limits, probes
from phiedge.checks.metrics import compare, failures
from phiedge.runtimes import get

pytestmark = pytest.mark.mlx


def test_stock_mlx_lm_fails_the_short_regime(session):
    """mlx-lm's own SuScaledRoPE (0.31.3, 0.32.x) rotates every prompt with the long factors: plain `mlx_lm.load`
    on our artifact is wrong below the switch (measured top1 0.42, max|Δ| 8.9), ours matches."""
    import mlx.core as mx
    import mlx_lm
    path, reference = session.artifact("mlx", "fp16"), session.reference
    model, _ = mlx_lm.load(str(path))
    ids = reference["short_ids"].tolist()
    stock = np.array(model(mx.array([ids]))[0, -probes.COMPARE_LAST:].astype(mx.float32))
    limits = Limits.for_precision("fp16")
    assert failures("short", compare(reference["short_logits"], stock), limits)
    ours = get("mlx").load(path)
    assert ours.patched_layers == len(model.layers)
    assert not failures("short", compare(reference["short_logits"], ours.logits(ids, probes.COMPARE_LAST)), limits)


def test_gate_catches_a_chunked_prefill_across_the_switch(session):
    """With the right rope, prefilling the long probe in steps as mlx-lm's `generate` does (2048 tokens a step,
    half of Phi-4-mini's switch; half of the fixture's here) rotates the keys before the switch with the short
    factors (each step's offset + length stays below it): the gate must fail that. Our runtime prefills in one
    call (its long result passed the build's gate)."""
    import mlx.core as mx
    rt = get("mlx").load(session.artifact("mlx", "fp16"))
    ids = session.reference["long_ids"].tolist()
    step = session.switch // 2
    cache = rt.make_prompt_cache(rt.model)
    for i in range(0, len(ids), step):
        out = rt.model(mx.array([ids[i:i + step]]), cache=cache)
    chunked = np.array(out[0, -probes.COMPARE_LAST:].astype(mx.float32))
    rope = rt.model.layers[0].self_attn.rope
    assert rope.calls == {"short": 4, "long": 2}      # queries and keys: two rope calls per model call
    wrong = compare(session.reference["long_logits"], chunked)
    assert failures("long", wrong, Limits.for_precision("fp16")), wrong


def test_plain_mlx_lm_runs_the_folder_with_our_tokens(session):
    """The folder is a normal mlx-lm model: `mlx_lm.load` + `mlx_lm.generate` run it, its tokenizer and chat
    template give Hugging Face's ids."""
    import mlx_lm
    path = session.artifact("mlx", "4bit")
    model, tok = mlx_lm.load(str(path))
    messages = [{"role": "system", "content": "Context: x = 3.5 (see __init__)."},
                {"role": "user", "content": "Don't guess — what's  x?\n"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    hf = Tokenizer.from_file(str(path / "tokenizer.json"))
    template, specials = chat.load_template(path)
    want = hf.encode(chat.render(template, messages, specials), add_special_tokens=False).ids
    assert list(prompt) == want
    rt = get("mlx").load(path)
    assert rt.chat_ids(messages) == want
    assert isinstance(mlx_lm.generate(model, tok, prompt, max_tokens=4), str)


def test_transformers5_config_layout_reaches_mlx_lm():
    """transformers 5 nests rope_theta, partial_rotary_factor and the LongRoPE factors in `rope_parameters`;
    mlx-lm's own ModelArgs sees none of them unless the exporter lifts them to the published keys."""
    from mlx_lm.models.phi3 import ModelArgs
    from transformers import Phi3Config

    from phiedge.exporters.mlx import published_layout
    from phiedge.runtimes.mlx import longrope_params
    published = json.loads((ROOT / "scripts" / "phi4-mini-instruct.config.json").read_text())
    published["rope_theta"] = 250000.0                   # a non-default theta, so a fallback to 10000 shows
    nested = Phi3Config(**published).to_dict()
    assert "rope_theta" not in nested and "rope_scaling" not in nested      # what a transformers 5 save writes
    stock = ModelArgs.from_dict(nested)
    assert stock.rope_theta == 10000 and stock.rope_scaling is None         # mlx-lm alone: silently wrong
    fixed = ModelArgs.from_dict(published_layout(nested))
    assert fixed.rope_theta == 250000.0 and fixed.partial_rotary_factor == 0.75
    assert fixed.rope_scaling["type"] == "longrope"
    assert fixed.rope_scaling["short_factor"] == published["rope_scaling"]["short_factor"]
    assert fixed.rope_scaling["long_factor"] == published["rope_scaling"]["long_factor"]
    lr = longrope_params(published_layout(nested))
    assert lr["base"] == 250000.0 and lr["original_max_position_embeddings"] == 4096
    assert published_layout(published)["rope_theta"] == 250000.0             # a published layout is kept


def test_cli_group_size_applies_to_every_quantized_precision():
    from phiedge.targets import resolve_plan
    plan, _ = resolve_plan(None, ["mlx"], {"mlx": (["fp16", "4bit", "4bit-g32"], {"group": "g128"})})
    assert plan == {"mlx": ["fp16", "4bit-g128", "4bit-g32"]}
    plan, profile = resolve_plan("apple-silicon", [], {"mlx": ([], {"group": "g32"})})   # on a profile's rows
    assert plan["mlx"] == ["4bit-g32"] and profile.name == "apple-silicon"
    r = run_cli("build", "--model", "unused", "--formats", "mlx", "--mlx-quant", "fp16", "--mlx-group-size", "32",
                "--gguf-quant", "F16", "--out", "/nonexistent/o")
    assert r.returncode == 1 and "--gguf-quant is given but gguf is not in --formats" in r.stderr
