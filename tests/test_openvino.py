"""OpenVINO end to end on real OpenVINO GenAI: build fp16 + data-aware int4 from the tiny Phi-4-mini with its LoRA
merged (calibrated on the build's own documents), gate parity in both LongRoPE regimes, and check what the
exporter and the runtime refuse, the device fallback, and that the device path needs no torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from phiedge import build, chat, errors, exporters, probes
from phiedge.exporters import _ov_export
from phiedge.runtimes import RuntimeSettings, get
from conftest import artifact_dir, run_cli, assert_pytorch_tokens

pytestmark = pytest.mark.openvino
PRECISIONS = ["fp16", "int4"]


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    """A few documents from Python's own reference text (always present): retriever and int4 calibration."""
    from pydoc_data.topics import topics
    d = tmp_path_factory.mktemp("ov-docs")
    for name in ("with", "for", "try", "class"):
        (d / f"{name}.txt").write_text(topics[name])
    return d


@pytest.fixture(scope="module")
def built(tiny, docs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("openvino")
    r = run_cli("build", "--model", str(tiny / "model"), "--adapter", str(tiny / "adapters/lora"),
                "--formats", "openvino", "--ov-weights", ",".join(PRECISIONS), "--docs", str(docs),
                "--out", str(root / "dist"), "--cache-dir", str(root / "stages"), "--threads", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PASS" in r.stdout
    return root / "dist"


def test_every_precision_passes_both_regimes(built):
    rep = json.loads((built / "report.json").read_text())
    assert rep["passed"] is True
    arts = [a for a in rep["artifacts"] if a["format"] == "openvino"]
    assert [a["precision"] for a in arts] == PRECISIONS
    for a in arts:
        assert a["passed"] and not a["failures"], a["failures"]
        for regime in ("short", "long"):
            assert a["parity"][regime]["positions"] == probes.COMPARE_LAST
        folder = built / a["path"]
        for f in ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml",
                  "chat_template.jinja", "generation_config.json", "phiedge_openvino.json"):
            assert (folder / f).is_file(), f
        assert a["meta"]["cpu_properties"]["INFERENCE_PRECISION_HINT"] == "f32"
        assert a["meta"]["export_seconds"] > 0
        if a["smoke"]["agreement_min"] is not None:
            assert a["smoke"]["agreement"] >= a["smoke"]["agreement_min"]
    fp16, int4 = arts
    for regime in ("short", "long"):    # measured 0.0053 / 0.0084; OpenVINO's own fp16 IR (rope in fp16): 0.15 / 2.31, top1 0.86 long
        m = fp16["parity"][regime]
        assert m["top1"] == 1.0 and m["max_abs"] < 0.05 and m["kl"] < 1e-5, (regime, m)
    assert_pytorch_tokens(fp16["greedy"])
    assert_pytorch_tokens(fp16["smoke"])
    c = int4["meta"]["compression"]     # plain int4 with --docs: AWQ + scale estimation on the documents
    assert c["awq"] and c["scale_estimation"] and c["calibration_samples"] > 0 and c["group_size"] == 128
    assert int4["size_bytes"] < 0.45 * fp16["size_bytes"]


def test_tokenizer_and_template_match_hugging_face(built, tiny):
    rt = get("openvino").load(artifact_dir(built, "openvino", "int4"))
    hf = Tokenizer.from_file(str(tiny / "model" / "tokenizer.json"))
    template, specials = chat.load_template(tiny / "model")
    messages = [{"role": "system", "content": "Context: x = 3.5 (see __init__)."},
                {"role": "user", "content": "Don't guess — what's  x?\n"}]
    text = chat.render(template, messages, specials)
    assert rt.chat_ids(messages) == hf.encode(text, add_special_tokens=False).ids
    assert {hf.token_to_id("<|end|>"), hf.token_to_id("<|endoftext|>")} <= rt.stop_ids()
    gen = rt.generate(messages, max_new_tokens=48)
    assert gen.prompt_tokens > 5 and gen.ids and not set(gen.ids) & rt.stop_ids()
    rt.close()


def test_device_fallback_is_recorded(built):
    """intel-gpu / intel-npu profiles ask for GPU / NPU with fallback CPU; this machine has only a CPU."""
    import openvino as ov
    if "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an NPU")
    rt = get("openvino").load(artifact_dir(built, "openvino", "int4"), RuntimeSettings(device="NPU", extra={"fallback": "CPU"}))
    assert (rt.device, rt.fallback_from) == ("CPU", "NPU")
    assert rt.logits(list(range(1, 9)), 2).shape == (2, 2048)
    rt.close()
    from phiedge import device, targets   # the device path passes the profile's fallback through
    profile = {"target": targets.load("intel-npu").as_dict()}
    rt = get("openvino").load(artifact_dir(built, "openvino", "int4"), device._settings(profile, 2, cap_context=False))
    assert (rt.device, rt.fallback_from) == ("CPU", "NPU")
    rt.close()
    with pytest.raises(errors.ToolchainError, match="device 'NPU' is not on this machine"):
        get("openvino").load(artifact_dir(built, "openvino", "int4"), RuntimeSettings(device="NPU", extra={"fallback": None}))
    with pytest.raises(errors.UsageError, match="no device 'TPU': known are CPU, GPU, NPU"):
        get("openvino").load(artifact_dir(built, "openvino", "int4"), RuntimeSettings(device="TPU"))


