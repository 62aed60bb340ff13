"""One precision-name grammar for every exporter, driven by its class constants.

A precision name is a base precision and, for bases that take them, option tokens joined by dashes:
`Q4_K_M`, `int4-b64-rtn-acc4`, `int4-g64-sym-r80-awq-se`, `mixed_4_6-g32-emb4`. Each token sets one option
group (block size, symmetry, algorithm, ...); a token that equals the group's default is left out of the
canonical name, so one build has one name, and tokens are written in the grammar's group order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UsageError


@dataclass(frozen=True)
class Pattern:
    """A family of tokens matched by a regex (OpenVINO's `r<percent>`): the value comes from `value(match)`,
    which raises ValueError with the reason for an out-of-range one."""
    regex: str
    group: str
    value: Callable
    hint: str                   # how the family reads in messages, e.g. "r<percent>"


@dataclass(frozen=True)
class Precision:
    name: str                                   # canonical: base + non-default tokens in group order
    base: str
    given: tuple[tuple[str, str], ...] = ()     # (group, token) set explicitly and not the default
    values: tuple[tuple[str, object], ...] = ()  # (group, value) for every group, defaults included

    def value(self, group: str, default=None):
        return dict(self.values).get(group, default)


@dataclass(frozen=True)
class Grammar:
    format: str
    bases: tuple[str, ...]                      # canonical base names, matched case-insensitively
    option_bases: frozenset[str] = frozenset()  # bases that take option tokens
    tokens: dict[str, tuple[str, object]] = field(default_factory=dict)    # token -> (group, value)
    patterns: tuple[Pattern, ...] = ()
    defaults: dict[str, str] = field(default_factory=dict)   # group -> default token (left out of names)
    order: tuple[str, ...] = ()                 # group order in canonical names
    refused_bases: dict[str, str] = field(default_factory=dict)   # base -> why it is not offered
    # (tokens present, group whose presence makes it fine or None, why): combinations a tool writes but a
    # runtime cannot load, or that contradict each other
    refused: tuple[tuple[frozenset[str], str | None, str], ...] = ()
    noun: str = "precision"                     # "weight format" for OpenVINO
    option_noun: str = "option"                 # "int4 option" where only int4 takes them
    takes_options: str = "takes no options"     # e.g. "only int4 takes options"
    options_hint: str = ""                      # e.g. "int4 takes options, e.g. int4-b64-rtn-acc4"

    def parse(self, value: str) -> Precision:
        """`int4-b64-rtn` -> Precision; a UsageError names the bad part and the known ones."""
        head, *tokens = value.strip().split("-")
        base = next((b for b in self.bases if b.lower() == head.lower()), None)
        if head.lower() in self.refused_bases:
            raise UsageError(f"{self.format} {self.noun} '{value}' is not offered: {self.refused_bases[head.lower()]}; "
                             f"use {', '.join(self.bases)}")
        if base is None:
            hint = f" ({self.options_hint})" if self.options_hint else ""
            raise UsageError(f"{self.format} has no {self.noun} '{value}': known are {', '.join(self.bases)}{hint}")
        if tokens and base not in self.option_bases:
            raise UsageError(f"{self.format} {self.noun} '{value}': {self.takes_options} ({self._known()})")
        chosen: dict[str, tuple[str, object]] = {}
        for t in (t.lower() for t in tokens):
            group, val = self._token(value, t)
            if group in chosen:
                raise UsageError(f"{self.format} {self.noun} '{value}': '{chosen[group][0]}' and '{t}' both set the "
                                 f"{group}: keep one")
            chosen[group] = (t, val)
        present = frozenset(t for t, _ in chosen.values())
        for needs, fixed_by, why in self.refused:
            if needs <= present and (fixed_by is None or fixed_by not in chosen):
                raise UsageError(f"{self.format} {self.noun} '{value}' is refused: {why}" if fixed_by else
                                 f"{self.format} {self.noun} '{value}': {why}")
        if base not in self.option_bases:
            return Precision(name=base, base=base)
        values = {g: self._token(value, t)[1] for g, t in self.defaults.items()}
        values.update({g: v for g, (_, v) in chosen.items()})
        given = tuple((g, chosen[g][0]) for g in self.order if g in chosen and chosen[g][0] != self.defaults.get(g))
        return Precision(name="-".join([base, *(t for _, t in given)]), base=base, given=given,
                         values=tuple(values.items()))

    def _token(self, value: str, token: str) -> tuple[str, object]:
        if token in self.tokens:
            return self.tokens[token]
        for p in self.patterns:
            m = re.fullmatch(p.regex, token)
            if m:
                try:
                    return p.group, p.value(m)
                except ValueError as e:
                    raise UsageError(f"{self.format} {self.noun} '{value}': {p.group} '{token}' {e}") from None
        raise UsageError(f"{self.format} {self.noun} '{value}': unknown {self.option_noun} '{token}': known are "
                         f"{self._known()}")

    def _known(self) -> str:
        return ", ".join([*self.tokens, *(p.hint for p in self.patterns)])

    def canonical(self, precisions: list[str]) -> list[str]:
        """Canonical names, duplicates dropped, order kept."""
        out: list[str] = []
        for p in precisions:
            name = self.parse(p).name
            if name not in out:
                out.append(name)
        return out

    def with_default(self, precisions: list[str], group: str, token: str) -> list[str]:
        """Add `token` to every precision that takes options and names no `group` (e.g. --mlx-group-size)."""
        if token not in self.tokens or self.tokens[token][0] != group:
            known = ", ".join(t for t, (g, _) in self.tokens.items() if g == group)
            raise UsageError(f"{self.format} has no {group} '{token}': known are {known}")
        out = []
        for p in precisions:
            prec = self.parse(p)
            has = any(g == group for g, _ in prec.given) or any(self.tokens.get(t.lower(), ("",))[0] == group
                                                               for t in p.split("-")[1:])
            out.append(f"{p}-{token}" if prec.base in self.option_bases and not has else p)
        return out
