"""Child process of the MLX exporter: mlx-lm's own `convert` (Python API), plus one quantization predicate.

The predicate only decides bits per layer (the tied embedding / LM head, and mlx-lm's own mixed recipes,
built by mlx-lm's `mixed_quant_predicate_builder`); loading, casting, quantizing and saving are mlx-lm's.
A predicate is a callable, so this runs the Python API rather than the `mlx_lm.convert` command line.

Usage: python -m phiedge.exporters._mlx_convert SRC DST [--dtype D] [--bits B --group-size G]
       [--recipe mixed_4_6] [--embed-bits 8|0]          (0: keep the embedding unquantized)
"""
from __future__ import annotations

import argparse
import sys

EMBEDDING_PATHS = ("embed_tokens", "lm_head")   # the tied embedding is also the output layer


def _predicate(args, src: str):
    recipe = None
    if args.recipe:
        from mlx_lm.convert import mixed_quant_predicate_builder
        from mlx_lm.utils import load_model, _download
        lazy_model, _ = load_model(_download(src), lazy=True)      # shapes only: nothing is evaluated
        recipe = mixed_quant_predicate_builder(args.recipe, lazy_model, args.group_size)

    def predicate(path: str, module):
        if args.embed_bits is not None and path.split(".")[-1] in EMBEDDING_PATHS:
            if args.embed_bits == 0:
                return False
            return {"group_size": args.group_size, "bits": args.embed_bits, "mode": "affine"}
        return recipe(path, module) if recipe else True

    return predicate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default=None)
    p.add_argument("--bits", type=int, default=None)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--recipe", default=None)
    p.add_argument("--embed-bits", type=int, default=None)
    args = p.parse_args(argv)
    from mlx_lm import convert
    if args.bits is None:
        convert(args.src, args.dst, dtype=args.dtype)
    else:
        convert(args.src, args.dst, quantize=True, q_bits=args.bits, q_group_size=args.group_size,
                dtype=args.dtype, quant_predicate=_predicate(args, args.src))
    return 0


if __name__ == "__main__":
    sys.exit(main())
