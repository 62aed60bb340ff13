"""Metrics and limits: an artifact's next-token logits against the PyTorch merged model's.

Metrics over the last `probes.COMPARE_LAST` positions of each probe: mean KL(reference || artifact) in
nats, top-1 agreement, max |Δlogit| (full-vocabulary references only: the bundle's golden references keep
the top-k log-probs, so on the device KL is over those k and max |Δ| is not measured). Thresholds by
precision live in one table; a device profile may tighten them. Device-path module: numpy only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# precision -> (min top-1 agreement, max mean KL, max |Δlogit| or None). Where each comes from:
THRESHOLDS: dict[str, tuple[float, float, float | None]] = {
    # Full precision, run as devices run it: llama.cpp keeps its KV cache in f16 by default, which alone
    # moves logits by ~0.01-0.03 on the tiny fixture (with an f32 cache and no flash attention the F32 GGUF
    # is within 2e-3: tests/test_gguf.py). One near-tie flip in 64 positions is allowed, no more.
    # Top-1 counts a flip only outside near-ties (Limits.near_tie): where the reference's own top-2 margin is
    # within what max |Δlogit| allows, either token is within tolerance (the tiny fixture, trained on another
    # CPU, has 3 nats-thousandths margins that fp16 activations flip: MLX fp16 62/64, both at such ties).
    "F32":    (0.97, 1e-4, 0.1),
    "FP32":   (0.97, 1e-4, 0.1),
    "F16":    (0.97, 2e-3, 0.25),   # weights rounded to fp16 once; near-exact
    "BF16":   (0.95, 5e-3, 0.5),    # bf16 keeps 8 mantissa bits: looser than fp16
    "FP16":   (0.97, 2e-3, 0.25),
    "Q8_0":   (0.90, 2e-2, None),   # 8-bit blocks of 32: a few thousandths of a nat on real models
    "INT8":   (0.90, 2e-2, None),
    "8BIT":   (0.90, 2e-2, None),
    "Q6_K":   (0.88, 4e-2, None),
    "Q5_K_M": (0.85, 6e-2, None),
    "Q5_K_S": (0.85, 6e-2, None),
    "Q4_K_M": (0.75, 0.25, None),   # 4-bit: tests/test_quality.py holds the tiny fixture's rows and the demo its
    "Q4_K_S": (0.75, 0.25, None),
    "Q4_0":   (0.70, 0.35, None),   # SmolLM2 rows at these limits (docs/quality.md). Larger models lose less.
    "INT4":   (0.70, 0.35, None),
    "4BIT":   (0.70, 0.35, None),
    # mlx-lm's mixed_4_6 recipe: 4-bit layers, 6 bits for some v_proj/down_proj; never below 4BIT's precision,
    # so 4BIT's limits. Measured on the tiny fixture (8-bit embedding): KL 0.0054 short, 0.010 long.
    "MIXED_4_6": (0.70, 0.35, None),
}


@dataclass(frozen=True)
class Metrics:
    top1: float
    kl: float
    max_abs: float | None          # None: not measured (a top-k reference)
    positions: int
    start: int = 0                 # position of the first token prefilled: > 0 for the long probe's span
    flip_margins: tuple[float, ...] = ()   # the reference's top-2 logit margin at each position whose top-1 differs

    def as_dict(self) -> dict:
        finite = self.max_abs is not None and math.isfinite(self.max_abs)
        return {"top1": round(self.top1, 6), "kl": float(f"{self.kl:.6g}"),
                "max_abs": float(f"{self.max_abs:.6g}") if finite else None, "positions": self.positions,
                "start": self.start, "flip_margins": [float(f"{m:.4g}") for m in self.flip_margins]}

    @classmethod
    def from_dict(cls, d: dict) -> "Metrics":
        return cls(top1=d["top1"], kl=d["kl"], max_abs=d.get("max_abs"), positions=d["positions"],
                   start=d.get("start", 0), flip_margins=tuple(d.get("flip_margins", ())))

    def top1_beyond_ties(self, near_tie: float) -> float:
        """Top-1 agreement with flips at near-ties (a reference margin ≤ near_tie) counted as agreeing."""
        ties = sum(1 for m in self.flip_margins if m <= near_tie)
        return min(1.0, self.top1 + ties / self.positions) if self.positions else self.top1


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare(reference: np.ndarray, candidate: np.ndarray) -> Metrics:
    """Both [positions, vocab]; a padded vocabulary is compared on the common prefix."""
    v = min(reference.shape[-1], candidate.shape[-1])
    ref, cand = reference[:, :v], candidate[:, :v]
    lp, lq = _log_softmax(ref), _log_softmax(cand)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    flips = ref.argmax(-1) != cand.argmax(-1)
    top2 = np.sort(lp[flips], -1)[:, -2:]
    max_abs = float(np.abs(ref.astype(np.float64) - cand).max())
    return Metrics(top1=float(1 - flips.mean()), kl=max(kl, 0.0), max_abs=max_abs, positions=int(ref.shape[0]),
                   flip_margins=tuple(float(m) for m in top2[:, 1] - top2[:, 0]))


def compare_topk(idx: np.ndarray, logprob: np.ndarray, candidate: np.ndarray) -> Metrics:
    """Top-1 agreement and KL restricted to the reference's top-k tokens (a golden reference keeps no full
    logits); max |Δ| is not measured."""
    lp_ref = logprob.astype(np.float64)
    lq_k = np.take_along_axis(_log_softmax(candidate), idx.astype(np.int64), -1)
    kl = float((np.exp(lp_ref) * (lp_ref - lq_k)).sum(-1).mean())
    flips = candidate.argmax(-1) != idx[:, 0]
    margins = lp_ref[flips, 0] - lp_ref[flips, 1]
    return Metrics(top1=float(1 - flips.mean()), kl=max(kl, 0.0), max_abs=None, positions=int(idx.shape[0]),
                   flip_margins=tuple(float(m) for m in margins))


def thresholds_for(precision: str, overrides: dict | None = None) -> tuple[float, float, float | None]:
    # A variant (ONNX "int4-b64-rtn": options after a dash) is held to its own row if it has one, else its base's.
    keys = [precision.upper(), precision.upper().split("-")[0]]
    for key in keys:
        if overrides and key in overrides:
            return tuple(overrides[key])  # type: ignore[return-value]
        if key in THRESHOLDS:
            return THRESHOLDS[key]
    raise KeyError(f"no parity thresholds for precision {precision!r}: add it to phiedge.checks.metrics.THRESHOLDS")


@dataclass(frozen=True)
class Limits:
    """What one artifact is held to: the precision's row of THRESHOLDS (or a profile's override)."""
    top1_min: float
    kl_max: float
    max_abs_max: float | None
    full_precision: bool

    @classmethod
    def for_precision(cls, precision: str, overrides: dict | None = None) -> "Limits":
        top1, kl, max_abs = thresholds_for(precision, overrides)
        return cls(top1, kl, max_abs, is_full_precision(precision))

    @property
    def near_tie(self) -> float:
        """A reference top-2 margin at most this wide is a near-tie: each of the two logits may move by
        max |Δlogit|, so either token is within tolerance there."""
        return 2 * self.max_abs_max if self.max_abs_max is not None else 0.0

    def as_dict(self) -> dict:
        return {"top1_min": self.top1_min, "kl_max": self.kl_max, "max_abs_max": self.max_abs_max}


def failures(regime: str, m: Metrics, limits: Limits) -> list[str]:
    """Every way these metrics miss the limits (empty list = pass)."""
    out = []
    top1 = m.top1_beyond_ties(limits.near_tie)
    if top1 < limits.top1_min:
        ties = f" ({top1:.3f} with near-tie flips allowed)" if top1 != m.top1 else ""
        out.append(f"{regime} top1 {m.top1:.3f}{ties} < {limits.top1_min}")
    if m.kl > limits.kl_max:
        out.append(f"{regime} kl {m.kl:.4g} > {limits.kl_max}")
    if limits.max_abs_max is not None and m.max_abs is not None and m.max_abs > limits.max_abs_max:
        out.append(f"{regime} max_abs {m.max_abs:.4g} > {limits.max_abs_max}")
    return out


@dataclass(frozen=True)
class TokenAgreement:
    """Teacher-forced: given the reference's answer so far, does the artifact pick the reference's next token?
    A position is a near-tie when the reference's own top-2 logit margin is within twice the precision's
    max |Δlogit| (each of the two logits may move by that much): there either token is within tolerance."""
    agree: int
    of: int
    ties: int                 # near-tie positions
    first_tie: int            # index of the first near-tie (`of` if none): greedy decoding must not leave the
                              # reference's answer before it
    misses: tuple[int, ...]   # positions outside near-ties where the artifact picks another token

    @property
    def rate(self) -> float:
        return self.agree / self.of if self.of else 0.0

    def as_dict(self) -> dict:
        return {"agree": self.agree, "of": self.of, "ties": self.ties, "first_tie": self.first_tie,
                "misses": list(self.misses)}


def token_agreement(reference: list[int], margins: list[float] | None, picked: list[int],
                    limits: Limits) -> TokenAgreement:
    """Without margins (an older golden reference) no position counts as a near-tie."""
    tie = limits.near_tie
    margins = margins if margins is not None else [float("inf")] * len(reference)
    agree, ties, misses, first_tie = 0, 0, [], len(reference)
    for i, (want, margin, got) in enumerate(zip(reference, margins, picked)):
        near = margin <= tie
        ties += near
        first_tie = min(first_tie, i) if near else first_tie
        if got == want:
            agree += 1
        elif not near:
            misses.append(i)
    return TokenAgreement(agree=agree, of=len(reference), ties=ties, first_tie=first_tie, misses=tuple(misses))


# A quantized artifact's teacher-forced answer is a sample of a few dozen tokens: it fails its precision's top-1
# threshold only when that is unlikely under it (one-sided binomial, below). At 24 tokens and top-1 0.70 that is
# fewer than 13 agreeing: a broken template or runtime agrees on almost nothing, and the tiny fixture's int4
# answers (reference margins of 0.02-0.55 nats at most positions) land anywhere from 15 to 22 by CPU.
SAMPLE_ALPHA = 0.05


def min_agreeing(of: int, rate: float, alpha: float = SAMPLE_ALPHA) -> int:
    """The fewest agreeing tokens out of `of` that an artifact agreeing at `rate` shows with probability at least
    `alpha`: P(X <= k) >= alpha for X ~ Binomial(of, rate). Fewer is evidence the artifact agrees less."""
    cdf = 0.0
    for k in range(of + 1):
        cdf += math.comb(of, k) * rate ** k * (1 - rate) ** (of - k)
        if cdf >= alpha:
            return k
    return of


FULL_PRECISION = {"F32", "FP32", "F16", "FP16", "BF16"}


def is_full_precision(precision: str) -> bool:
    return precision.upper() in FULL_PRECISION
