"""OpenVINO-specific behaviour on the session build's OpenVINO artifacts: the device fallback, data-aware int4
needing documents, and the group size that must divide every layer width (the contract common to all runtimes is
tests/test_runtimes.py)."""
from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pytest

from conftest import DEMO_DOCS, THREADS, Build, assert_pytorch_tokens, run_cli
from phiedge import build, device, errors, exporters
from phiedge.checks import Limits, probes
from phiedge.checks.metrics import compare, failures
from phiedge.exporters import _ov_export
from phiedge.exporters import openvino as OPENVINO
from phiedge.exporters.openvino import EXACT_CPU
from phiedge.runtimes import RuntimeSettings, get

pytestmark = pytest.mark.openvino


def test_full_precision_smoke_answer_follows_pytorch(session):
    assert_pytorch_tokens(session.row("openvino", "fp16")["smoke"])


def test_device_fallback_is_recorded(session):
    """intel-gpu / intel-npu profiles ask for GPU / NPU with fallback CPU; this machine has only a CPU."""
    import openvino as ov
    if "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an NPU")
    path = session.artifact("openvino", "int4")
    rt = get("openvino").load(path, RuntimeSettings(device="NPU", extra={"fallback": "CPU"}))
    assert (rt.device, rt.fallback_from) == ("CPU", "NPU")
    assert rt.logits(list(range(1, 9)), 2).shape == (2, 2048)
    rt.close()
    from phiedge import device, targets  # the device path passes the profile's fallback through
    profile = {"target": targets.load("intel-npu").as_dict()}
    rt = get("openvino").load(path, device.settings(profile, {}, 2, cap_context=False))
    assert (rt.device, rt.fallback_from) == ("CPU", "NPU")
    rt.close()
    with pytest.raises(errors.ToolchainError, match="device 'NPU' is not on this machine"):
        get("openvino").load(path, RuntimeSettings(device="NPU", extra={"fallback": None}))
    with pytest.raises(errors.UsageError, match="no device 'TPU': known are CPU, GPU, NPU"):
        get("openvino").load(path, RuntimeSettings(device="TPU"))


def test_data_aware_options_need_documents(tmp_path):
    with pytest.raises(errors.UsageError, match="need calibration text: pass --docs"):
        exporters.get("openvino").export(tmp_path / "unused", tmp_path / "out", ["int4-awq"], {})
    assert not (tmp_path / "out").exists(), "nothing is built before the checks pass"
    exp = exporters.get("openvino")
    assert exp.preflight(["int4-se"], calibration=False)
    assert exp.preflight(["int4-se", "int4"], calibration=True) == []


@pytest.fixture(scope="module")
def calibrated(tiny, tmp_path_factory):
    """The tiny model's PyTorch reference, and its docs-calibrated int4 variants beside optimum-cli's own int4
    (groups of 64, round to nearest: the sweep's anchor), exported in one job (one trace)."""
    from phiedge.checks import reference
    root = tmp_path_factory.mktemp("calibrated")
    model = tiny / "model"
    reference.reference(model, json.loads((model / "config.json").read_text()), root / "reference.npz")
    arts = exporters.get("openvino").export(model, root / "out", ["int4-g64-se", "int4-g64-rtn", "int4-g64-gptq"],
                                            {"calibration_text": build.calibration_text(DEMO_DOCS)})
    return dict(np.load(root / "reference.npz")), {a.precision: a for a in arts}


def _measure(ref, art):
    """Each regime's measurement of an artifact against the reference."""
    rt = get("openvino").load(art.path, RuntimeSettings(threads=int(THREADS)))
    try:
        return {r: compare(ref[f"{r}_logits"], rt.logits(ref[f"{r}_ids"].tolist(), probes.COMPARE_LAST))
                for r in ("short", "long")}
    finally:
        rt.close()


def test_docs_calibrated_int4_runs_awq_and_scale_estimation_on_them(calibrated):
    """Plain int4's AWQ is data-free (the session's int4: no documents read); int4-se calibrates on the build's
    documents: data-aware AWQ, then scale estimation over a capped sample of the same windows. It passes both
    regimes at int4's limits against PyTorch."""
    ref, arts = calibrated
    art = arts["int4-g64-se"]
    c = art.meta["compression"]
    assert (c["awq"], c["scale_estimation"], art.meta["calibration_documents"]) == ("data-aware", True, True), c
    assert 0 < c["calibration_samples"] <= 12 and c["scale_estimation_samples"] == min(8, c["calibration_samples"])
    for regime, m in _measure(ref, art).items():
        assert not failures(regime, m, Limits.for_precision("int4")), (regime, m)


