"""`phiedge sweep`: quality per byte. Every candidate precision of a format is built and checked through the build's
own stages (phiedge.build.measure: the same cache, the same gate measurements, no bundle and no smoke query), and
each is set against the tool's own default 4-bit (Exporter.TOOL_4BIT), measured on the same model and text.

- Quality: mean KL of the gate's probes against PyTorch, over both LongRoPE regimes where the model has them
  (`kl`), with each regime's KL and top-1.
- Size: the artifact's bytes, and projected to Phi-4-mini's proportions (`full_size_bytes`): the token embedding
  and LM head's bytes per parameter times Phi-4-mini's tied embedding (200,064 x 3,072, 16 % of its parameters)
  plus the other weights' bytes per parameter times its other 3.22 B (21 % of SmolLM2's parameters are its
  embedding, so a choice about the embedding's bits weighs differently at full size).
- The Pareto front per format (no other candidate is both smaller at full size and lower in KL), and `choose`:
  the lowest-KL candidate that passed its gate within a size.

Writes sweep.json and sweep.html (a size-KL plot per format, inline SVG, and the tables) into --out.
"""
from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import exporters
from .checks import ArtifactResult
from .errors import OutputExistsError

log = logging.getLogger("phiedge")
# Phi-4-mini-instruct: 3,836,021,760 parameters, its tied embedding 200,064 x 3,072.
FULL_EMBEDDING_PARAMS = 200_064 * 3_072
FULL_OTHER_PARAMS = 3_836_021_760 - FULL_EMBEDDING_PARAMS


@dataclass(frozen=True)
class Row:
    format: str
    precision: str
    size_bytes: int
    full_size_bytes: int
    kl: float
    kl_short: float
    top1_short: float
    kl_long: float | None
    top1_long: float | None
    passed: bool
    failures: tuple[str, ...]
    anchor: bool = False            # the tool's own default 4-bit
    pareto: bool = False
    kl_ratio: float | None = None   # against the anchor
    size_ratio: float | None = None
    full_size_ratio: float | None = None


def params_split(config: dict, n_params: int) -> tuple[int, int]:
    """(token embedding parameters, the others) of a model with a tied embedding."""
    emb = int(config["vocab_size"]) * int(config["hidden_size"])
    return emb, n_params - emb


def row_of(r: ArtifactResult, embedding_params: int, other_params: int) -> Row:
    """One checked artifact as a sweep row (its weights split by Exporter.weight_bytes)."""
    exp = exporters.get(r.artifact.format)
    split = exp.weight_bytes(r.artifact)
    full = split["embedding"] / max(1, embedding_params) * FULL_EMBEDDING_PARAMS + \
        split["other"] / max(1, other_params) * FULL_OTHER_PARAMS
    short, long = r.measurement.regime("short"), r.measurement.regime("long")
    kls = [m.kl for m in (short, long) if m is not None]
    # a candidate its runtime could not run (r.verdict names why) is a failed row at infinite KL: never chosen,
    # never on the front, written as null
    return Row(format=r.artifact.format, precision=r.artifact.precision, size_bytes=r.size_bytes,
               full_size_bytes=int(full), kl=sum(kls) / len(kls) if kls else math.inf,
               kl_short=short.kl if short else math.inf, top1_short=short.top1 if short else 0.0,
               kl_long=long.kl if long else None, top1_long=long.top1 if long else None, passed=r.passed,
               failures=tuple(r.verdict.failures), anchor=r.artifact.precision == exp.TOOL_4BIT)


def rank(rows: list[Row]) -> list[Row]:
    """Rows with their ratios to their format's anchor and whether they are on its Pareto front, by format, then
    by full-size bytes."""
    out = []
    for fmt in dict.fromkeys(r.format for r in rows):
        mine = sorted((r for r in rows if r.format == fmt), key=lambda r: (r.full_size_bytes, r.kl))
        anchor = next((r for r in mine if r.anchor), None)
        for r in mine:
            front = not any(o is not r and o.full_size_bytes <= r.full_size_bytes and o.kl <= r.kl and
                            (o.full_size_bytes, o.kl) != (r.full_size_bytes, r.kl) for o in mine)
            ratios = {} if anchor is None else {
                "kl_ratio": r.kl / anchor.kl if anchor.kl > 0 else math.inf,
                "size_ratio": r.size_bytes / anchor.size_bytes,
                "full_size_ratio": r.full_size_bytes / anchor.full_size_bytes}
            out.append(Row(**{**asdict(r), "pareto": front, **ratios}))
    return out


def choose(rows: list[Row], fmt: str, max_bytes: int) -> Row | None:
    """The lowest-KL candidate of `fmt` that passed its gate and is at most `max_bytes` (its real size)."""
    fits = [r for r in rows if r.format == fmt and r.passed and r.size_bytes <= max_bytes]
    return min(fits, key=lambda r: (r.kl, r.size_bytes), default=None)


