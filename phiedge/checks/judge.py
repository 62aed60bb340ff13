"""Judging a measurement: a pure function of what was measured and what the precision is held to.

    verdict = judge(measurement, Limits.for_precision("Q4_K_M", overrides))

Nothing here runs a model or changes its inputs. The rules:
- parity: in each measured regime, top-1 ≥ top1_min (a flip where the reference's top-2 margin is within twice
  max_abs_max, a near-tie, counts as agreeing), mean KL ≤ kl_max, max |Δlogit| ≤ max_abs_max (when the
  reference has full logits);
- smoke (the RAG question, when the build has documents): the retrieved chunks contain the answer's source; with
  a fact (a real model), the answer states it and token agreement is reported, not held (an fp16-activation
  runtime such as MLX fp16 flips real near-ties: 23/24 teacher-forced on SmolLM2); without one, PyTorch's answer
  is replayed token by token: a full-precision artifact picks PyTorch's token wherever PyTorch's top-2 margin
  is wider than twice the precision's logit tolerance (a near-tie otherwise) and its greedy answer follows
  PyTorch's at least up to the first near-tie; a quantized one agrees teacher-forced as often as its top-1
  threshold allows for a sample of that many tokens (metrics.min_agreeing: below it only by chance < 5 %);
- tool call (phiedge.tools.SMOKE_QUESTION with its tools), when PyTorch's own answer is a well-formed call: the
  artifact's answer must be a call that parses and fits the tool's schema; a full-precision artifact's is
  PyTorch's call (name and arguments) unless its answer leaves PyTorch's at a near-tie (an argument the model
  itself hesitates on), and picks PyTorch's token teacher-forced wherever the margin is clear; a quantized one's
  answer tokens agree teacher-forced as the smoke's do.
  When PyTorch answers without a call (a model not trained for Phi-4-mini's tool format) it is reported only;
- greedy (the short probe's continuation): reported, never held.
Device-path module.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .measure import Answer, Measurement
from .metrics import Limits, TokenAgreement, failures, min_agreeing, token_agreement


@dataclass(frozen=True)
class Verdict:
    failures: tuple[str, ...]
    greedy: TokenAgreement | None = None
    smoke: TokenAgreement | None = None
    has_fact: bool | None = None
    agreement_min: float | None = None          # the smoke agreement held (quantized, no fact), else None
    toolcall: TokenAgreement | None = None
    call: str | None = None                     # the artifact's call (tools.canonical), or why it is none

    @property
    def passed(self) -> bool:
        return not self.failures


def states(answer: str, fact: str) -> bool:
    """Whether `answer` states `fact` as a whole number or word, case-insensitively: "3.8" is in "3.8B-parameter"
    and "3.8 billion", "32" is not in "232 layers" nor "320" (a 4-bit SmolLM2 answered "232 Transformer layers")."""
    before = r"(?<![0-9.])" if fact[:1].isdigit() else r"(?<![0-9A-Za-z])"
    after = r"(?![0-9])" if fact[-1:].isdigit() else r"(?![0-9A-Za-z])"
    return re.search(before + re.escape(fact) + after, answer, re.IGNORECASE) is not None


def _agreement(a: Answer | None, limits: Limits) -> TokenAgreement | None:
    if a is None:
        return None
    return token_agreement(list(a.probe.reference), list(a.probe.margins) if a.probe.margins else None,
                           list(a.forced), limits)


def judge(m: Measurement, limits: Limits) -> Verdict:
    if m.error:
        return Verdict((m.error,))
    fails = [f for regime, metrics in m.parity for f in failures(regime, metrics, limits)]
    smoke = _agreement(m.smoke, limits)
    has_fact, held = None, None
    if m.smoke is not None:
        probe = m.smoke.probe
        if probe.retrieved_has_needle is False:
            fails.append("smoke: the retrieved chunks do not contain the answer's source")
        if probe.fact:
            has_fact = states(m.smoke.text, probe.fact)
            if not has_fact:
                fails.append(f"smoke: the answer does not contain {probe.fact!r}")
        elif limits.full_precision:
            fails += _replay_failures("smoke", smoke, limits)
            if m.smoke.prefix_match < smoke.first_tie:
                fails.append(f"smoke: the greedy answer leaves PyTorch's at token {m.smoke.prefix_match} of "
                             f"{smoke.of}, before any near-tie")
        else:
            need = min_agreeing(smoke.of, limits.top1_min)
            held = need / smoke.of if smoke.of else limits.top1_min
            fails += _replay_failures("smoke", smoke, limits)
    toolcall, call = _toolcall(m.toolcall, limits, fails)
    return Verdict(tuple(fails), _agreement(m.greedy, limits), smoke, has_fact, held, toolcall, call)


def _toolcall(a: Answer | None, limits: Limits, fails: list[str]) -> tuple[TokenAgreement | None, str | None]:
    if a is None:
        return None, None
    from .. import tools
    from ..errors import ToolCallError
    agreement = _agreement(a, limits)
    try:
        calls = tools.parse(a.text)
    except ToolCallError as e:
        calls, call = None, str(e)
    else:
        call = tools.canonical(calls) if calls else "no call"
    if not a.probe.call:                         # PyTorch makes no call itself: reported only
        return agreement, call
    if calls is None:
        fails.append(f"tool call: {call}")
    elif not calls:
        fails.append(f"tool call: the answer makes no call, PyTorch's calls {a.probe.call}")
    else:
        fails += [f"tool call: {p}" for p in tools.check(calls, tools.SMOKE_TOOLS)]
        if limits.full_precision and call != a.probe.call and a.prefix_match < agreement.first_tie:
            fails.append(f"tool call: {call} is not PyTorch's {a.probe.call} (the answer leaves PyTorch's at "
                         f"token {a.prefix_match}, before any near-tie)")
    fails += _replay_failures("tool call", agreement, limits)
    return agreement, call


def _replay_failures(what: str, agreement: TokenAgreement, limits: Limits) -> list[str]:
    """PyTorch's answer replayed teacher-forced: a full-precision artifact takes PyTorch's token wherever the margin
    is clear; a quantized one agrees as often as its top-1 threshold allows beyond chance (min_agreeing)."""
    if limits.full_precision:
        return [] if not agreement.misses else [
            f"{what}: the answer takes another token than PyTorch at position(s) "
            f"{', '.join(map(str, agreement.misses))} of {agreement.of}, none of them a near-tie"]
    need = min_agreeing(agreement.of, limits.top1_min)
    return [] if agreement.agree >= need else [
        f"{what}: teacher-forced answer tokens agree with PyTorch at {agreement.rate:.2f} ({agreement.agree}/"
        f"{agreement.of} < {need}: below top-1 {limits.top1_min:.2f} beyond chance)"]
