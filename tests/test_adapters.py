"""LoRA adapters kept separate from their base (--adapter-mode separate): PEFT's per-module scaling folded into
lora_B, a build of two adapters on llama.cpp proving every (base artifact, adapter) pair, ask / validate picking
them, switching in place, and what cannot be kept separate refused up front. (Several adapters merged:
tests/test_bundle.py.)"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import ADAPTER_FILES, DEMO, ROOT, SEPARATE, build_args, run_cli, stage_lines
from phiedge import errors, rag
from phiedge.checks import probes
from phiedge.runtimes import RuntimeSettings, get

MESSAGES = [{"role": "user", "content": "What does the with statement do?"}]


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


@pytest.mark.gguf
def test_dora_cannot_be_kept_separate_on_llama_cpp(tiny, tmp_path):
    from phiedge.exporters.gguf import GGUFExporter
    with pytest.raises(errors.UnsupportedAdapterError, match="DoRA.*--adapter-mode merged"):
        GGUFExporter().export_adapter(tiny / "model", tiny / "adapters" / "dora", tmp_path)
    assert not list(tmp_path.glob("*.gguf"))


def test_separate_adapters_build_proves_every_pair_and_ask_and_validate_pick_them(separate):
    """One base artifact per format and precision, each adapter's own runtime file per format, and every (base
    artifact, adapter) pair through the gate in both regimes against that adapter's merged model."""
    out, stderr, formats, _ = separate
    m = json.loads((out / "manifest.json").read_text())
    rows = [(a["path"], a["adapter"], a["adapter_path"], a["golden"]) for a in m["artifacts"]]
    assert sorted(rows) == sorted((f"{f}-{p[0]}", a, f"adapters/{a}/{f}", f"golden@{a}.npz")
                                  for f, p in formats.items() for a in ("lora", "rs"))
    assert all(a["passed"] and a["parity"]["long"]["top1"] > 0 for a in m["artifacts"])
    for f in ("golden@lora.npz", "golden@rs.npz", *(f"adapters/{a}/{f}/{ADAPTER_FILES[f]}" for f in formats
                                                    for a in ("lora", "rs"))):
        assert f in m["files"], f
    # rs's own chat template travels with it, on every format; lora's tokenizer files equal the base's
    assert {f for f in m["files"] if f.endswith("chat_template.jinja") and f.startswith("adapters/")} == \
        {f"adapters/rs/{f}/chat_template.jinja" for f in formats}
    assert {(a["adapter"], a["tokenizer"]["source"]) for a in m["artifacts"]} == {("lora", "base"), ("rs", "adapter")}
    assert not any("@" in f.split("/")[0] and not f.startswith("golden") for f in m["files"])   # no merged copies
    rep = json.loads((out / "report.json").read_text())
    sep = rep["separate"]
    assert sep["adapter_bytes"] < sep["base_bytes"] / 4 and sep["merged_copies_bytes"] == 2 * sep["base_bytes"]
    stages = stage_lines(stderr)
    assert stages["merge@lora"] and "merge@rs" in stages, stages      # the session's merge, from its cache
    for f, (p,) in formats.items():
        assert {f"export {f} {p}", f"adapter {f}@lora", f"adapter {f}@rs", f"check {f} {p}+lora",
                f"check {f} {p}+rs"} <= set(stages), (f, stages)
        ok = run_cli("ask", str(out), DEMO["question"], "--max-tokens", "4", "--adapter", "rs", "--runtime", f)
        assert ok.returncode == 0 and f"({f} {p}+rs:" in ok.stderr, ok.stderr
    v = run_cli("validate", str(out), "--adapter", "lora", "--artifact", "gguf-Q8_0")
    assert v.returncode == 0, v.stderr
    dev = json.loads(out.with_name("sep.device-report.json").read_text())
    done = [a for a in dev["artifacts"] if a["status"] != "not validated"]
    assert [(a["path"], a["adapter"], a["status"]) for a in done] == [("gguf-Q8_0", "lora", "passed")]
    assert run_cli("verify", str(out)).returncode == 0
    base = out / f"gguf-{formats['gguf'][0]}"          # Ollama: a Modelfile per adapter beside the base GGUF
    for a in ("lora", "rs"):
        text = (base / f"Modelfile.{a}").read_text()
        assert "FROM ./model.gguf\n" in text and f"ADAPTER ../adapters/{a}/gguf/{ADAPTER_FILES['gguf']}\n" in text
        assert (base / f"../adapters/{a}/gguf/{ADAPTER_FILES['gguf']}").resolve().is_file()
        # rs's template is its own and not Phi-4-mini's: Ollama would prompt it with the base's, and it says so
        assert ("TEMPLATE" in text.replace("No TEMPLATE", "")) == (a == "lora")
        assert ("adapter's own chat template" in text) == (a == "rs")


