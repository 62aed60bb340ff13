"""Child process of the OpenVINO exporter: one IR from optimum-intel (computing in fp32, weights in the
checkpoint's dtype), then one folder per precision.

    python -m phiedge.exporters._ov_export JOB_JSON

JOB_JSON names the merged checkpoint, the output folder, the base IR's folder (the `prepare openvino` stage's;
traced here when it is not complete), the plans (see phiedge.exporters.openvino.Plan; none: only the trace) and
the calibration texts; this writes `<out>/<plan>.partial/` per plan and `<out>/result.json` with what each
compression actually did (group size chosen, data-aware or not, how many calibration samples).

Why a child: optimum-intel imports torch + transformers and traces the model, and NNCF's data-aware passes run
the model on the calibration samples.

Why the weights are compressed here and not by optimum's `--weight-format`: optimum's fp16 IR stores every
constant in fp16, the rotary inverse frequencies included, and LongRoPE positions near 4200 then lose ~2 logits
(tests/test_openvino.py, test_gate_catches_openvinos_own_fp16_ir). Exporting an fp32-computing IR and compressing only
the weights of MatMul / Gather keeps the rope
math in fp32.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np

from phiedge.pages import MappedPagesDropped
from phiedge.source import checkpoint_dtype

log = logging.getLogger("phiedge.exporters.openvino")

# Files of optimum's export that every precision folder keeps (the IR itself is rewritten per precision).
SIDE_FILES = ("openvino_tokenizer.xml", "openvino_tokenizer.bin", "openvino_detokenizer.xml",
              "openvino_detokenizer.bin", "config.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
WEIGHT_CONSUMERS = {"MatMul", "Gather"}    # ops whose constant inputs are weights (linear layers, embedding)
MIN_WEIGHT_ELEMENTS = 4096                 # smaller constants (rope factors, norms' shapes) are never touched


def export_base(merged: Path, dest: Path) -> None:
    """optimum-intel's stateful IR computing in fp32 + openvino-tokenizers' tokenizer/detokenizer IRs.

    The model loads in its checkpoint's dtype: a bf16 checkpoint (Phi-4-mini's) is traced on optimum's 16-bit
    path, whose IR keeps the weights as bf16 constants converted to f32 where they are used and computes in f32
    (its rope in f32 too) -- half the memory of asking for an fp32 model (15.3 GB at 3.8 B parameters), the same
    values. Only optimum's dtype="fp16" stores constants in fp16, the rope's among them (tests/test_openvino.py)."""
    import torch
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig
    dtype = checkpoint_dtype(merged)
    loading = {"torch_dtype": getattr(torch, dtype)} if dtype in ("bfloat16", "float16") else None
    main_export(str(merged), str(dest), task="text-generation-with-past", ov_config=OVConfig(dtype="fp32"),
                convert_tokenizer=True, stateful=True, local_files_only=True, model_loading_kwargs=loading)
    for f in ("openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml"):
        if not (dest / f).is_file():
            raise SystemExit(f"optimum-intel wrote no {f} (is openvino-tokenizers installed?)")


def _weights(model) -> list:
    """Every weight's constant: a large f32 constant feeding MatMul/Gather, or a bf16 one feeding them through
    its Convert to f32 (a bf16 checkpoint's IR)."""
    out = []
    for node in model.get_ordered_ops():
        kind = node.get_output_element_type(0).get_type_name() if node.get_type_name() == "Constant" else None
        if kind not in ("f32", "bf16"):
            continue
        if int(np.prod(list(node.get_output_shape(0)) or [1])) < MIN_WEIGHT_ELEMENTS:
            continue
        users = [t.get_node() for t in node.output(0).get_target_inputs()]
        if kind == "bf16":
            users = [t.get_node() for u in users if u.get_type_name() == "Convert"
                     for t in u.output(0).get_target_inputs()]
        if {u.get_type_name() for u in users} & WEIGHT_CONSUMERS:
            out.append(node)
    return out


def weight_data(node) -> np.ndarray:
    """A weight constant's values as float32 (OpenVINO hands bf16 data out as float16-typed bits)."""
    data = node.get_data()
    if node.get_output_element_type(0).get_type_name() == "bf16":
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return data


def compress_fp16(model) -> int:
    """Weights to fp16 (a Constant f16 + Convert to f32, as OpenVINO's own fp16 compression writes them); every
    other constant, the rope's inverse frequencies among them, stays f32. Returns the number of weights."""
    import openvino.opset13 as ops
    n = 0
    for node in _weights(model):
        half = ops.constant(weight_data(node).astype(np.float16))
        half.set_friendly_name(node.get_friendly_name())
        if node.get_output_element_type(0).get_type_name() == "bf16":
            source = half.output(0)                 # its users are already Converts to f32
        else:
            source = ops.convert(half, "f32").output(0)
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(source)
        n += 1
    model.validate_nodes_and_infer_types()
    return n


def reduction_widths(model) -> list[int]:
    """Input width of every weight: the axis int4 groups run along (the last one, [out, in] layout)."""
    return sorted({int(list(n.get_output_shape(0))[-1]) for n in _weights(model)
                   if len(n.get_output_shape(0)) == 2})


def choose_group_size(requested: int, widths: list[int]) -> int:
    """The largest power of two <= requested that divides every width (-1, per channel, divides all)."""
    if requested <= 0:
        return -1
    g = requested
    while g >= 8:
        if all(w % g == 0 for w in widths):
            return g
        g //= 2
    raise SystemExit(f"no int4 group size <= {requested} divides the layer widths {widths}: use per-channel "
                     f"(int4-gpc)")


def calibration_samples(merged: Path, texts: list[str], seq_len: int, n_samples: int) -> list[dict]:
    """Token windows of `seq_len` from the documents, round-robin across documents, as stateful-IR inputs."""
    from phiedge.calibration import sample
    from phiedge.openvino_ir import prefill_inputs
    return [prefill_inputs(list(w)) for w in sample(merged, texts, seq_len, seq_len * n_samples).windows[:n_samples]]


def compress_nncf(model, plan: dict, merged: Path, texts: list[str]) -> dict:
    """int8 (per channel) or int4 (grouped, mixed with int8 by `ratio`, optionally data-aware) with NNCF."""
    import nncf
    if plan["base"] == "int8":
        nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        return {"mode": "int8_asym"}
    o = plan["int4"]
    widths = reduction_widths(model)
    group = choose_group_size(o["group_size"], widths)
    if group != o["group_size"]:
        log.warning("openvino %s: group size %d does not divide every layer width (%s): using %d",
                    plan["name"], o["group_size"], widths, group)
    awq, se = o["awq"], o["scale_estimation"]
    # AWQ without a dataset is NNCF's data-free AWQ (scales from the weights alone); with one, its grid search on
    # the documents' activations, which scale estimation then refines.
    samples = calibration_samples(merged, texts, o["seq_len"], o["num_samples"]) if o["data"] == "explicit" else []
    if o["data"] == "explicit" and not samples:
        raise SystemExit("data-aware int4 needs calibration text: the documents gave no token windows")
    dataset = nncf.Dataset(samples) if samples else None
    mode = nncf.CompressWeightsMode.INT4_SYM if o["sym"] else nncf.CompressWeightsMode.INT4_ASYM
    from nncf.quantization.advanced_parameters import (
        AdvancedAWQParameters,
        AdvancedCompressionParameters,
        AdvancedScaleEstimationParameters,
    )
    advanced = AdvancedCompressionParameters(
        awq_params=AdvancedAWQParameters(steps=o["awq_steps"]),
        scale_estimation_params=AdvancedScaleEstimationParameters(subset_size=o["se_subset"]))
    nncf.compress_weights(model, mode=mode, group_size=group, ratio=o["ratio"], dataset=dataset,
                          all_layers=o.get("all_layers", False) or None,
                          awq=awq or None, scale_estimation=(se and dataset is not None) or None,
                          gptq=o["gptq"] or None,
                          subset_size=len(samples) or 128, advanced_parameters=advanced)
    return {"mode": mode.value, "group_size_requested": o["group_size"], "group_size": group,
            "layer_widths": widths, "ratio": o["ratio"],
            "awq": ("data-aware" if dataset else "data-free") if awq else None,
            "scale_estimation": bool(se and dataset), "gptq": o["gptq"],
            "awq_steps": o["awq_steps"] if awq and dataset else None,
            "scale_estimation_samples": min(o["se_subset"], len(samples)) if se and dataset else None,
            "calibration_samples": len(samples), "embedding": "int4" if o.get("all_layers") else "int8 (NNCF's backup)",
            "calibration_seq_len": o["seq_len"] if samples else None,
            "mixed_precision": "data-aware" if (dataset and o["ratio"] < 1) else
            ("weight-based" if o["ratio"] < 1 else None)}


def build_one(core, base: Path, out: Path, plan: dict, merged: Path, texts: list[str]) -> dict:
    import openvino as ov
    tmp = out / f"{plan['name']}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = core.read_model(str(base / "openvino_model.xml"))
    if plan["base"] == "fp32":
        dtype = checkpoint_dtype(merged)
        info: dict = {"mode": "fp32" if dtype == "float32" else f"the checkpoint's {dtype} weights, computed in fp32"}
    elif plan["base"] == "fp16":
        info = {"mode": "fp16 weights, fp32 rope and activations", "weights": compress_fp16(model)}
    else:
        with MappedPagesDropped(".bin"):    # NNCF reads every weight of the mapped base IR: 7.7 GB of pages at 3.8 B
            info = compress_nncf(model, plan, merged, texts)
    ov.save_model(model, str(tmp / "openvino_model.xml"), compress_to_fp16=False)
    for f in SIDE_FILES:
        if (base / f).is_file():
            shutil.copy2(base / f, tmp / f)
    return info


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    job = json.loads(Path(sys.argv[1]).read_text())
    merged, out = Path(job["merged"]), Path(job["out"])
    base = Path(job["base"]) if job.get("base") else out / ".base-ir"     # a prepared trace (the prepare stage)
    if not (base / ".complete").exists():
        shutil.rmtree(base, ignore_errors=True)
        export_base(merged, base)
        (base / ".complete").write_text("")
    import openvino as ov
    core = ov.Core()
    result = {p["name"]: build_one(core, base, out, p, merged, job.get("calibration_text") or [])
              for p in job["plans"]}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
