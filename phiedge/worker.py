"""Run one artifact on its runtime in a child process and print its measurements as JSON.

A runtime that crashes (a segfault in native code) takes down only this child: the build records the
signal as that artifact's failure and goes on checking the others.

Usage: python -m phiedge.worker FORMAT ARTIFACT_DIR REFERENCE_NPZ THREADS [SMOKE_JSON]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from . import parity, probes
from .runtimes import RuntimeSettings, get


def _prefix(got: list[int], want: list[int]) -> int:
    n = 0
    for a, b in zip(got, want):
        if a != b:
            break
        n += 1
    return n


def _forced(rt, prompt: list[int], answer: list[int]) -> list[int]:
    """Teacher-forced picks: the runtime's argmax at each answer position, given the reference's prefix."""
    if not answer:
        return []
    rows = rt.logits(prompt + answer, len(answer) + 1)[:len(answer)]
    return [int(t) for t in rows.argmax(-1)]


def measure(fmt: str, artifact_dir: Path, reference: Path, threads: int, smoke: Path | None = None) -> dict:
    ref = np.load(reference)
    rt = get(fmt).load(artifact_dir, RuntimeSettings(threads=threads))
    out: dict = {"parity": {}}
    for name in ("short", "long"):
        if f"{name}_ids" not in ref:
            continue
        ids = ref[f"{name}_ids"].tolist()
        cand = rt.logits(ids, probes.COMPARE_LAST)
        out["parity"][name] = parity.compare(ref[f"{name}_logits"], cand).as_dict()
    if "short_greedy" in ref:
        want = ref["short_greedy"].tolist()
        gen = rt.generate_ids(ref["short_ids"].tolist(), len(want), stop_ids=rt.stop_ids())
        out["greedy"] = {"tokens": gen.ids, "reference": want, "prefix_match": _prefix(gen.ids, want),
                         "of": len(want), "forced_tokens": _forced(rt, ref["short_ids"].tolist(), want),
                         "reference_margins": ref["short_greedy_margins"].tolist(),
                         "ttft_s": round(gen.ttft_s, 4), "decode_tps": round(gen.decode_tps, 2)}
    if smoke is not None:
        s = json.loads(smoke.read_text())
        want = s["reference_tokens"]
        gen = rt.generate_ids(s["prompt_ids"], max(1, len(want)), stop_ids=rt.stop_ids())
        picked = _forced(rt, s["prompt_ids"], want)
        out["smoke"] = {"answer": gen.text, "tokens": gen.ids, "prefix_match": _prefix(gen.ids, want), "of": len(want),
                        "forced_tokens": picked,
                        "prompt_tokens": gen.prompt_tokens, "ttft_s": round(gen.ttft_s, 4),
                        "decode_tps": round(gen.decode_tps, 2)}
    rt.close()
    return out


def main() -> int:
    fmt, artifact_dir, reference, threads = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    smoke = Path(sys.argv[5]) if len(sys.argv) > 5 else None
    print(json.dumps(measure(fmt, artifact_dir, reference, threads, smoke)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
