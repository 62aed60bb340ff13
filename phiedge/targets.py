"""Device target profiles: `targets/*.toml` loaded into frozen dataclasses, validated, unknown keys refused.

A profile names the artifacts (format + precision) a device takes, the runtime settings it runs them
with, and optional parity thresholds it holds (tighter or looser than phiedge.checks.metrics.THRESHOLDS, per
precision, as [top1_min, kl_max] or [top1_min, kl_max, max_abs_max]).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import tomllib

from .errors import TargetError, UsageError

AUTO = "auto"      # a profile's precision chosen by measurement: phiedge.sweep.choose under max_size_gb


@dataclass(frozen=True)
class ArtifactSpec:
    format: str
    precision: str
    max_size_gb: float | None = None              # precision "auto": the largest artifact it may ship
    candidates: tuple[str, ...] = ()               # precision "auto": what it chooses from (default: a sweep's)

    def choices(self) -> list[str]:
        """The precisions this row builds: itself, or for "auto" its candidates (phiedge.sweep.candidates)."""
        if self.precision != AUTO:
            return [self.precision]
        from .sweep import candidates
        return candidates([self.format], {self.format: list(self.candidates)} if self.candidates else {})[self.format]


@dataclass(frozen=True)
class RuntimeSpec:
    threads: int = 4
    n_ctx: int = 4096            # the largest context the device affords (ask / smoke); parity is not capped
    device: str = "CPU"
    fallback: str | None = None  # device to use (and record) when `device` is absent


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    artifacts: tuple[ArtifactSpec, ...]
    runtime: RuntimeSpec
    thresholds: tuple[tuple[str, tuple[float, ...]], ...] = ()
    path: str = ""

    def plan(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for a in self.artifacts:
            out.setdefault(a.format, []).extend(p for p in a.choices() if p not in out.get(a.format, []))
        return out

    def auto(self) -> dict[str, tuple[int, tuple[str, ...]]]:
        """{format: (largest artifact in bytes, candidates)} of its "auto" rows."""
        return {a.format: (int(a.max_size_gb * 1e9), tuple(a.choices())) for a in self.artifacts
                if a.precision == AUTO}

    def request_fields(self, plan: dict[str, list[str]]) -> dict:
        """What the profile sets in a BuildRequest building `plan` (phiedge build --target, phiedge matrix): its
        thresholds, itself for the manifest, and its "auto" rows still in the plan."""
        return {"thresholds": self.threshold_overrides(), "target": self.as_dict(),
                "auto": {f: a for f, a in self.auto().items() if set(a[1]) <= set(plan.get(f, []))}}

    def threshold_overrides(self) -> dict[str, tuple]:
        return {p.upper(): (*v, None)[:3] for p, v in self.thresholds}

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "artifacts": [{"format": a.format, "precision": a.precision,
                               **({"max_size_gb": a.max_size_gb, "candidates": a.choices()}
                                  if a.precision == AUTO else {})} for a in self.artifacts],
                "runtime": {f.name: getattr(self.runtime, f.name) for f in fields(RuntimeSpec)},
                "thresholds": {p: list(v) for p, v in self.thresholds}}


def search_path() -> list[Path]:
    """PHIEDGE_TARGETS, the source tree's targets/, then the installed share/phiedge/targets."""
    paths = []
    if os.environ.get("PHIEDGE_TARGETS"):
        paths.append(Path(os.environ["PHIEDGE_TARGETS"]))
    paths += [Path(__file__).resolve().parents[1] / "targets", Path(sys.prefix) / "share" / "phiedge" / "targets"]
    return [p for p in paths if p.is_dir()]


def available() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in reversed(search_path()):
        for f in sorted(d.glob("*.toml")):
            found[f.stem] = f
    return dict(sorted(found.items()))


def load(name_or_path: str) -> Target:
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.exists():
        return parse(p)
    known = available()
    if name_or_path not in known:
        raise TargetError(f"unknown target '{name_or_path}': known targets are {', '.join(known) or 'none'} "
                          f"(`phiedge targets` lists them; a path to a .toml file works too)")
    return parse(known[name_or_path])


def _check_keys(where: str, table: dict, allowed: set[str], required: set[str] = frozenset()) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise TargetError(f"{where}: unknown key '{unknown[0]}': known keys are {', '.join(sorted(allowed))}")
    missing = sorted(required - set(table))
    if missing:
        raise TargetError(f"{where}: missing key '{missing[0]}'")


def _typed(where: str, key: str, value, typ):
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise TargetError(f"{where}: '{key}' must be {getattr(typ, '__name__', typ)}, got {value!r}")
    return value