# Weight formats the exporter refuses before any work, with the part of the message that names the problem.
REFUSED = [
    ("int3", "no weight format 'int3': known are fp32, fp16, int8, int4"),   # unknown base
    ("int4-g48", "unknown int4 option 'g48'"),                               # group size not in the table
    ("fp16-sym", "only int4 takes options"),                                 # options on a float format
    ("int4-g64-g128", "'g64' and 'g128' both set the group"),                # two values for one option
    ("int4-r0", "must be r1..r100"),                                         # no weights in int4
    ("int4-rtn-se", "'rtn' is data-free, 'se' needs data"),                  # contradictory algorithms
]


@pytest.mark.parametrize("spec,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_weight_formats(spec, message):
    with pytest.raises(errors.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build.plan_formats(["openvino"], {"openvino": [spec]})


def test_canonical_names_and_targets():
    exp = exporters.get("openvino")
    assert exp.check_precisions(["FP16", "int4-g128-asym-r100", "int4", "int4-se-sym-r80-g64"]) == [
        "fp16", "int4", "int4-g64-sym-r80-se"]
    assert build.plan_formats(["openvino"], {}) == {"openvino": ["int4"]}
    from phiedge import targets
    for name in ("intel-cpu", "intel-gpu", "intel-npu", "all"):
        plan = targets.load(name).plan()
        assert build.plan_formats(["openvino"], plan)["openvino"] == plan["openvino"]


def test_data_aware_options_need_documents(tmp_path):
    with pytest.raises(errors.UsageError, match="need calibration text: pass --docs"):
        exporters.get("openvino").export(tmp_path / "unused", tmp_path / "out", ["int4-awq"], {})
    assert not (tmp_path / "out").exists(), "nothing is built before the checks pass"


def test_group_size_is_lowered_to_one_that_divides():
    assert _ov_export.choose_group_size(128, [3072, 8192]) == 128          # real Phi-4-mini
    assert _ov_export.choose_group_size(128, [576, 1536]) == 64            # SmolLM2-135M (FIELD-NOTES)
    assert _ov_export.choose_group_size(-1, [577]) == -1


def test_cli_refuses_in_one_line(tmp_path):
    r = run_cli("build", "--model", "unused", "--formats", "openvino", "--ov-weights", "fp16,int3",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: openvino has no weight format 'int3': known are fp32, fp16, int8, int4 (int4 takes options, "
        "e.g. int4-g64-sym-r80-awq) (set PHIEDGE_DEBUG=1 for the traceback)"]


def test_device_path_imports_no_torch(built):
    """Loading, scoring and chatting on the OpenVINO artifact needs openvino(-genai) only: no torch, no transformers."""
    ref = np.load(built / "golden.npz")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from phiedge.runtimes import get\n"
        f"rt = get('openvino').load(Path({str(artifact_dir(built, 'openvino', 'int4'))!r}))\n"
        f"ids = {ref['short_ids'].tolist()!r}\n"
        "assert rt.logits(ids, 4).shape[0] == 4\n"
        "g = rt.generate([{'role': 'user', 'content': 'What does pass do?'}], max_new_tokens=4)\n"
        "assert g.prompt_tokens > 0 and g.ids\n"
        "bad = [m for m in ('torch', 'transformers', 'optimum', 'nncf') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
