"""report.json (machine-readable), report.html (tables and plots a person would rather look at), README.md."""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
import platform
from importlib import metadata
from pathlib import Path

from . import probes
from .source import Source

VERSIONED = ("phiedge", "torch", "transformers", "peft", "llama-cpp-python", "onnxruntime", "onnxruntime-genai",
             "openvino", "mlx-lm", "huggingface-hub", "tokenizers", "faiss-cpu", "sentence-transformers")


def versions() -> dict[str, str | None]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def build_report(*, model: Source, adapter: Source | None, proof: dict, rows: list[dict], timings: dict,
                 config: dict, peaks_mb: dict | None = None, target: dict | None = None,
                 smoke_question: dict | None = None, cache: dict | None = None) -> dict:
    return {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"ref": model.ref, "revision": model.revision, "architecture": (config.get("architectures") or [None])[0]},
        "adapter": None if adapter is None else {"ref": adapter.ref, "revision": adapter.revision},
        "target": target["name"] if target else None,
        "merge": proof,
        "probes": {"compare_last": probes.COMPARE_LAST, "longrope_switch": probes.switch_point(config)},
        "smoke": None if smoke_question is None else {k: smoke_question.get(k) for k in (
            "question", "needle", "fact", "reference_answer", "retrieved", "retrieved_has_needle")},
        "artifacts": rows,
        "passed": all(r["passed"] for r in rows),
        "timings_s": timings,
        "peak_rss_mb": peaks_mb or {},          # per stage, the whole process tree (sampled every 0.2 s)
        "cache": cache,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine()},
        "versions": versions(),
    }


def write(rep: dict, folder: Path) -> Path:
    path = folder / "report.json"
    tmp = path.with_name("report.json.partial")
    tmp.write_text(json.dumps(rep, indent=2) + "\n")
    tmp.rename(path)
    return path


def _f(m: dict | None, key: str) -> float:
    return float("nan") if not m else m.get(key, float("nan"))


