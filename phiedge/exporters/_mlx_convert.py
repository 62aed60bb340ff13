"""Child process of the MLX exporter: mlx-lm's own `convert` (Python API), plus one quantization predicate.

The predicate only decides bits per layer (the tied embedding / LM head, and mlx-lm's own mixed recipes,
built by mlx-lm's `mixed_quant_predicate_builder`); loading, casting, quantizing and saving are mlx-lm's.
A predicate is a callable, so this runs the Python API rather than the `mlx_lm.convert` command line.

Usage: python -m phiedge.exporters._mlx_convert SRC DST [--dtype D] [--bits B --group-size G]
       [--recipe mixed_4_6] [--embed-bits 8|0]          (0: keep the embedding unquantized)
       [--gptq JOB.json]                                 (mlx-lm's GPTQ on JOB's calibration text)
"""
from __future__ import annotations

import argparse
import sys

EMBEDDING_PATHS = ("embed_tokens", "lm_head")   # the tied embedding is also the output layer


def _predicate(args, src: str):
    recipe = None
    if args.recipe:
        from mlx_lm.convert import mixed_quant_predicate_builder
        from mlx_lm.utils import _download, load_model
        lazy_model, _ = load_model(_download(src), lazy=True)      # shapes only: nothing is evaluated
        recipe = mixed_quant_predicate_builder(args.recipe, lazy_model, args.group_size)

    def predicate(path: str, module):
        if args.embed_bits is not None and path.split(".")[-1] in EMBEDDING_PATHS:
            if args.embed_bits == 0:
                return False
            return {"group_size": args.group_size, "bits": args.embed_bits, "mode": "affine"}
        return recipe(path, module) if recipe else True

    return predicate


def run_gptq(args) -> None:
    """mlx-lm's GPTQ (mlx_lm.quant.gptq) on the calibration sample of the documents instead of the text mlx-lm
    downloads: every linear at --bits, the tied embedding (its fallback) at --embed-bits, one group size; saved with
    mlx-lm's own `save` and the per-layer quantization config GPTQ returns (what `mlx_lm.load` reads)."""
    import json
    from pathlib import Path

    import mlx.core as mx
    from mlx_lm.quant.gptq import gptq_quantize
    from mlx_lm.utils import load, save

    from phiedge.calibration import sample
    job = json.loads(Path(args.gptq).read_text())
    s = sample(Path(args.src), job["texts"], job["seq_len"], job["budget"])
    windows = [w for w in s.windows if len(w) == s.seq_len]        # GPTQ batches a rectangular array
    if not windows:
        raise SystemExit(f"GPTQ needs calibration text: the documents gave no window of {s.seq_len} tokens")
    model, tokenizer, config = load(args.src, lazy=True, return_config=True)
    model, config["quantization"] = gptq_quantize(model, mx.array(windows), args.bits, args.group_size,
                                                  args.embed_bits, args.group_size, batch_size=1)
    config["quantization_config"] = config["quantization"]
    save(args.dst, args.src, model, tokenizer, config)
    (Path(args.dst) / "phiedge_gptq.json").write_text(json.dumps({**s.record(), "windows_used": len(windows),
                                                                   "budget": job["budget"]}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default=None)
    p.add_argument("--bits", type=int, default=None)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--recipe", default=None)
    p.add_argument("--embed-bits", type=int, default=None)
    p.add_argument("--gptq", default=None)
    args = p.parse_args(argv)
    from mlx_lm import convert
    if args.gptq:
        run_gptq(args)
    elif args.bits is None:
        convert(args.src, args.dst, dtype=args.dtype)
    else:
        convert(args.src, args.dst, quantize=True, q_bits=args.bits, q_group_size=args.group_size,
                dtype=args.dtype, quant_predicate=_predicate(args, args.src))
    return 0


if __name__ == "__main__":
    sys.exit(main())
