"""LoRA adapters kept separate from their base (--adapter-mode separate): PEFT's per-module scaling folded into
lora_B, a build of two adapters on llama.cpp proving every (base artifact, adapter) pair, ask / validate picking
them, switching in place, and what cannot be kept separate refused up front. (Several adapters merged:
tests/test_bundle.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

from phiedge import errors
from phiedge.checks import probes
from phiedge.runtimes import RuntimeSettings, get
from conftest import DEMO, build_args, run_cli

pytestmark = pytest.mark.gguf


def test_peft_scaling_is_folded_per_module_as_peft_computes_it(tiny, tmp_path):
    """rsLoRA with a rank_pattern and an alpha_pattern: every module's folded scale equals the `scaling` PEFT
    itself gives that module, and the folded copy's lora_B is the original times it."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from phiedge.adapters import A_SUFFIX, B_SUFFIX, PREFIX, fold_scales
    src = tiny / "adapters" / "rslora"
    scales = fold_scales(src, tmp_path / "folded", "llama.cpp")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny / "model"), src)
    theirs = {n.removeprefix(PREFIX): m.scaling["default"] for n, m in peft.named_modules()
              if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}      # LoRA layers
    assert theirs and set(scales) == set(theirs) and len(set(scales.values())) > 1      # the patterns differ
    assert all(abs(scales[k] - theirs[k]) < 1e-12 for k in theirs), (scales, theirs)
    before, after = load_file(src / "adapter_model.safetensors"), load_file(tmp_path / "folded" / "adapter_model.safetensors")
    cfg = json.loads((tmp_path / "folded" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 0 and not cfg["use_rslora"] and not cfg["rank_pattern"] and not cfg["alpha_pattern"]
    for k, s in scales.items():
        torch.testing.assert_close(after[PREFIX + k + B_SUFFIX], before[PREFIX + k + B_SUFFIX].float() * s)
        torch.testing.assert_close(after[PREFIX + k + A_SUFFIX], before[PREFIX + k + A_SUFFIX].float())


def test_dora_cannot_be_kept_separate_on_llama_cpp(tiny, tmp_path):
    from phiedge.exporters.gguf import GGUFExporter
    with pytest.raises(errors.UnsupportedAdapterError, match="DoRA.*--adapter-mode merged"):
        GGUFExporter().export_adapter(tiny / "model", tiny / "adapters" / "dora", tmp_path)
    assert not list(tmp_path.glob("*.gguf"))


@pytest.fixture(scope="module")
def separate(tiny, tmp_path_factory):
    """--adapter-mode separate with two adapters (plain LoRA, and rsLoRA with rank and alpha patterns: the scaling
    folded into each lora_B must be PEFT's per module), GGUF Q8_0: (bundle, the build's stderr)."""
    root = tmp_path_factory.mktemp("separate")
    out = root / "sep"
    r = run_cli(*build_args(tiny, out, root / "cache", {"gguf": ["Q8_0"]}, "--adapter",
                            f"rs={tiny / 'adapters' / 'rslora'}", "--adapter-mode", "separate"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr


def test_separate_adapters_build_proves_every_pair_and_ask_and_validate_pick_them(separate):
    """One base GGUF per precision, each adapter's llama.cpp file, and every (base artifact, adapter) pair through
    the gate in both regimes against that adapter's merged model."""
    out, stderr = separate
    m = json.loads((out / "manifest.json").read_text())
    rows = [(a["path"], a["adapter"], a["adapter_path"], a["golden"]) for a in m["artifacts"]]
    assert rows == [("gguf-Q8_0", a, f"adapters/{a}/gguf", f"golden@{a}.npz") for a in ("lora", "rs")]
    assert all(a["passed"] and a["parity"]["long"]["top1"] > 0 for a in m["artifacts"])
    for f in ("gguf-Q8_0/model.gguf", "adapters/lora/gguf/adapter.gguf",
              "adapters/rs/gguf/adapter.gguf", "golden@lora.npz", "golden@rs.npz"):
        assert f in m["files"], f
    assert not any("@" in f.split("/")[0] and not f.startswith("golden") for f in m["files"])   # no merged copies
    rep = json.loads((out / "report.json").read_text())
    sep = rep["separate"]
    assert sep["adapter_bytes"] < sep["base_bytes"] / 4 and sep["merged_copies_bytes"] == 2 * sep["base_bytes"]
    ran = [line.split("  ")[0][2:] for line in stderr.splitlines() if line.startswith("✓ ")]
    assert {"merge@lora", "merge@rs", "export gguf", "adapter gguf@lora", "adapter gguf@rs",
            "check gguf Q8_0+lora", "check gguf Q8_0+rs"} <= {n.strip() for n in ran}, ran
    ok = run_cli("ask", str(out), DEMO["question"], "--max-tokens", "4", "--adapter", "rs", "--runtime", "gguf")
    assert ok.returncode == 0 and "(gguf Q8_0+rs:" in ok.stderr, ok.stderr
    v = run_cli("validate", str(out), "--adapter", "lora", "--artifact", "gguf-Q8_0")
    assert v.returncode == 0, v.stderr
    dev = json.loads(out.with_name("sep.device-report.json").read_text())
    done = [a for a in dev["artifacts"] if a["status"] != "not validated"]
    assert [(a["path"], a["adapter"], a["status"]) for a in done] == [("gguf-Q8_0", "lora", "passed")]
    assert run_cli("verify", str(out)).returncode == 0


def test_separate_adapters_switch_in_place_as_a_fresh_process_would(separate):
    """On the bundle's base: adapter A, then B, then none, in one process, give bit for bit the logits a fresh
    load with only that adapter gives (llama.cpp keeps adapters per context: they follow the regime switch)."""
    out, _ = separate
    golden = np.load(out / "golden@lora.npz")
    base, ids, long_ids = out / "gguf-Q8_0", golden["short_ids"].tolist(), golden["long_ids"].tolist()

    def logits(rt):
        return rt.logits(ids, probes.COMPARE_LAST), rt.logits(long_ids, probes.COMPARE_LAST)

    def fresh(kind):
        rt = get("gguf").load(base, RuntimeSettings(threads=1, extra={"adapter": str(out / "adapters" / kind / "gguf")}
                                                    if kind else {}))
        try:
            return logits(rt)
        finally:
            rt.close()
    rt = get("gguf").load(base, RuntimeSettings(threads=1))
    try:
        switched = {}
        for kind in ("lora", "rs", None):
            rt.use_adapter(out / "adapters" / kind / "gguf" if kind else None)
            switched[kind] = logits(rt)
    finally:
        rt.close()
    for kind, got in switched.items():
        want = fresh(kind)
        assert all((g == w).all() for g, w in zip(got, want)), kind
    assert abs(switched["lora"][0] - switched[None][0]).max() > 1e-2
    assert abs(switched["rs"][0] - switched["lora"][0]).max() > 1e-2


def test_separate_dora_is_refused_up_front_in_one_line(tiny, tmp_path):
    r = run_cli("build", "--model", str(tiny / "model"), "--adapter", f"d={tiny / 'adapters' / 'dora'}",
                "--adapter-mode", "separate", "--formats", "gguf", "--out", str(tmp_path / "out"))
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(lines) == 1 and "DoRA" in lines[0] and "--adapter-mode merged" in lines[0]
    assert not (tmp_path / "out").exists()