def test_an_openvino_base_for_adapters_is_compressed_without_awq(separate, session):
    """AWQ rescales the inputs a LoRA reads (phiedge.exporters.openvino BASE_SETTINGS): the base kept for adapters
    is int4 without it, the merged int4 of the session build keeps its data-free AWQ."""
    out, _, formats, _ = separate
    if "openvino" not in formats:
        pytest.skip("openvino is not installed")
    def awq(folder):
        return json.loads((folder / "phiedge_openvino.json").read_text())["compression"]["awq"]
    assert awq(out / f"openvino-{formats['openvino'][0]}") is None
    assert awq(session.bundle / "openvino-int4") == "data-free"


def test_a_third_adapter_runs_only_its_own_stages(tiny, separate, tmp_path):
    """The bundle's build again with one more adapter (the plain LoRA at half its strength: another fine-tune of
    the same shape, scripts/bench.py's second adapter), on llama.cpp: the base export and the first two adapters'
    stages come from the cache, and only the new adapter is converted, merged for its reference and checked."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import second_adapter
    _, _, _, cache = separate
    third = second_adapter(tiny / "adapters" / "lora", tmp_path / "half")
    r = run_cli(*build_args(tiny, tmp_path / "sep3", cache, {"gguf": SEPARATE["gguf"]}, "--adapter",
                            f"rs={tiny / 'adapters' / 'rslora'}", "--adapter", f"half={third}",
                            "--adapter-mode", "separate"))
    assert r.returncode == 0, r.stderr[-3000:]
    ran = {name for name, cached in stage_lines(r.stderr).items() if not cached}
    assert ran - {"resolve", "hash inputs", "bundle"} == {"merge@half", "smoke reference@half", "adapter gguf@half",
                                                          f"check gguf {SEPARATE['gguf'][0]}+half"}, ran
    rows = json.loads((tmp_path / "sep3" / "report.json").read_text())["artifacts"]
    assert sorted(a["adapter"] for a in rows) == ["half", "lora", "rs"] and all(a["passed"] for a in rows)


@pytest.mark.parametrize("fmt", list(SEPARATE))
def test_separate_adapters_switch_in_place_as_a_fresh_process_would(separate, tiny, fmt):
    """On the bundle's base: adapter A, then B, then none, in one process, give bit for bit the logits and the
    greedy answer a fresh load with only that adapter gives. The long probe too on llama.cpp, which keeps
    adapters per context (phiedge's runtime opens a second context past the LongRoPE switch: the adapter must
    follow it); the others apply an adapter to the whole graph, whose long regime each pair's build gate proves.
    The chat prompt follows the adapter too: rs's own template (the one its gate references were built with)
    while rs is applied, the base's otherwise."""
    out, _, formats, _ = separate
    if fmt not in formats:
        pytest.skip(f"{fmt} is not installed")
    golden = np.load(out / "golden@lora.npz")
    base = out / f"{fmt}-{formats[fmt][0]}"
    probes_ = [golden["short_ids"].tolist()] + ([golden["long_ids"].tolist()] if fmt == "gguf" else [])

    def run(rt):
        return ([rt.logits(ids, probes.COMPARE_LAST) for ids in probes_],
                rt.generate_ids(probes_[0][-64:], 8, set()).ids, rt.chat_ids(MESSAGES))

    def folder(kind):
        return out / "adapters" / kind / fmt if kind else None

    def fresh(kind):
        rt = get(fmt).load(base, RuntimeSettings(threads=1, extra={"adapter": str(folder(kind))} if kind else {}))
        try:
            return run(rt)
        finally:
            rt.close()
    rt = get(fmt).load(base, RuntimeSettings(threads=1))
    try:
        switched = {}
        for kind in ("lora", "rs", None):
            rt.use_adapter(folder(kind))
            switched[kind] = run(rt)
    finally:
        rt.close()
    for kind, (logits, answer, prompt) in switched.items():
        want_logits, want_answer, want_prompt = fresh(kind)
        assert all((g == w).all() for g, w in zip(logits, want_logits)), kind
        assert answer == want_answer and prompt == want_prompt, kind
    own = rag.prompt_ids(tiny / "model", MESSAGES), rag.prompt_ids(tiny / "adapters" / "rslora", MESSAGES)
    assert own[0] != own[1] and [switched[k][2] for k in ("lora", "rs", None)] == [own[0], own[1], own[0]]
    assert abs(switched["lora"][0][0] - switched[None][0][0]).max() > 1e-2
    assert abs(switched["rs"][0][0] - switched["lora"][0][0]).max() > 1e-2