def test_gptq_on_the_documents_beats_optimums_default_int4_at_its_size(calibrated):
    """-gptq: NNCF's GPTQ on the documents (after data-aware AWQ), against optimum-cli's own int4 at the same group
    size and bytes. In a sweep of this fixture, mean KL 0.0040 against 0.0101 (0.40x); on SmolLM2-135M + the demo
    LoRA 0.101 against 0.236 (0.43x)."""
    ref, arts = calibrated
    plain, gptq = arts["int4-g64-rtn"], arts["int4-g64-gptq"]
    c = gptq.meta["compression"]
    assert (c["gptq"], c["awq"], c["group_size"], gptq.meta["calibration_documents"]) == (True, "data-aware", 64, True)
    assert not plain.meta["compression"]["gptq"] and plain.meta["compression"]["awq"] is None
    assert gptq.size_bytes == pytest.approx(plain.size_bytes, rel=0.02)
    kl = {p: np.mean([m.kl for m in _measure(ref, arts[p]).values()]) for p in ("int4-g64-rtn", "int4-g64-gptq")}
    assert kl["int4-g64-gptq"] < 0.7 * kl["int4-g64-rtn"], kl


def test_group_size_is_lowered_to_one_that_divides():
    assert _ov_export.choose_group_size(128, [3072, 8192]) == 128          # real Phi-4-mini
    assert _ov_export.choose_group_size(128, [576, 1536]) == 64            # SmolLM2-135M's widths
    assert _ov_export.choose_group_size(-1, [577]) == -1


def test_letting_the_base_irs_pages_go_changes_no_byte(tiny_bf16, tmp_path, monkeypatch):
    """NNCF compresses the base IR's weights with their mapped pages let go as it goes (MappedPagesDropped: at
    full size 12.18 -> 7.51 GB). A page read again comes back from the file: the int4 IR is byte for byte the one
    compressed with every page kept, here with the pages let go every millisecond."""
    import functools
    import threading

    import openvino as ov

    from phiedge import pages
    base = tmp_path / "base"
    _ov_export.export_base(tiny_bf16, base)
    plan = OPENVINO.job_plan(OPENVINO.GRAMMAR.parse("int4"))
    drops = []

    class Counted(pages.MappedPagesDropped):
        def _loop(self):
            while not self._stop.wait(self.every):
                pages.drop_mapped_pages(self.suffix)
                drops.append(threading.get_ident())

    built = {}
    for name, dropper in (("kept", None), ("dropped", functools.partial(Counted, every=0.001))):
        monkeypatch.setattr(_ov_export, "MappedPagesDropped", dropper or (lambda suffix: contextlib.nullcontext()))
        out = tmp_path / name
        info = _ov_export.build_one(ov.Core(), base, out, plan, tiny_bf16, [])
        built[name] = (info, (out / "int4.partial" / "openvino_model.bin").read_bytes())
    assert len(drops) > 10, "the pages were not let go during the compression"
    assert built["dropped"][0] == built["kept"][0] and built["dropped"][1] == built["kept"][1]


def _weight_types(ir_xml) -> set[str]:
    import openvino as ov
    return {n.get_output_element_type(0).get_type_name() for n in ov.Core().read_model(str(ir_xml)).get_ordered_ops()
            if n.get_type_name() == "Constant" and n.get_output_partial_shape(0).is_static
            and n.get_output_shape(0) and len(n.get_output_shape(0)) == 2 and min(n.get_output_shape(0)) >= 64}


