"""onnxruntime-genai-specific behaviour on the session build's ONNX artifacts: the LM-head fix-up of the builder,
a prefill split across the LongRoPE switch, execution providers, and the builder's memory check (the contract
common to all runtimes is tests/test_runtimes.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from phiedge import errors, exporters
from phiedge.checks import Limits, probes
from phiedge.checks.metrics import compare, failures
from phiedge.exporters import _genai_nbits
from phiedge.exporters import onnx as onnx_exporter
from phiedge.runtimes import RuntimeSettings, get

pytestmark = pytest.mark.onnx


def test_lm_head_reads_the_final_norm(session, tmp_path):
    """Our builder wrapper fixes the builder's LM-head detection; the stock builder, on the same checkpoint,
    still wires the logits to layer 0 (gate_up_proj is as wide as the vocabulary). When this second half
    fails, upstream has fixed it and phiedge/exporters/_genai_build.py can go."""
    def logits_source(model_path: Path) -> str:
        g = onnx.load(str(model_path), load_external_data=False).graph
        producer = {o: n for n in g.node for o in n.output}
        return producer[producer["logits"].input[0]].name

    assert "final_norm" in logits_source(session.artifact("onnx", "fp32") / "model.onnx")
    stock = tmp_path / "stock"
    r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(session.merged / "merged"),
                        "-o", str(stock), "-p", "fp32", "-e", "cpu", "-c", str(tmp_path / "cache"),
                        "--extra_options", "hf_token=false"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "layers.0" in logits_source(stock / "model.onnx")


def test_gate_catches_a_prefill_split_across_the_switch(session):
    """One prefill of the whole long probe uses the long factors everywhere, as PyTorch does. Appending it in
    two pieces (all but 200 ids, below the switch, then 200) rotates the first piece's keys with the short
    factors: the gate must fail that."""
    ref = session.reference
    ids = ref["long_ids"].tolist()
    cut = len(ids) - 200
    assert cut < session.switch
    rt = get("onnx").load(session.artifact("onnx", "fp32"))
    limits = Limits.for_precision("fp32")
    right = compare(ref["long_logits"], rt.logits(ids, probes.COMPARE_LAST))
    assert not failures("long", right, limits)
    gen = rt._generator(len(ids))
    gen.append_tokens(np.asarray(ids[:cut], dtype=np.int32))
    gen.append_tokens(np.asarray(ids[cut:], dtype=np.int32))
    split = np.asarray(gen.get_output("logits"))[0, -probes.COMPARE_LAST:]
    wrong = compare(ref["long_logits"], split)
    assert failures("long", wrong, limits)
    assert wrong.max_abs > 100 * right.max_abs
    rt.close()


@pytest.mark.parametrize("precision", ["fp32", "int4-k_quant-mixed8"])
def test_prompt_logits_are_the_sliced_graphs_and_equal_genais_rows(session, precision):
    """Prompt logits come from onnxruntime on a copy of the decoder whose LM head (MatMul, or MatMulNBits with
    its int8 head) reads only the compared rows: the same numbers as onnxruntime-genai's every-row logits, for
    both LongRoPE regimes, and the shipped model.onnx is untouched."""
    path = session.artifact("onnx", precision)
    before = (path / "model.onnx").read_bytes()
    rt = get("onnx").load(path, RuntimeSettings(threads=1))
    ref = session.reference
    for regime in ("short", "long"):
        ids = ref[f"{regime}_ids"].tolist()
        sliced = rt.logits(ids, probes.COMPARE_LAST)
        assert rt._rows_session, "the LM head was not found: every row went through it"
        every = rt.logits(ids, len(ids))[-probes.COMPARE_LAST:]          # onnxruntime-genai, every row
        assert sliced.shape == every.shape == (probes.COMPARE_LAST, every.shape[1])
        np.testing.assert_allclose(sliced, every, atol=1e-4, rtol=0, err_msg=regime)
    rt.close()
    assert (path / "model.onnx").read_bytes() == before


def test_unknown_execution_providers(session, tmp_path):
    exp = exporters.get("onnx")
    merged = session.merged / "merged"
    with pytest.raises(errors.UsageError, match="no execution provider 'tpu': known are cpu, cuda, dml, webgpu"):
        exp.export(merged, tmp_path, ["int4"], {"execution_provider": "tpu"})
    with pytest.raises(errors.UsageError, match="'fp32' is not built for execution provider 'webgpu'"):
        exp.export(merged, tmp_path, ["fp32"], {"execution_provider": "webgpu"})
    assert not any(tmp_path.iterdir()), "nothing is built before the checks pass"
    with pytest.raises(errors.UsageError, match="no device 'TPU': known are CPU, CUDA"):
        get("onnx").load(session.artifact("onnx", "int4"), RuntimeSettings(device="TPU"))
    import onnxruntime_genai as og
    if not og.is_cuda_available():
        with pytest.raises(errors.ToolchainError, match="no cuda support"):
            get("onnx").load(session.artifact("onnx", "int4"), RuntimeSettings(extra={"execution_provider": "cuda"}))


def _builder(merged: Path, out: Path, precision: str, threads: int = 1, **env: str) -> Path:
    """phiedge's builder command for one ONNX precision, as the exporter runs it, with extra environment."""
    cmd = [sys.executable, "-m", "phiedge.exporters._genai_build", "--threads", str(threads), "-i", str(merged),
           "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(out.parent / "cache"), "--extra_options", "hf_token=false",
           *onnx_exporter.builder_options(exporters.get("onnx").parse(precision))]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("precision", ["int4", "int4-k_quant-mixed8"])
def test_per_weight_quantization_is_the_builders_own_byte_for_byte(session, tmp_path, precision):
    """The builder's whole-graph int4 pass (fp32 graph in memory: 23.6 GB at 3.8 B) and phiedge's per-weight
    pass give the same model.onnx and model.onnx.data, byte for byte: MLAS's default RTN (plain int4) and k_quant
    with the 8-bit layers and 8-bit tied LM head (the targets' int4), in the default column slices (the session's
    artifacts: 384 Ki elements, so every tiny weight is cut into two or more) and in slices of 100,000 elements two
    threads at a time."""
    merged = session.merged / "merged"
    whole = _builder(merged, tmp_path / "whole", precision, **{_genai_nbits.WHOLE_GRAPH: "1"})
    ours = [session.artifact("onnx", precision)]
    if precision != "int4":
        ours.append(_builder(merged, tmp_path / "sliced", precision, 2, PHIEDGE_ONNX_QUANTIZE_SLICE="100000"))
    for folder in ours:
        for f in ("model.onnx", "model.onnx.data"):
            assert (folder / f).read_bytes() == (whole / f).read_bytes(), (folder, f)