def test_chat_switches_adapters_kept_separate_in_place_through_a_pipe(separate):
    """`phiedge chat --adapter lora`, then `/adapter rs`, read from a pipe: each answer says which adapter gave it,
    and rs's answer after /reset is `ask --adapter rs`'s. In the library the switch is in place: the same loaded
    base answers with rs as a session opened on rs does."""
    import re

    import phiedge
    out, _, formats, _ = separate
    if "gguf" not in formats:
        pytest.skip("llama_cpp is not installed")
    q, opts = DEMO["question"], ("--runtime", "gguf", "--max-tokens", "8", "--threads", "1")
    r = run_cli("chat", str(out), "--adapter", "lora", *opts,
                input="\n".join([q, "And what does it need?", "/adapter rs", "/reset", q]) + "\n")
    assert r.returncode == 0, r.stderr
    label = f"gguf {formats['gguf'][0]}"
    assert re.findall(r"\((gguf [^:]+): \d+ prompt tokens", r.stderr) == [f"{label}+lora"] * 2 + [f"{label}+rs"]
    assert f"(now answering with {label}+rs)" in r.stderr
    answers = [a.strip() for a in re.split(r"^sources: .*\n", r.stdout, flags=re.M)]
    asked = run_cli("ask", str(out), q, "--adapter", "rs", *opts)
    assert asked.returncode == 0 and len(answers) == 4 and answers[2] == asked.stdout.split("\n\nsources:")[0].strip()
    one = [{"role": "user", "content": q}]
    with phiedge.open(out, runtime="gguf", adapter="lora", threads=1) as s:
        lora = s.chat(one, max_tokens=8)
        rt = s.runtime()
        s.use_adapter("rs")
        rs = s.chat(one, max_tokens=8)
        assert s.runtime() is rt and rs.runtime == f"{label}+rs" and lora.runtime == f"{label}+lora"
    with phiedge.open(out, runtime="gguf", adapter="rs", threads=1) as fresh:
        assert fresh.chat(one, max_tokens=8).text == rs.text == answers[2]


@pytest.mark.parametrize("fmt", ["gguf", "onnx", "openvino"])
def test_separate_dora_is_refused_up_front_in_one_line(tiny, tmp_path, fmt):
    """DoRA's magnitude vectors: llama.cpp, onnxruntime-genai and OpenVINO GenAI apply plain LoRA only."""
    r = run_cli("build", "--model", str(tiny / "model"), "--adapter", f"d={tiny / 'adapters' / 'dora'}",
                "--adapter-mode", "separate", "--formats", fmt, "--out", str(tmp_path / "out"))
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(lines) == 1 and "DoRA" in lines[0] and "--adapter-mode merged" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.mlx
def test_dora_kept_separate_on_mlx_is_peft_dora(tiny, tmp_path):
    """mlx-lm applies DoRA (DoRALinear: PEFT's magnitude over the adapted weight's row norms): the converted
    adapter on an MLX artifact of the base gives PEFT's DoRA logits (fp32: to rounding), and the base again
    without it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from phiedge.exporters.mlx import MLXExporter
    exp = MLXExporter()
    (art,) = exp.export(tiny / "model", tmp_path / "base", ["fp32"], {})
    files = exp.export_adapter(tiny / "model", tiny / "adapters" / "dora", tmp_path / "dora")
    assert json.loads((tmp_path / "dora" / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    ids = list(range(5, 200))
    model = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32)
    with torch.no_grad():
        base_ref = model(torch.tensor([ids])).logits[0, -8:].numpy()
        peft = PeftModel.from_pretrained(model, tiny / "adapters" / "dora").eval()
        ref = peft(torch.tensor([ids])).logits[0, -8:].numpy()
    rt = get("mlx").load(art.path, RuntimeSettings(threads=1, extra={"adapter": str(tmp_path / "dora")}))
    try:
        got = rt.logits(ids, 8)
        rt.use_adapter(None)
        base = rt.logits(ids, 8)
    finally:
        rt.close()
    assert files == ("adapters.safetensors", "adapter_config.json")
    assert abs(got - ref).max() < 1e-3 < abs(ref - base_ref).max(), (abs(got - ref).max(), abs(ref - base_ref).max())
    assert abs(base - base_ref).max() < 1e-3
