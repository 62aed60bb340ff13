"""Measuring an artifact: what its runtime does on a probe set, recorded, not judged.

    probes = ProbeSet.from_reference(reference_npz, smoke_json)     # the build: full-vocabulary references
    probes = ProbeSet.from_reference(reference_npz, smoke_json, long_span=True)   # the long regime on its span
    probes = ProbeSet.from_golden(golden_npz)                       # the device: the bundle's top-k references
    m = measure(runtime, probes)                                    # -> Measurement (JSON round-trips)

The same `measure` runs in the build's worker child (phiedge.worker) and in `phiedge validate`; `judge`
(phiedge.checks.judge) turns a Measurement and the precision's limits into a verdict. Device-path module:
numpy and json only (the runtime is passed in).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .metrics import Metrics, compare, compare_topk


@dataclass(frozen=True)
class RegimeProbe:
    """One LongRoPE regime's prompt and its reference: full logits (build) or top-k log-probs (device)."""
    name: str                                   # "short" | "long"
    ids: tuple[int, ...]
    logits: np.ndarray | None = None            # [last_n, vocab]
    topk_idx: np.ndarray | None = None          # [last_n, k]
    topk_logprob: np.ndarray | None = None
    start: int = 0                              # position of ids[0]: > 0 for the long probe's span (probes.span)

    @property
    def last_n(self) -> int:
        return int((self.logits if self.logits is not None else self.topk_idx).shape[0])

    def compare(self, candidate: np.ndarray) -> Metrics:
        if self.logits is not None:
            return compare(self.logits, candidate)
        return compare_topk(self.topk_idx, self.topk_logprob, candidate)


@dataclass(frozen=True)
class AnswerProbe:
    """A prompt whose greedy answer is compared with PyTorch's, token by token."""
    prompt_ids: tuple[int, ...]
    reference: tuple[int, ...]                  # PyTorch's greedy tokens (stop token excluded)
    margins: tuple[float, ...] | None           # PyTorch's top-2 logit margin at each of them
    fact: str | None = None                     # a real model: what the answer must state
    retrieved_has_needle: bool | None = None    # the smoke question's retrieval found the answer's source
    call: str | None = None                     # the tool-call smoke: PyTorch's call (tools.canonical; "" none)


@dataclass(frozen=True)
class ProbeSet:
    regimes: tuple[RegimeProbe, ...]
    greedy: AnswerProbe | None = None           # the short probe's continuation: reported
    smoke: AnswerProbe | None = None            # the RAG question: held (phiedge.checks.judge)
    not_applicable: tuple[tuple[str, str], ...] = ()    # (regime, why it is not measured)
    toolcall: AnswerProbe | None = None         # the tool-call smoke (phiedge.tools.SMOKE_QUESTION): held

    @classmethod
    def from_reference(cls, reference: Path, smoke: Path | None = None, *, long_span: bool = False) -> "ProbeSet":
        """`long_span`: the long regime measured on the long probe's span at its own positions, not on the
        whole prompt (a runtime must take position spans: Runtime.POSITION_SPANS)."""
        ref = np.load(reference)
        regimes = []
        for n in ("short", "long"):
            if f"{n}_ids" not in ref:
                continue
            ids = tuple(ref[f"{n}_ids"].tolist())
            if n == "long" and long_span:
                start = int(ref["long_span_start"])
                regimes.append(RegimeProbe(n, ids[start:], logits=ref["long_span_logits"], start=start))
            else:
                regimes.append(RegimeProbe(n, ids, logits=ref[f"{n}_logits"]))
        regimes = tuple(regimes)
        return cls(regimes, _greedy(ref), _smoke(smoke), _absent(regimes), _toolcall(ref))

    @classmethod
    def from_golden(cls, golden: Path) -> "ProbeSet":
        g = np.load(golden)
        regimes = tuple(RegimeProbe(n, tuple(g[f"{n}_ids"].tolist()), topk_idx=g[f"{n}_topk_idx"],
                                    topk_logprob=g[f"{n}_topk_logprob"])
                        for n in ("short", "long") if f"{n}_ids" in g)
        return cls(regimes, _greedy(g), None, _absent(regimes), _toolcall(g))


def _greedy(arrays) -> AnswerProbe | None:
    if "short_greedy" not in arrays:
        return None
    margins = tuple(float(m) for m in arrays["short_greedy_margins"]) if "short_greedy_margins" in arrays else None
    return AnswerProbe(tuple(arrays["short_ids"].tolist()), tuple(arrays["short_greedy"].tolist()), margins)


def _toolcall(arrays) -> AnswerProbe | None:
    if "toolcall_ids" not in arrays:
        return None
    return AnswerProbe(tuple(arrays["toolcall_ids"].tolist()), tuple(arrays["toolcall_greedy"].tolist()),
                       tuple(float(m) for m in arrays["toolcall_greedy_margins"]), call=str(arrays["toolcall_call"]))


def _smoke(path: Path | None) -> AnswerProbe | None:
    if path is None:
        return None
    s = json.loads(Path(path).read_text())
    return AnswerProbe(tuple(s["prompt_ids"]), tuple(s["reference_tokens"]), tuple(s["reference_margins"]),
                       s.get("fact"), s.get("retrieved_has_needle"))


def _absent(regimes: tuple[RegimeProbe, ...]) -> tuple[tuple[str, str], ...]:
    have = {r.name for r in regimes}
    return (("long", "n/a: no LongRoPE"),) if "long" not in have else ()


