"""MLX end to end on mlx-lm's CPU backend: convert the tiny Phi-4-mini with its LoRA merged at fp16 and 4bit
through the CLI, gate parity in both LongRoPE regimes, and show the gate catching what stock mlx-lm gets wrong.

Cost (2 cores): MLX's CPU backend runs a 4200-token prefill of this 2-layer model in ~70-100 s (its fp16
matmuls and attention are slow on CPU), so the file runs four such prefills: the gate's fp16 and 4bit long
checks, and one chunked prefill for the regression test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from phiedge import build, chat, errors, parity, probes
from phiedge.runtimes import get
from conftest import artifact_dir, run_cli, assert_pytorch_tokens, ROOT

pytestmark = pytest.mark.mlx
PRECISIONS = ["fp16", "4bit"]


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlx")
    r = run_cli("build", "--model", str(tiny / "model"), "--adapter", str(tiny / "adapters/lora"),
                "--formats", "mlx", "--mlx-quant", ",".join(PRECISIONS), "--out", str(root / "dist"),
                "--cache-dir", str(root / "stages"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PASS" in r.stdout
    return root / "dist"


@pytest.fixture(scope="module")
def golden(built) -> dict:
    return dict(np.load(built / "golden.npz"))


@pytest.fixture(scope="module")
def reference(built) -> dict:
    """Full reference logits: the stage cache of the build holds them."""
    (ref,) = list((built.parent / "stages").glob("merge-*/reference.npz"))
    return dict(np.load(ref))


def test_every_precision_passes_both_regimes(built):
    rep = json.loads((built / "report.json").read_text())
    assert rep["passed"] is True
    arts = [a for a in rep["artifacts"] if a["format"] == "mlx"]
    assert [a["precision"] for a in arts] == PRECISIONS
    for a in arts:
        assert a["passed"] and not a["failures"], a["failures"]
        for regime in ("short", "long"):
            assert a["parity"][regime]["positions"] == probes.COMPARE_LAST
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            assert (built / a["path"] / f).is_file(), f
    fp16, q4 = arts
    for regime in ("short", "long"):            # measured 0.030 / 0.034 max|Δ|, KL 5e-6
        m = fp16["parity"][regime]
        assert m["top1"] == 1.0 and m["max_abs"] < 0.1 and m["kl"] < 1e-4, (regime, m)
        assert q4["parity"][regime]["kl"] < 0.02, q4["parity"]   # 8-bit embedding: 0.0059 / 0.010
    assert_pytorch_tokens(fp16["greedy"])
    assert q4["meta"]["embedding_bits"] == 8 and q4["meta"]["quantization"]["group_size"] == 64
    assert q4["size_bytes"] < 0.5 * fp16["size_bytes"]


def test_stock_mlx_lm_fails_the_short_regime(built, reference):
    """mlx-lm's own SuScaledRoPE (0.31.3, 0.32.x) rotates every prompt with the long factors: plain `mlx_lm.load`
    on our artifact is wrong below the switch (measured top1 0.42, max|Δ| 8.9), ours matches."""
    import mlx.core as mx
    import mlx_lm
    path = artifact_dir(built, "mlx", "fp16")
    model, _ = mlx_lm.load(str(path))
    ids = reference["short_ids"].tolist()
    stock = np.array(model(mx.array([ids]))[0, -probes.COMPARE_LAST:].astype(mx.float32))
    limits = parity.thresholds_for("fp16")
    assert parity.failures("short", parity.compare(reference["short_logits"], stock), limits)
    ours = get("mlx").load(path)
    assert ours.patched_layers == len(model.layers)
    assert not parity.failures("short", parity.compare(reference["short_logits"],
                                                       ours.logits(ids, probes.COMPARE_LAST)), limits)


def test_gate_catches_a_chunked_prefill_across_the_switch(built, reference):
    """With the right rope, prefilling 4200 ids in mlx-lm `generate`'s 2048-token steps rotates the first 4096
    keys with the short factors (each step's offset + length stays below the switch): the gate must fail that.
    Our runtime prefills in one call (its long result passed the build's gate)."""
    import mlx.core as mx
    rt = get("mlx").load(artifact_dir(built, "mlx", "fp16"))
    ids = reference["long_ids"].tolist()
    cache = rt.make_prompt_cache(rt.model)
    for i in range(0, len(ids), 2048):
        out = rt.model(mx.array([ids[i:i + 2048]]), cache=cache)
    chunked = np.array(out[0, -probes.COMPARE_LAST:].astype(mx.float32))
    rope = rt.model.layers[0].self_attn.rope
    assert rope.calls == {"short": 4, "long": 2}      # queries and keys: two rope calls per model call
    wrong = parity.compare(reference["long_logits"], chunked)
    assert parity.failures("long", wrong, parity.thresholds_for("fp16")), wrong


def test_plain_mlx_lm_runs_the_folder_with_our_tokens(built, reference):
    """The folder is a normal mlx-lm model: `mlx_lm.load` + `mlx_lm.generate` run it, its tokenizer and chat
    template give Hugging Face's ids."""
    import mlx_lm
    path = artifact_dir(built, "mlx", "4bit")
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


def test_chat_generation_stops_at_end_token(built):
    rt = get("mlx").load(artifact_dir(built, "mlx", "fp16"))
    gen = rt.generate([{"role": "user", "content": "What does the with statement do?"}], max_new_tokens=48)
    assert gen.prompt_tokens > 5 and gen.ids and gen.text.strip()
    assert not set(gen.ids) & rt.stop_ids()


# Precision specs the exporter refuses before any work, with the part of the message that names the problem.
REFUSED = [
    ("int4", "no precision 'int4': known are fp32, fp16, bf16, 8bit, 4bit, mixed_4_6"),  # ONNX's name, not MLX's
    ("3bit", "no parity gate is measured"),                            # mlx-lm has it, no measured gate yet
    ("mixed_2_6", "no parity gate is measured"),                       # recipe offered by mlx-lm, no gate yet
    ("4bit-g48", "unknown option 'g48'"),                              # group size mlx-lm lacks
    ("fp16-g32", "only quantized precisions take options"),            # options on a float precision
    ("4bit-g32-g128", "'g32' and 'g128' both set the group"),          # two values for one option
]


@pytest.mark.parametrize("spec,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_precisions(spec, message):
    with pytest.raises(errors.UsageError, match=message):
        build.plan_formats(["mlx"], {"mlx": [spec]})


def test_canonical_names_drop_defaults():
    assert build.plan_formats(["mlx"], {"mlx": ["FP16", "4bit-g64-emb8", "4BIT", "4bit-emb4-g32"]}) == {
        "mlx": ["fp16", "4bit", "4bit-g32-emb4"]}
    assert build.plan_formats(["mlx"], {}) == {"mlx": ["4bit"]}


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


def test_cli_group_size_and_refusal(tmp_path):
    r = run_cli("build", "--model", "unused", "--formats", "mlx", "--mlx-quant", "fp16,5bit",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 1
    assert "mlx precision '5bit' is not offered" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    from phiedge.cli import _mlx_precisions
    assert _mlx_precisions(("fp16,4bit,4bit-g32",), "128") == ["fp16", "4bit-g128", "4bit-g32"]


def test_device_path_imports_no_torch(built, golden):
    """On a device without torch (simulated: `sys.modules['torch'] = None`, which also makes transformers see
    no torch), the MLX runtime loads, scores and chats. mlx-lm imports transformers for its tokenizer code."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from pathlib import Path\n"
        "from phiedge.runtimes import get\n"
        f"rt = get('mlx').load(Path({str(artifact_dir(built, 'mlx', '4bit'))!r}))\n"
        f"ids = {golden['short_ids'].tolist()!r}\n"
        "assert rt.logits(ids, 4).shape[0] == 4\n"
        "g = rt.generate([{'role': 'user', 'content': 'What does pass do?'}], max_new_tokens=4)\n"
        "assert g.prompt_tokens > 0\n"
        "assert sys.modules['torch'] is None\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'peft', 'accelerate', 'onnx_ir')"
        " and sys.modules[m] is not None]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
