"""Data-aware int4 for onnxruntime-genai's builder: an importance-weighted checkpoint in GPTQ's layout.

The builder quantizes a float checkpoint data-free (its RTN / k_quant), and loads pre-quantized checkpoints through
its loaders (loaders/gptq.py: `qweight` / `qzeros` / `scales` / `g_idx` per Linear, `quantization_config` in
config.json). This child writes such a checkpoint from the merged model and the calibration sample of the bundle's
documents (phiedge.calibration):

- the input statistics of every Linear and of the LM head, the same pass as GGUF's importance matrix
  (calibration.input_power: per input column, the mean squared activation over the sample);
- per block of `block` input columns of each output row, asymmetric int4 (scale and integer zero point, as
  MatMulNBits stores them) chosen to minimize the *importance-weighted* squared error: a grid of clipping ratios,
  each refined by weighted least squares for the scale, the best kept per block (llama.cpp's imatrix use of the
  same statistic). Columns the documents drive hard keep their precision; rarely used ones give it up;
- with `head_bits` 8 the LM head (and the tied embedding the builder shares with it) in 8 bits, as `-head8` does
  for the builder's own quantizers (GPTQ's per-layer `dynamic` override).

The builder then writes the graph from it exactly as from any GPTQ checkpoint. Statistics are kept beside the
checkpoint (`stats.npz`) so several block sizes read one calibration pass; the calibration record goes to
`<out>.json`.

Usage: python -m phiedge.exporters._onnx_imatrix JOB.json
JOB: {"model": dir, "out": checkpoint dir, "stats": npz path, "texts": [...], "seq_len": n, "budget": n,
      "block": n, "head_bits": 4|8}
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

# Clipping ratios tried per block (the block's full range down to 0.6 of it, in steps of 0.05) and least-squares
# refinements of each: on the tiny Phi's weights 17 ratios with 2 refinements lower the weighted error by 1 % only.
CLIP_RATIOS = 9
REFINE_STEPS = 1
# Output rows searched at once: the search is memory-bound, and 64 rows' temporaries stay in cache (a 8192 x 3072
# weight: 0.9 s against 6.7 s whole; ~2.4 min for Phi-4-mini's 3.84 B parameters on 2 cores).
ROWS = 64


def quantize(weight, importance, block: int, bits: int):
    """(codes (out, in) int32, scales (out, in/block) fp16, zero points (out, in/block) int32) of `weight`
    (out, in), minimizing sum importance[col] * (scale * (code - zero) - w)^2 per block."""
    import torch
    parts = [_search(weight[i:i + ROWS], importance, block, bits) for i in range(0, weight.shape[0], ROWS)]
    return tuple(torch.cat(p) for p in zip(*parts))


def _search(weight, importance, block: int, bits: int):
    import torch
    top = 2 ** bits - 1
    out_f, in_f = weight.shape
    x = weight.float().reshape(out_f, in_f // block, block)
    imp = importance.float().reshape(1, in_f // block, block)
    imp = (imp + 1e-6 * imp.mean().clamp(min=1e-30)).expand_as(x)  # every column keeps some weight
    lo0, hi0 = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    best = None
    for ratio in torch.linspace(1.0, 0.6, CLIP_RATIOS):
        scale = ((hi0 - lo0) * ratio / top).clamp(min=1e-12)
        zero = torch.clamp(torch.round(-lo0 * ratio / scale), 0, top)
        for _ in range(REFINE_STEPS):
            d = torch.clamp(torch.round(x / scale) + zero, 0, top) - zero
            scale = ((imp * x * d).sum(-1, keepdim=True)
                     / (imp * d * d).sum(-1, keepdim=True).clamp(min=1e-30)).clamp(min=1e-12)
        q = torch.clamp(torch.round(x / scale) + zero, 0, top)
        err = (imp * (scale * (q - zero) - x) ** 2).sum(-1, keepdim=True)
        if best is None:
            best = [err, scale, zero, q]
        else:
            better = err < best[0]
            best = [torch.where(better, new, old) for new, old in zip((err, scale, zero, q), best)]
    _, scale, zero, q = best
    return q.reshape(out_f, in_f).int(), scale.squeeze(-1).half(), zero.squeeze(-1).int()


def pack(values, bits: int):
    """GPTQ's int32 packing along the first axis: 32 // bits consecutive rows per word, the first lowest."""
    import torch
    per = 32 // bits
    rows, cols = values.shape
    v = values.to(torch.int64).reshape(rows // per, per, cols)
    word = torch.zeros(rows // per, cols, dtype=torch.int64)
    for i in range(per):
        word |= v[:, i, :] << (bits * i)
    return (word - ((word >> 31) & 1) * (1 << 32)).to(torch.int32)      # as signed int32, bit for bit


def gptq_tensors(name: str, weight, importance, block: int, bits: int) -> dict:
    """One Linear as GPTQ (v1) stores it: qweight (in/per, out), qzeros (groups, out/per) holding zero - 1,
    scales (groups, out) fp16, g_idx (in,)."""
    import torch
    q, scale, zero = quantize(weight, importance, block, bits)
    top = 2 ** bits - 1
    return {f"{name}.qweight": pack(q.T.contiguous(), bits),
            f"{name}.qzeros": pack(((zero - 1) & top).contiguous(), bits).T.contiguous(),
            f"{name}.scales": scale.T.contiguous(),
            f"{name}.g_idx": torch.arange(weight.shape[1], dtype=torch.int32) // block}


def statistics(job: dict) -> tuple[dict, dict]:
    """{module: mean squared input per column} and the calibration record, computed once per stats file."""
    stats = Path(job["stats"])
    if stats.exists():
        data = np.load(stats)
        return {k: data[k] for k in data.files}, json.loads(stats.with_suffix(".json").read_text())
    from phiedge.calibration import input_statistics
    t0 = time.perf_counter()
    sums, s = input_statistics(Path(job["model"]), job["texts"], job["seq_len"], job["budget"], "data-aware int4")
    power = {n: (total / count).astype(np.float32) for n, (total, count) in sums.items()}
    record = {**s.record(), "seconds": round(time.perf_counter() - t0, 1)}
    np.savez(stats, **power)
    stats.with_suffix(".json").write_text(json.dumps(record))
    return power, record


def main() -> int:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    job = json.loads(Path(sys.argv[1]).read_text())
    src, out, block, head_bits = Path(job["model"]), Path(job["out"]), int(job["block"]), int(job["head_bits"])
    power, record = statistics(job)
    config = json.loads((src / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings", False))
    t0 = time.perf_counter()
    tensors: dict = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                module = key.removesuffix(".weight")
                if key == "lm_head.weight" or (tied and key == "model.embed_tokens.weight"):
                    module = "lm_head"
                if key.endswith(".weight") and module in power:
                    w = st.get_tensor(key)
                    if w.shape[1] % block:
                        raise SystemExit(f"{key} has {w.shape[1]} input columns, not a multiple of the block "
                                         f"{block}: choose a block that divides it (int4-imat: blocks of 32)")
                    tensors.update(gptq_tensors(module, w, torch.from_numpy(power[module]), block,
                                                head_bits if module == "lm_head" else 4))
                    if key == "model.embed_tokens.weight":
                        # the builder shares the quantized head with the embedding's Gather; the float copy it
                        # reads is never written to the graph: half precision keeps the checkpoint small
                        tensors[key] = w.half()
                else:
                    t = st.get_tensor(key)
                    tensors[key] = t.float() if t.is_floating_point() else t
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"))
    quant = {"quant_method": "gptq", "bits": 4, "group_size": block, "desc_act": False, "sym": False}
    if head_bits != 4:
        quant["dynamic"] = {"lm_head": {"bits": head_bits}}
    (tmp / "config.json").write_text(json.dumps({**config, "quantization_config": quant}, indent=2))
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    out.with_suffix(".json").write_text(json.dumps(
        {**record, "quantize_seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