@dataclass(frozen=True)
class Answer:
    """One answer as the runtime gave it, beside the probe it answers."""
    probe: AnswerProbe
    tokens: tuple[int, ...]                     # greedy, on the runtime's own loop
    text: str
    forced: tuple[int, ...]                     # teacher-forced: the runtime's pick after each reference prefix
    prompt_tokens: int
    ttft_s: float
    decode_tps: float

    @property
    def prefix_match(self) -> int:
        """How many leading greedy tokens equal the reference's."""
        n = 0
        for a, b in zip(self.tokens, self.probe.reference):
            if a != b:
                break
            n += 1
        return n


@dataclass(frozen=True)
class Measurement:
    parity: tuple[tuple[str, Metrics], ...] = ()   # (regime, metrics), in probe order
    not_applicable: tuple[tuple[str, str], ...] = ()
    greedy: Answer | None = None
    smoke: Answer | None = None
    toolcall: Answer | None = None
    device: tuple[str, str] | None = None       # (device used, the one requested) when the runtime fell back
    error: str | None = None                    # the runtime failed: nothing else was measured

    def regime(self, name: str) -> Metrics | None:
        return dict(self.parity).get(name)

    def to_json(self) -> dict:
        return {"parity": {n: m.as_dict() for n, m in self.parity}, "not_applicable": dict(self.not_applicable),
                "greedy": _answer_json(self.greedy), "smoke": _answer_json(self.smoke),
                "toolcall": _answer_json(self.toolcall),
                "device": list(self.device) if self.device else None, "error": self.error}

    @classmethod
    def from_json(cls, d: dict) -> "Measurement":
        return cls(parity=tuple((n, Metrics.from_dict(m)) for n, m in d.get("parity", {}).items()),
                   not_applicable=tuple(d.get("not_applicable", {}).items()),
                   greedy=_answer_from(d.get("greedy")), smoke=_answer_from(d.get("smoke")),
                   toolcall=_answer_from(d.get("toolcall")),
                   device=tuple(d["device"]) if d.get("device") else None, error=d.get("error"))


def _answer_json(a: Answer | None) -> dict | None:
    if a is None:
        return None
    p = a.probe
    probe = {"prompt_ids": list(p.prompt_ids), "reference": list(p.reference),
             "margins": None if p.margins is None else list(p.margins), "fact": p.fact,
             "retrieved_has_needle": p.retrieved_has_needle, "call": p.call}
    return {"probe": probe, "tokens": list(a.tokens), "text": a.text, "forced": list(a.forced),
            "prompt_tokens": a.prompt_tokens, "ttft_s": a.ttft_s, "decode_tps": a.decode_tps}


def _answer_from(d: dict | None) -> Answer | None:
    if d is None:
        return None
    p = d["probe"]
    probe = AnswerProbe(tuple(p["prompt_ids"]), tuple(p["reference"]),
                        tuple(p["margins"]) if p.get("margins") is not None else None, p.get("fact"),
                        p.get("retrieved_has_needle"), p.get("call"))
    return Answer(probe, tuple(d["tokens"]), d["text"], tuple(d["forced"]), d["prompt_tokens"], d["ttft_s"],
                  d["decode_tps"])


def measure(runtime, probes: ProbeSet) -> Measurement:
    """Run every probe on a loaded runtime: logits per regime (one prefill each: the whole prompt, or the long
    probe's span at its positions), then each answer greedily and teacher-forced (one more prefill only where
    the greedy answer leaves PyTorch's: see _forced). A runtime that scores on an engine of its own
    (SCORES_APART) teacher-forces every answer first, in one prefill of prompt + answer each, and lets that
    engine go before it generates: the two never hold the weights together (at full size, ONNX's check peaked
    at 13.3 GB with both)."""
    parity = tuple((p.name, replace(p.compare(runtime.logits(list(p.ids), p.last_n, start=p.start)), start=p.start))
                   for p in probes.regimes)
    answers = [probes.greedy, probes.smoke, probes.toolcall]
    forced: list[tuple[int, ...] | None] = [None] * len(answers)
    if getattr(runtime, "SCORES_APART", False):
        forced = [_forced(runtime, list(a.prompt_ids), list(a.reference), []) if a else None for a in answers]
        runtime.release_scoring()
    greedy, smoke, toolcall = (_answer(runtime, a, f) for a, f in zip(answers, forced))
    fell_back = getattr(runtime, "fallback_from", None)
    return Measurement(parity=parity, not_applicable=probes.not_applicable, greedy=greedy, smoke=smoke,
                       toolcall=toolcall, device=(runtime.device, fell_back) if fell_back else None)


def _answer(runtime, probe: AnswerProbe | None, forced: tuple[int, ...] | None = None) -> Answer | None:
    if probe is None:
        return None
    prompt, want = list(probe.prompt_ids), list(probe.reference)
    gen = runtime.generate_ids(prompt, max(1, len(want)), stop_ids=runtime.stop_ids())
    if forced is None:
        forced = _forced(runtime, prompt, want, gen.ids)
    return Answer(probe, tuple(gen.ids), gen.text, forced, gen.prompt_tokens, round(gen.ttft_s, 4),
                  round(gen.decode_tps, 2))


def _forced(runtime, prompt: list[int], want: list[int], got: list[int]) -> tuple[int, ...]:
    """The runtime's pick after each of PyTorch's tokens when fed PyTorch's tokens (teacher forcing).

    Step i of the greedy answer was fed prompt + got[:i]: while got agrees with want, those steps are teacher
    forcing already, and the step that first disagrees is too (it was fed want's prefix). Only the positions
    after that -- or after a stop the answer ended on -- take a prefill of prompt + want: none at all when the
    answer is PyTorch's. With no greedy answer (`got` empty), every position comes from that prefill."""
    agree = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
    known = list(got[:agree + 1])[:len(want)]
    if len(known) == len(want):
        return tuple(known)
    rows = runtime.logits(prompt + want, len(want) + 1)[len(known):len(want)]
    return tuple(known + [int(t) for t in rows.argmax(-1)])