def table(rep: dict) -> str:
    """The parity table as plain text, for the terminal."""
    pw = max([9] + [len(r["precision"]) for r in rep["artifacts"]])
    lines = [f"{'format':8} {'precision':{pw}} {'size':>9}  {'short top1':>10} {'short KL':>9}  {'long top1':>9} "
             f"{'long KL':>9}  {'smoke':>6}  result"]
    for r in rep["artifacts"]:
        s, lg, sm = r["parity"]["short"], r["parity"]["long"], r.get("smoke")
        smoke = "-" if not sm else ("fact" if sm.get("has_fact") else "no fact") if "has_fact" in sm \
            else f"{sm['token_agreement']['agree']}/{sm['of']}"
        lines.append(f"{r['format']:8} {r['precision']:{pw}} {r['size_bytes'] / 1e6:8.1f}M  {_f(s, 'top1'):10.3f} "
                     f"{_f(s, 'kl'):9.2g}  {_f(lg, 'top1'):9.3f} {_f(lg, 'kl'):9.2g}  {smoke:>6}  "
                     f"{'PASS' if r['passed'] else 'FAIL'}")
    m = rep["merge"]
    if m.get("max_abs_vs_peft") is not None:
        lines.append(f"merge proof: |merged - peft| {m['max_abs_vs_peft']:.2g} (tol {m['tolerance']:.2g}), "
                     f"|merged - base| {m['max_abs_vs_base']:.3g}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ HTML

def _svg_scatter(points: list[tuple[str, float, float, str]], xlabel: str, ylabel: str, title: str) -> str:
    """Log-log scatter (label, x, y, colour) as inline SVG: no plotting library on the device or build box."""
    w, h, pad = 520, 300, 56
    pts = [(lab, x, y, c) for lab, x, y, c in points if x > 0 and y is not None and math.isfinite(y)]
    if not pts:
        return f'<figure class="plot"><figcaption>{html.escape(title)}: no data</figcaption></figure>'
    ys = [max(y, 1e-12) for _, _, y, _ in pts]
    xs = [x for _, x, _, _ in pts]
    lx0, lx1 = math.log10(min(xs)) - 0.2, math.log10(max(xs)) + 0.2
    ly0, ly1 = math.log10(min(ys)) - 0.5, math.log10(max(ys)) + 0.5

    def px(x):
        return pad + (math.log10(x) - lx0) / (lx1 - lx0) * (w - 2 * pad)

    def py(y):
        return h - pad - (math.log10(max(y, 1e-12)) - ly0) / (ly1 - ly0) * (h - 2 * pad)

    items = [f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="none" stroke="#999"/>',
             f'<text x="{w / 2}" y="{h - 14}" text-anchor="middle">{html.escape(xlabel)}</text>',
             f'<text x="14" y="{h / 2}" text-anchor="middle" transform="rotate(-90 14 {h / 2})">{html.escape(ylabel)}</text>']
    for lab, x, y, c in pts:
        hollow = lab.endswith("(long)")
        items.append(f'<circle class="point" cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" '
                     f'fill="{"white" if hollow else c}" stroke="{c}" stroke-width="2"><title>'
                     f'{html.escape(lab)}: {x:.3g} MB, KL {y:.3g}</title></circle>')
        if not hollow:
            items.append(f'<text x="{px(x) + 7:.1f}" y="{py(y) - 7:.1f}" font-size="11">'
                         f'{html.escape(lab.rsplit(" (", 1)[0])}</text>')
    for frac in (0.0, 1.0):   # axis end labels (log scales)
        xv, yv = 10 ** (lx0 + frac * (lx1 - lx0)), 10 ** (ly0 + frac * (ly1 - ly0))
        items.append(f'<text x="{pad + frac * (w - 2 * pad):.1f}" y="{h - pad + 14}" font-size="10" '
                     f'text-anchor="middle">{xv:.3g}</text>')
        items.append(f'<text x="{pad - 4}" y="{h - pad - frac * (h - 2 * pad) + 4:.1f}" font-size="10" '
                     f'text-anchor="end">{yv:.0e}</text>')
    items.append(f'<text x="{w - pad}" y="{pad - 8}" font-size="11" text-anchor="end">● short probe  ○ long probe</text>')
    return (f'<figure class="plot"><svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'role="img" aria-label="{html.escape(title)}">{"".join(items)}</svg>'
            f'<figcaption>{html.escape(title)}</figcaption></figure>')


def _svg_bars(bars: list[tuple[str, float]], unit: str, title: str) -> str:
    bars = [(lab, v) for lab, v in bars if v is not None and math.isfinite(v)]
    pad = max([150] + [7 * len(lab) + 12 for lab, _ in bars])     # room for the longest label
    w, bar_h = pad + 370, 22
    if not bars:
        return f'<figure class="plot"><figcaption>{html.escape(title)}: no data</figcaption></figure>'
    top = max(v for _, v in bars) or 1.0
    h = bar_h * len(bars) + 20
    items = []
    for i, (lab, v) in enumerate(bars):
        y = 10 + i * bar_h
        items.append(f'<text x="{pad - 6}" y="{y + 15}" text-anchor="end" font-size="12">{html.escape(lab)}</text>')
        items.append(f'<rect class="bar" x="{pad}" y="{y + 3}" width="{(w - pad - 110) * v / top:.1f}" height="{bar_h - 6}" '
                     f'fill="#4a7fb5"/>')
        items.append(f'<text x="{pad + (w - pad - 110) * v / top + 6:.1f}" y="{y + 15}" font-size="12">{v:.3g} {unit}</text>')
    return (f'<figure class="plot"><svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
            f'aria-label="{html.escape(title)}">{"".join(items)}</svg><figcaption>{html.escape(title)}</figcaption></figure>')


def _smoke_cell(sm: dict | None) -> str:
    if not sm:
        return "–"
    ta = sm["token_agreement"]
    tokens = (f"greedy {sm['prefix_match']}/{sm['of']}; teacher-forced {ta['agree']}/{ta['of']}, "
              f"{ta['ties']} near-tie(s), {len(ta['misses'])} miss(es) outside them")
    if "has_fact" in sm:
        return ("contains the fact" if sm["has_fact"] else "MISSES the fact") + f"; {tokens} (reported)"
    held = "none outside near-ties" if sm.get("agreement_min") is None else f"min {sm['agreement_min']:.2f}"
    return f"{tokens} (held: {held})"


def write_html(rep: dict, folder: Path) -> Path:
    esc = html.escape
    rows = []
    for r in rep["artifacts"]:
        s, lg, sm = r["parity"]["short"], r["parity"]["long"], r.get("smoke")
        cells = [r["format"], r["precision"], f"{r['size_bytes'] / 1e6:.1f} MB",
                 f"{_f(s, 'top1'):.3f}", f"{_f(s, 'kl'):.3g}", f"{_f(s, 'max_abs'):.3g}",
                 f"{_f(lg, 'top1'):.3f}", f"{_f(lg, 'kl'):.3g}", f"{_f(lg, 'max_abs'):.3g}",
                 _smoke_cell(sm),
                 esc(sm["answer"][:120]) if sm else "–",
                 "PASS" if r["passed"] else "FAIL: " + "; ".join(r["failures"])]
        cls = "pass" if r["passed"] else "fail"
        rows.append(f'<tr class="{cls}">' + "".join(f"<td>{c if i == 10 else esc(str(c))}</td>"
                                                     for i, c in enumerate(cells)) + "</tr>")
    colours = {"gguf": "#c0392b", "onnx": "#2980b9", "openvino": "#8e44ad", "mlx": "#27ae60"}
    points = []
    for r in rep["artifacts"]:
        for regime in ("short", "long"):
            m = r["parity"][regime]
            if m:
                points.append((f"{r['format']} {r['precision']} ({regime})", r["size_bytes"] / 1e6, m["kl"],
                               colours.get(r["format"], "#555")))
    perf = [(f"{r['format']} {r['precision']}", (r.get("smoke") or r.get("greedy") or {})) for r in rep["artifacts"]]
    m = rep["merge"]
    merge_line = ("no adapter" if m.get("max_abs_vs_peft") is None else
                  f"|merged − PEFT| = {m['max_abs_vs_peft']:.2g} (tolerance {m['tolerance']:.2g}); "
                  f"|merged − base| = {m['max_abs_vs_base']:.3g}")
    smoke = rep.get("smoke")
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>phiedge report — {esc(rep['model']['ref'])}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
th {{ background: #f3f3f3; }} tr.fail td {{ background: #fde8e8; }} tr.pass td:last-child {{ color: #1e7b34; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 2em; }} figure {{ margin: 0; }} figcaption {{ color: #555; }}
</style></head><body>
<h1>phiedge report</h1>
<p><b>{'PASSED' if rep['passed'] else 'FAILED'}</b> · model {esc(rep['model']['ref'])}
 ({esc(str(rep['model']['architecture']))}) · adapter {esc(str((rep['adapter'] or {}).get('ref')))}
 · target {esc(str(rep.get('target')))} · {esc(rep['created'])}</p>
<p>Merge proof: {esc(merge_line)}</p>
<p>Parity over the last {rep['probes']['compare_last']} positions of a short probe and of a probe past the
LongRoPE switch ({esc(str(rep['probes']['longrope_switch']))} positions).</p>
<table id="parity"><thead><tr><th>format</th><th>precision</th><th>size</th>
<th>short top-1</th><th>short KL</th><th>short max|Δ|</th><th>long top-1</th><th>long KL</th><th>long max|Δ|</th>
<th>smoke answer vs PyTorch</th><th>smoke answer</th><th>result</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
{'<p>Smoke question: ' + esc(smoke['question']) + ' — retrieved chunks contain the answer source: '
 + ('yes' if smoke['retrieved_has_needle'] else 'NO') + '</p>' if smoke else ''}
<div class="plots">
{_svg_scatter(points, 'artifact size (MB)', 'mean KL vs PyTorch (nats)', 'Size vs KL divergence')}
{_svg_bars([(lab, p.get('decode_tps')) for lab, p in perf], 'tok/s', 'Decode tokens/s per runtime')}
{_svg_bars([(lab, p.get('ttft_s')) for lab, p in perf], 's', 'Time to first token per runtime')}
</div>
<h2>Versions</h2><pre>{esc(json.dumps(rep['versions'], indent=1))}</pre>
</body></html>
"""
    path = folder / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path


def readme(rep: dict) -> str:
    """The bundle's README: a function of what was built, not of when (the date is in the manifest and report)."""
    target = rep.get("target")           # the profile's name (build_report)
    extras = ",".join(sorted({r["format"] for r in rep["artifacts"]}) + ["retriever"])
    lines = [f"# phiedge bundle: {rep['model']['ref']}" + (f" + {rep['adapter']['ref']}" if rep["adapter"] else ""), "",
             (f"Built for target `{target}`." if target else "Built without a target profile.") +
             " Every artifact below passed the parity gate",
             "against the PyTorch merged model (see report.html).", "", "## Run it on the device", "",
             "```", f"pip install 'phiedge[{extras}]'     # the device path: no torch",
             "phiedge verify .                           # re-hash every file against manifest.json",
             "phiedge validate .                         # golden references, TTFT and tokens/s on this machine",
             "phiedge ask . \"your question\"              # retrieve, answer, cite sources", "```", "",
             "## Artifacts", ""]
    for r in rep["artifacts"]:
        lines.append(f"- `{r['path']}/` — {r['format']} {r['precision']}, {r['size_bytes'] / 1e6:.1f} MB")
        if r["format"] == "gguf":
            lines.append("  (llama.cpp: keep n_ctx ≤ 4096 unless the prompt needs more — llama.cpp picks Phi-4-mini's "
                         "LongRoPE factors from n_ctx, not from the prompt length)")
    return "\n".join(lines) + "\n"