def parse(path: Path) -> Target:
    where = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"{where}: not valid TOML ({e}): fix the file") from None
    _check_keys(where, data, {"name", "description", "artifacts", "runtime", "thresholds"},
                {"name", "artifacts"})
    name = _typed(where, "name", data["name"], str)
    if name != path.stem:
        raise TargetError(f"{where}: name '{name}' differs from the file name '{path.stem}': make them equal")
    arts = []
    for i, a in enumerate(_typed(where, "artifacts", data["artifacts"], list)):
        w = f"{where} [[artifacts]] #{i + 1}"
        _typed(w, "artifact", a, dict)
        _check_keys(w, a, {"format", "precision", "max_size_gb", "candidates"}, {"format", "precision"})
        fmt, prec = _typed(w, "format", a["format"], str), _typed(w, "precision", a["precision"], str)
        if prec == AUTO:
            size = a.get("max_size_gb")
            if isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0:
                raise TargetError(f"{w}: precision \"auto\" needs max_size_gb, the largest artifact it may ship in "
                                  f"GB (e.g. max_size_gb = 2.8)")
            cands = tuple(_typed(w, "candidates", a.get("candidates", []), list))
            if any(c == AUTO or not isinstance(c, str) for c in cands):
                raise TargetError(f"{w}: candidates must be precision names, got {list(cands)!r}")
            arts.append(ArtifactSpec(fmt, prec, float(size), cands))
        elif "max_size_gb" in a or "candidates" in a:
            raise TargetError(f"{w}: max_size_gb and candidates belong to precision \"auto\" (this row names "
                              f"'{prec}'): drop them, or set precision = \"auto\"")
        else:
            arts.append(ArtifactSpec(fmt, prec))
    if not arts:
        raise TargetError(f"{where}: no [[artifacts]]: name at least one format and precision")
    rt = data.get("runtime", {})
    _check_keys(f"{where} [runtime]", rt, {f.name for f in fields(RuntimeSpec)})
    runtime = RuntimeSpec(
        threads=_typed(f"{where} [runtime]", "threads", rt.get("threads", 4), int),
        n_ctx=_typed(f"{where} [runtime]", "n_ctx", rt.get("n_ctx", 4096), int),
        device=_typed(f"{where} [runtime]", "device", rt.get("device", "CPU"), str).upper(),
        fallback=(_typed(f"{where} [runtime]", "fallback", rt["fallback"], str).upper() if "fallback" in rt else None))
    if runtime.threads < 1 or runtime.n_ctx < 256:
        raise TargetError(f"{where} [runtime]: threads must be >= 1 and n_ctx >= 256")
    thresholds = []
    for prec, v in data.get("thresholds", {}).items():
        if not (isinstance(v, list) and 2 <= len(v) <= 3 and all(isinstance(x, (int, float)) for x in v)):
            raise TargetError(f"{where} [thresholds]: '{prec}' must be [top1_min, kl_max] or "
                              f"[top1_min, kl_max, max_abs_max], got {v!r}")
        thresholds.append((prec.upper(), tuple(float(x) for x in v)))
    return Target(name=name, description=str(data.get("description", "")), artifacts=tuple(arts),
                  runtime=runtime, thresholds=tuple(thresholds), path=where)


def resolve_plan(target: str | None, formats: list[str],
                 flags: dict[str, tuple[list[str], dict[str, str]]]) -> tuple[dict[str, list[str]], Target | None]:
    """What to build: {format: [precision, ...]} and the profile, from `--target`, `--formats` and the precision
    flags ({format: (precisions, {option group: token})}, phiedge.cli). With a profile, a precision flag replaces
    that profile's precisions of its format (a modifier such as --mlx-group-size applies to them); a flag or a
    format the profile does not have is refused, never silently ignored."""
    from . import exporters
    from .build import plan_formats

    def flag(fmt: str) -> str:
        return exporters.REGISTRY[fmt].CLI_FLAG if fmt in exporters.REGISTRY else fmt

    def apply(fmt: str, precs: list[str], mods: dict[str, str]) -> list[str]:
        for group, token in mods.items():
            precs = exporters.get(fmt).GRAMMAR.with_default(precs, group, token)
        return precs

    if target is None:
        wanted = formats or ["gguf"]
        for f in wanted:
            exporters.get(f)                     # an unknown format lists the known ones
        stray = sorted(set(flags) - set(wanted))
        if stray:
            raise UsageError(f"{flag(stray[0])} is given but {stray[0]} is not in --formats "
                             f"({', '.join(wanted)}): add {stray[0]} to --formats or drop the flag")
        return plan_formats(wanted, {f: apply(f, p or [exporters.get(f).DEFAULT_PRECISION], m)
                                     for f, (p, m) in flags.items()}), None
    profile = load(target)
    have = profile.plan()
    missing = sorted(set(formats) - set(have))
    if missing:
        raise UsageError(f"target '{profile.name}' has no {missing[0]} artifact (it has {', '.join(have)}): drop "
                         f"{missing[0]} from --formats, or build it without --target")
    plan = {f: p for f, p in have.items() if not formats or f in formats}
    for fmt, (precs, mods) in flags.items():
        if fmt not in plan:
            raise UsageError(f"{flag(fmt)} does not apply: target '{profile.name}' builds no {fmt} artifact here "
                             f"(it builds {', '.join(plan)}); drop the flag, or build {fmt} without --target")
        plan[fmt] = apply(fmt, precs or plan[fmt], mods)
    return plan_formats(list(plan), plan), profile
