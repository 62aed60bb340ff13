"""The bundle's golden references (golden.npz), from the build's reference logits; read back by
`ProbeSet.from_golden` for `phiedge validate`. Device-path module: numpy only."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import save_npz

TOPK = 32
GOLDEN = "golden.npz"
TOOLCALL_KEYS = ("toolcall_ids", "toolcall_greedy", "toolcall_greedy_margins", "toolcall_call")


def golden_name(suffix: str) -> str:
    """The golden references of a variant (phiedge.build.Variant.suffix: "" or "@<adapter>")."""
    return f"golden{suffix}.npz"


def golden_suffix(name: str | None) -> str:
    """golden_name's inverse (a manifest row without one: the bundle's only golden.npz)."""
    return (name or GOLDEN)[len("golden"):-len(".npz")]


def write_golden(reference: Path, out: Path) -> None:
    """Top-k log-probs (not full-vocabulary logits: 200k x 64 floats per regime would dwarf a small bundle), the
    probe ids, the short probe's greedy tokens with PyTorch's margins, and the tool-call smoke's reference."""
    ref = np.load(reference)
    arrays = {}
    for name in ("short", "long"):
        if f"{name}_ids" not in ref:
            continue
        logits = ref[f"{name}_logits"].astype(np.float64)
        lp = logits - logits.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        idx = np.argsort(-lp, axis=-1)[:, :TOPK]
        arrays[f"{name}_ids"] = ref[f"{name}_ids"]
        arrays[f"{name}_topk_idx"] = idx.astype(np.int32)
        arrays[f"{name}_topk_logprob"] = np.take_along_axis(lp, idx, -1).astype(np.float32)
    for key in ("short_greedy", "short_greedy_margins", *TOOLCALL_KEYS):
        if key in ref:
            arrays[key] = ref[key]
    save_npz(out, arrays)