@pytest.fixture(scope="module")
def bf16_build(tiny_4k, tiny_bf16, tmp_path_factory) -> Build:
    """The bf16 tiny model (switching at Phi-4-mini's 4096: the distances fp16 errors grow with) + the LoRA:
    OpenVINO fp32, fp16 and int4 and GGUF Q4_K_M, two stages at a time (its checks side by side in pairs)."""
    root = tmp_path_factory.mktemp("bf16")
    r = run_cli("build", "--model", str(tiny_bf16), "--adapter", str(tiny_4k / "adapters" / "lora"),
                "--formats", "openvino,gguf", "--ov-weights", "fp32,fp16,int4", "--gguf-quant", "Q4_K_M",
                "--out", str(root / "bundle"), "--cache-dir", str(root / "cache"), "--threads", "1", "--jobs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    return Build(root / "bundle", root / "cache", r.stderr)


@pytest.mark.gguf
def test_a_bf16_checkpoint_is_exported_from_bf16_and_keeps_both_regimes(bf16_build):
    """Phi-4-mini is published in bf16: optimum loads it in bf16 (not an fp32 copy: 15.3 GB at full size) and
    traces in fp32, so the weights stay bf16 constants (the fp32 artifact keeps them: the same values) and the
    rope computes in f32. fp32, fp16 (exact from bf16 in their range) and int4 pass both LongRoPE regimes as the
    fp32 fixture's do, past Phi-4-mini's own switch. GGUF's Q4_K_M is quantized from a bf16 conversion (exact; an
    f32 one is twice the bytes)."""
    assert bf16_build.switch == 4096
    gguf = bf16_build.row("gguf", "Q4_K_M")
    assert gguf["passed"] and gguf["meta"]["converted_as"] == "bf16", gguf["meta"]
    rows = {a["precision"]: a for a in bf16_build.rows("openvino")}
    for regime in ("short", "long"):
        assert rows["fp32"]["parity"][regime]["max_abs"] < 1e-3, rows["fp32"]["parity"]
        fp16 = rows["fp16"]["parity"][regime]
        assert fp16["top1"] >= 0.95 and fp16["max_abs"] < 0.05, (regime, fp16)   # the fp32 fixture's bound
        assert rows["int4"]["passed"] and rows["int4"]["parity"][regime]["kl"] < 0.05
    assert _weight_types(bf16_build.artifact("openvino", "fp32") / "openvino_model.xml") == {"bf16"}
    assert _weight_types(bf16_build.artifact("openvino", "fp16") / "openvino_model.xml") == {"f16"}


@pytest.mark.gguf
def test_gate_catches_openvinos_own_fp16_ir(bf16_build, tmp_path):
    """optimum-intel's own fp16 IR (dtype="fp16") stores every constant in fp16, the rotary inverse frequencies
    too: its error grows with position. On the merged checkpoint the
    bf16 build checked, the gate fails its long regime at fp16's limits, and phiedge's fp16 (weights only, rope
    in f32) passes both; the long probe's span alone would not have caught it."""
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig
    ref, own = bf16_build.reference, tmp_path / "optimum-fp16"
    main_export(str(bf16_build.merged / "merged"), str(own), task="text-generation-with-past",
                ov_config=OVConfig(dtype="fp16"), convert_tokenizer=True, stateful=True, local_files_only=True)
    limits = Limits.for_precision("fp16")
    rt = get("openvino").load(own, RuntimeSettings(threads=int(THREADS), extra={"ov_properties": EXACT_CPU}))
    short = compare(ref["short_logits"], rt.logits(ref["short_ids"].tolist(), probes.COMPARE_LAST))
    long = compare(ref["long_logits"], rt.logits(ref["long_ids"].tolist(), probes.COMPARE_LAST))
    start = int(ref["long_span_start"])         # the long probe's span at its own positions
    span = compare(ref["long_span_logits"], rt.logits(ref["long_ids"].tolist()[start:], probes.COMPARE_LAST, start))
    rt.close()
    assert long.max_abs > 5 * short.max_abs, (short, long)
    ours = bf16_build.row("openvino", "fp16")
    assert failures("long", long, limits) and long.max_abs > 20 * ours["parity"]["long"]["max_abs"], long
    # The span does not catch it: fp16 inverse frequencies put an error on each pair's relative angle that grows
    # with the distance between the tokens, and a span's distances stay under 256. Such errors come from the
    # export, which a format's precisions share (the rope constants of one base IR), so each format's first
    # precision keeps the whole long prompt (phiedge.build.long_span).
    assert not failures("long", span, limits) and span.max_abs < long.max_abs / 5, (span, long)
    assert ours["passed"]


def test_defaults_that_fail_the_gate_fall_back_to_exact_settings(session, tmp_path):
    """int4 is checked and shipped with the CPU plugin's own defaults (its fast path). One whose shipped settings
    fail its check is measured again with the exact f32 properties and, passing so, ships with them: the result,
    the manifest row and the device path carry them. The shipped settings here are ones this CPU plugin refuses
    (as a newer OpenVINO's property would be on an older one): the same path as defaults that lose accuracy."""
    row = session.row("openvino", "int4")
    assert row["runtime_settings"] == {} and row["own_settings_failures"] == []    # its defaults passed
    folder = tmp_path / "int4"
    shutil.copytree(session.artifact("openvino", "int4"), folder)
    meta = json.loads((folder / "phiedge_openvino.json").read_text())
    meta["cpu_properties"] = {"KV_CACHE_PRECISION": "no-such-precision"}
    (folder / "phiedge_openvino.json").write_text(json.dumps(meta))
    art = exporters.Artifact(format="openvino", precision="int4", path=folder, files=tuple(row["files"]), meta=meta)
    r = build.check_artifact(art, session.merged / "reference.npz", int(THREADS), None, tmp_path / "work")
    assert r.passed, r.verdict.failures
    assert r.settings == {"ov_cpu_properties": EXACT_CPU}
    assert r.own_settings_failures and "runtime failed" in r.own_settings_failures[0]
    out = r.to_json()
    assert out["runtime_settings"] == r.settings and out["parity"]["long"]["kl"] < 0.35
    rt = get("openvino").load(folder, device.settings({}, out, 2, cap_context=False))
    assert {k: rt.properties[k] for k in EXACT_CPU} == EXACT_CPU
    rt.close()
    # Exact settings that fail too: the artifact's own failure is what is reported.
    strict = build.check_artifact(art, session.merged / "reference.npz", int(THREADS),
                                  {"INT4": (1.01, 0.0, 0.0)}, tmp_path / "strict")
    assert not strict.passed and strict.settings == {} and "runtime failed" in strict.verdict.failures[0]