def candidates(formats: list[str], given: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each format's candidates (given, or the exporter's SWEEP), its anchor first, canonical and deduplicated."""
    out = {}
    for f in formats:
        exp = exporters.get(f)
        out[f] = exp.check_precisions([exp.TOOL_4BIT, *(given.get(f) or exp.SWEEP)])
    return out


def prepare(out: Path, force: bool) -> None:
    """--out is empty, a previous sweep's, or replaced with --force."""
    if out.exists() and any(out.iterdir()) and not (out / "sweep.json").is_file() and not force:
        raise OutputExistsError(f"--out {out} is not empty and holds no sweep.json: choose another folder, or pass "
                                f"--force to write into it")


def run(req, out: Path) -> dict:
    """Build and check every candidate of `req.formats` (phiedge.build.measure), rank them, write the report."""
    from .build import measure
    results, config, n_params = measure(replace(req, smoke=False, force=True))
    emb, other = params_split(config, n_params)
    rows = rank([row_of(r, emb, other) for r in results])
    sweep = {"model": str(req.model), "adapters": dict(req.adapters), "docs": str(req.docs) if req.docs else None,
             "calibration_tokens": req.calibration_tokens, "embedding_params": emb, "other_params": other,
             "full_size": {"embedding_params": FULL_EMBEDDING_PARAMS, "other_params": FULL_OTHER_PARAMS},
             "rows": [{k: _finite(v) for k, v in asdict(r).items()} for r in rows]}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "sweep.json.partial"
    tmp.write_text(json.dumps(sweep, indent=1))
    tmp.rename(out / "sweep.json")
    (out / "sweep.html").write_text(render(sweep))
    return sweep


def _finite(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


def table(sweep: dict) -> str:
    lines = [f"{'format':9}{'precision':26}{'size':>9}{'at 3.8B':>9}{'KL':>9}{'top1':>7}{'KL x':>7}{'size x':>8}"
             f"{'3.8B x':>8}  front  gate"]
    for r in sweep["rows"]:
        def x(v):
            return f"{v:.2f}" if v is not None else "-"
        lines.append(f"{r['format']:9}{r['precision'] + (' *' if r['anchor'] else ''):26}"
                     f"{r['size_bytes'] / 1e6:8.1f}M{r['full_size_bytes'] / 1e9:8.2f}G"
                     f"{'-' if r['kl'] is None else format(r['kl'], '.4f'):>9}"
                     f"{r['top1_short']:7.3f}{x(r['kl_ratio']):>7}{x(r['size_ratio']):>8}{x(r['full_size_ratio']):>8}"
                     f"  {'yes' if r['pareto'] else '':5}  {'PASS' if r['passed'] else 'FAIL'}")
    return "\n".join(lines) + "\n(* the tool's own default 4-bit; ratios are against it)"


def render(sweep: dict) -> str:
    """sweep.html: per format, size at Phi-4-mini's proportions against mean KL (log scale), the front joined."""
    parts = [f"<h1>phiedge sweep: {html.escape(sweep['model'])}</h1>",
             "<p>Mean KL against PyTorch over the gate's probes (lower is better) against the artifact's size projected "
             "to Phi-4-mini's proportions. Filled: on the Pareto front; ringed: the tool's own default 4-bit.</p>"]
    for fmt in dict.fromkeys(r["format"] for r in sweep["rows"]):
        measured = [r for r in sweep["rows"] if r["format"] == fmt and r["kl"] is not None]
        if measured:
            parts.append(f"<h2>{fmt}</h2>" + _plot(measured))
    parts.append("<pre>" + html.escape(table(sweep)) + "</pre>")
    return ("<!doctype html><meta charset='utf-8'><title>phiedge sweep</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}</style>" + "".join(parts))


def _plot(rows: list[dict], w: int = 640, h: int = 360, pad: int = 60) -> str:
    xs = [r["full_size_bytes"] / 1e9 for r in rows]
    ys = [math.log10(max(r["kl"], 1e-6)) for r in rows]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def px(x, y):
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad), h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)
    svg = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-size='11'>",
           f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{h - pad}' stroke='black'/>",
           f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{h - pad}' stroke='black'/>",
           f"<text x='{w / 2}' y='{h - 15}' text-anchor='middle'>size at Phi-4-mini proportions (GB): "
           f"{x0:.2f} to {x1:.2f}</text>",
           f"<text x='12' y='{h / 2}' transform='rotate(-90 12 {h / 2})' text-anchor='middle'>mean KL (log): "
           f"{10 ** y0:.3g} to {10 ** y1:.3g}</text>"]
    front = sorted((px(x, y) for x, y, r in zip(xs, ys, rows) if r["pareto"]))
    if len(front) > 1:
        svg.append("<polyline fill='none' stroke='#36c' points='" + " ".join(f"{a:.1f},{b:.1f}" for a, b in front)
                   + "'/>")
    for x, y, r in zip(xs, ys, rows):
        a, b = px(x, y)
        svg.append(f"<circle cx='{a:.1f}' cy='{b:.1f}' r='5' fill='{'#36c' if r['pareto'] else 'white'}' "
                   f"stroke='{'#c33' if r['anchor'] else '#36c'}' stroke-width='{3 if r['anchor'] else 1.5}'/>"
                   f"<text x='{a + 8:.1f}' y='{b - 6:.1f}'>{html.escape(r['precision'])}</text>")
    return "".join(svg) + "</svg>"
