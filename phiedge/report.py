"""report.json (machine-readable), report.html (tables and plots a person would rather look at), README.md.

Everything here reads the build's ArtifactResults (as their `to_json` rows) and changes none of them. The plots
are matplotlib figures written as SVG into the page (no JavaScript, no CDN: the report renders offline).
"""
from __future__ import annotations

import datetime as _dt
import html
import io
import json
import platform
from importlib import metadata
from pathlib import Path

from . import card, tools
from .checks import probes
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


def build_report(*, model: Source, adapters: dict[str, Source], proofs: dict[str | None, dict], results: list,
                 timings: dict, config: dict, peaks_mb: dict | None = None, target: dict | None = None,
                 smoke_question: dict | None = None, cache: dict | None = None, hub_id: str | None = None) -> dict:
    """`proofs`: each variant's merge proof, by adapter name (None: the base alone, no adapter). One variant's
    adapter and proof are also "adapter" and "merge" (None when the bundle holds several)."""
    rows = [r.to_json() for r in results]
    for row in rows:            # the tokenizer and template it ships (or, kept separate, its adapter applies)
        row["tokenizer"] = (proofs.get(row.get("adapter")) or {}).get("tokenizer")
    named = [{"name": n, "ref": adapters[n].ref if n else None, "revision": adapters[n].revision if n else None,
              "merge": proof} for n, proof in proofs.items()]
    one = named[0] if len(named) == 1 else None
    pairs = [r for r in rows if r.get("adapter_path")]
    base_bytes = sum({r["path"]: r["size_bytes"] for r in pairs}.values())
    return {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"ref": model.ref, "revision": model.revision, "architecture": (config.get("architectures") or [None])[0],
                  "hub_id": hub_id},
        "adapter": {"ref": one["ref"], "revision": one["revision"]} if one and one["name"] else None,
        "adapters": named,
        "target": target["name"] if target else None,
        "merge": one["merge"] if one else None,
        # --adapter-mode separate: the base artifacts once and each adapter's files, against a merged copy of the
        # base artifacts per adapter (a merged artifact is the size of its base).
        "separate": None if not pairs else {
            "base_bytes": base_bytes,
            "adapter_bytes": sum({r["adapter_path"]: r["adapter_size_bytes"] for r in pairs}.values()),
            "merged_copies_bytes": base_bytes * len({r["adapter"] for r in pairs})},
        "probes": {"compare_last": probes.COMPARE_LAST, "longrope_switch": probes.switch_point(config)},
        "smoke": None if smoke_question is None else {k: smoke_question.get(k) for k in (
            "question", "needle", "fact", "reference_answer", "retrieved", "retrieved_has_needle")},
        "artifacts": rows,
        "passed": all(r.passed for r in results),
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


def cell(row: dict, regime: str, key: str, fmt: str) -> str:
    """One metric of one regime as text; a regime that was not measured says why (never `nan`)."""
    m = row["parity"].get(regime)
    if m is None:
        return (row.get("not_applicable") or {}).get(regime, "n/a")
    return "-" if m.get(key) is None else format(m[key], fmt)


def variant(row: dict) -> str:
    """A row's precision and which adapter where the bundle has several or keeps them separate: "Q4_K_M",
    "Q4_K_M@legal" (merged) or "Q4_K_M+legal" (the base artifact with the adapter applied at run time)."""
    return row["label"].split(" ", 1)[1]


def table(rep: dict) -> str:
    """The parity table as plain text, for the terminal."""
    pw = max([9] + [len(variant(r)) for r in rep["artifacts"]])
    lines = [f"{'format':8} {'precision':{pw}} {'size':>9}  {'short top1':>10} {'short KL':>9}  {'long top1':>16} "
             f"{'long KL':>16}  {'smoke':>7}  {'tool call':>9}  {'template':>8}  result"]
    for r in rep["artifacts"]:
        sm = r.get("smoke")
        smoke = "-" if not sm else ("fact" if sm.get("has_fact") else "no fact") if "has_fact" in sm \
            else f"{sm['token_agreement']['agree']}/{sm['of']}"
        lines.append(f"{r['format']:8} {variant(r):{pw}} {r['size_bytes'] / 1e6:8.1f}M  "
                     f"{cell(r, 'short', 'top1', '.3f'):>10} {cell(r, 'short', 'kl', '.2g'):>9}  "
                     f"{cell(r, 'long', 'top1', '.3f'):>16} {cell(r, 'long', 'kl', '.2g'):>16}  {smoke:>7}  "
                     f"{_toolcall_word(r.get('toolcall')):>9}  {template_source(r):>8}  "
                     f"{'PASS' if r['passed'] else 'FAIL'}")
    if rep.get("separate"):
        sep = rep["separate"]
        lines.append(f"adapters kept separate: base {sep['base_bytes'] / 1e6:.1f} MB once + adapters "
                     f"{sep['adapter_bytes'] / 1e6:.1f} MB, against {sep['merged_copies_bytes'] / 1e6:.1f} MB merged")
    for a in rep["adapters"]:
        if a["merge"].get("max_abs_vs_peft") is not None:
            lines.append(f"merge proof{' of ' + a['name'] if len(rep['adapters']) > 1 else ''}: "
                         f"{merge_line(a['merge'], plain=True)}")
    return "\n".join(lines)


def template_source(row: dict) -> str:
    """Whose chat template and special tokens an artifact runs with: "base", or "adapter" (its own files won)."""
    return (row.get("tokenizer") or {}).get("source") or "-"


def merge_line(m: dict, *, plain: bool = False) -> str:
    """One merge proof as a sentence."""
    if m.get("max_abs_vs_peft") is None:
        return "no adapter"
    minus = "-" if plain else "−"
    return (f"|merged {minus} PEFT| {m['max_abs_vs_peft']:.2g} (tolerance {m['tolerance']:.2g}), "
            f"|merged {minus} base| {m['max_abs_vs_base']:.3g}")


# ------------------------------------------------------------------------------------------------ HTML

TOOL_SMOKE = (f"\"{tools.SMOKE_QUESTION}\" with the tool {tools.SMOKE_TOOLS[0]['name']} in the system turn; held "
              f"when PyTorch's own answer is a call (full precision: the same call; quantized: a call that parses and "
              f"fits the schema, answer tokens agreeing teacher-forced)")
COLOURS = {"gguf": "#c0392b", "onnx": "#2980b9", "openvino": "#8e44ad", "mlx": "#27ae60"}


def _svg(fig) -> str:
    """A matplotlib figure as inline SVG (its XML header dropped)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _figure(title: str, svg: str | None) -> str:
    if svg is None:
        return f'<figure class="plot"><figcaption>{html.escape(title)}: no data</figcaption></figure>'
    return f'<figure class="plot">{svg}<figcaption>{html.escape(title)}</figcaption></figure>'


def _place_labels(ax, points: list[tuple[float, float, str]]) -> None:
    """Label every point without two labels overlapping: each label tries offsets around its point and takes
    the first whose box meets no box placed before it (or the point markers)."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    taken = []
    offsets = [(6, 6), (6, -12), (-6, 6), (-6, -12), (10, 16), (10, -22), (-10, 16), (-10, -22), (18, 0), (-18, 0),
               (14, 28), (14, -34), (-14, 28), (-14, -34)]
    for x, y, label in points:
        for dx, dy in offsets:
            t = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                            ha="left" if dx >= 0 else "right")
            t.set_gid("label")
            box = t.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(b) for b in taken):
                taken.append(box)
                break
            t.remove()
        else:
            t = ax.annotate(label, (x, y), xytext=offsets[0], textcoords="offset points", fontsize=8)
            t.set_gid("label")
            taken.append(t.get_window_extent(renderer))


def size_vs_kl(rep: dict) -> str | None:
    """Log-log scatter: artifact size against mean KL, filled for the short probe, hollow for the long one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [(r, regime, r["size_bytes"] / 1e6, r["parity"][regime]["kl"]) for r in rep["artifacts"]
           for regime in ("short", "long") if r["parity"].get(regime)]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    for r, regime, x, y in pts:
        c = COLOURS.get(r["format"], "#555")
        ax.scatter([x], [max(y, 1e-12)], s=36, facecolors=c if regime == "short" else "white", edgecolors=c,
                   linewidths=1.5, zorder=3, gid=f"point-{r['label'].replace(' ', '-')}-{regime}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("artifact size (MB)")
    ax.set_ylabel("mean KL vs PyTorch (nats)")
    ax.grid(True, which="major", alpha=0.3)
    ax.margins(0.25)
    _place_labels(ax, [(x, max(y, 1e-12), r["label"]) for r, regime, x, y in pts
                       if regime == "short"])
    ax.set_title("● short probe   ○ long probe", fontsize=9, loc="right")
    return _svg(fig)


def bar_chart(pairs: list[tuple[str, float | None]], unit: str, title: str) -> str:
    """A titled figure of horizontal bars, one per (label, value) (None values left out), as HTML."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    vals = [(lab, v) for lab, v in pairs if v is not None]
    if not vals:
        return _figure(title, None)
    fig, ax = plt.subplots(figsize=(6.2, 0.45 * len(vals) + 0.8))
    ys = list(range(len(vals)))[::-1]
    for y, (lab, v) in zip(ys, vals):
        ax.barh([y], [v], color="#4a7fb5", gid=f"bar-{lab.replace(' ', '-')}")
        ax.text(v, y, f" {v:.3g} {unit}", va="center", fontsize=8)
    ax.set_yticks(ys, [lab for lab, _ in vals], fontsize=8)
    ax.set_xlabel(unit)
    ax.margins(x=0.25)
    return _figure(title, _svg(fig))


def timing_bars(rep: dict, key: str, unit: str, title: str) -> str:
    """One timing of every artifact (from its smoke answer, else its greedy one)."""
    return bar_chart([(r["label"], (r.get("smoke") or r.get("greedy") or {}).get(key))
                      for r in rep["artifacts"]], unit, title)


def _toolcall_word(tc: dict | None) -> str:
    """The tool-call smoke in a word: PyTorch's call, another well-formed call, a bad one, or not held."""
    if not tc:
        return "-"
    if not tc["held"]:
        return "n/a"
    if tc["call"] == tc["reference_call"]:
        return "same"
    return "parses" if (tc["call"] or "").startswith("[") else "BAD"


def markdown_table(rows: list[dict]) -> list[str]:
    """The parity table as Markdown (the model cards, phiedge.card): size, both regimes, the tool-call smoke."""
    out = ["| artifact | size | short top-1 | short KL | long top-1 | long KL | tool call | template | result |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| `{r['path']}` | {r['size_bytes'] / 1e6:.1f} MB | {cell(r, 'short', 'top1', '.3f')} | "
                   f"{cell(r, 'short', 'kl', '.2g')} | {cell(r, 'long', 'top1', '.3f')} | {cell(r, 'long', 'kl', '.2g')} "
                   f"| {_toolcall_word(r.get('toolcall'))} | {template_source(r)} | {'PASS' if r['passed'] else 'FAIL'} |")
    return out


def _toolcall_cell(tc: dict | None) -> str:
    if not tc:
        return "–"
    if not tc["held"]:
        return "not held: PyTorch answers the tool question without a call"
    ta = tc["token_agreement"]
    return (f"{_toolcall_word(tc)}: {tc['call']}; teacher-forced {ta['agree']}/{ta['of']} "
            f"(PyTorch: {tc['reference_call']})")


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


def _probes_line(p: dict) -> str:
    if p.get("longrope_switch"):
        return (f"Parity over the last {p['compare_last']} positions of a short probe and of a probe past the "
                f"LongRoPE switch at {p['longrope_switch']} positions.")
    return (f"Parity over the last {p['compare_last']} positions of a short probe (the model has no LongRoPE, so "
            f"there is no long regime to check).")


def adapter_refs(rep: dict) -> str:
    """The bundle's adapters as text: "org/lora", or "support (./lora-support), legal (org/lora-legal)"."""
    named = [a for a in rep["adapters"] if a["name"]]
    if len(named) == 1:
        return named[0]["ref"]
    return ", ".join(f"{a['name']} ({a['ref']})" for a in named)


def write_html(rep: dict, folder: Path) -> Path:
    esc = html.escape
    rows = []
    for r in rep["artifacts"]:
        sm = r.get("smoke")
        cells = [r["format"], variant(r), f"{r['size_bytes'] / 1e6:.1f} MB",
                 cell(r, "short", "top1", ".3f"), cell(r, "short", "kl", ".3g"), cell(r, "short", "max_abs", ".3g"),
                 cell(r, "long", "top1", ".3f"), cell(r, "long", "kl", ".3g"), cell(r, "long", "max_abs", ".3g"),
                 _smoke_cell(sm),
                 esc(sm["answer"][:120]) if sm else "–",
                 _toolcall_cell(r.get("toolcall")),
                 "PASS" if r["passed"] else "FAIL: " + "; ".join(r["failures"])]
        cls = "pass" if r["passed"] else "fail"
        rows.append(f'<tr class="{cls}">' + "".join(f"<td>{c if i == 10 else esc(str(c))}</td>"
                                                     for i, c in enumerate(cells)) + "</tr>")
    merges = "; ".join((f"{a['name']}: " if len(rep["adapters"]) > 1 else "") + merge_line(a["merge"])
                       for a in rep["adapters"])
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
 ({esc(str(rep['model']['architecture']))}) · adapter {esc(adapter_refs(rep) or 'none')}
 · target {esc(str(rep.get('target')))} · {esc(rep['created'])}</p>
<p>Merge proof: {esc(merges)}</p>
<p>{esc(_probes_line(rep['probes']))}</p>
<table id="parity"><thead><tr><th>format</th><th>precision</th><th>size</th>
<th>short top-1</th><th>short KL</th><th>short max|Δ|</th><th>long top-1</th><th>long KL</th><th>long max|Δ|</th>
<th>smoke answer vs PyTorch</th><th>smoke answer</th><th>tool call</th><th>result</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
{'<p>Smoke question: ' + esc(smoke['question']) + ' — retrieved chunks contain the answer source: '
 + ('yes' if smoke['retrieved_has_needle'] else 'NO') + '</p>' if smoke else ''}
<p>Tool-call smoke: {esc(TOOL_SMOKE)}</p>
<div class="plots">
{_figure('Size vs KL divergence', size_vs_kl(rep))}
{timing_bars(rep, 'decode_tps', 'tok/s', 'Decode tokens/s per runtime')}
{timing_bars(rep, 'ttft_s', 's', 'Time to first token per runtime')}
</div>
<h2>Versions</h2><pre>{esc(json.dumps(rep['versions'], indent=1))}</pre>
</body></html>
"""
    path = folder / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path


def readme(rep: dict) -> str:
    """The bundle's README, a Hugging Face model card (phiedge.card: YAML front matter, parity table, how to run each
    artifact): a function of what was built, not of when (the date is in the manifest and report)."""
    target = rep.get("target")           # the profile's name (build_report)
    extras = ",".join(sorted({r["format"] for r in rep["artifacts"]}) + ["retriever"])
    names = [a["name"] for a in rep["adapters"] if a["name"]]
    ask = ("phiedge ask . \"your question\"              # retrieve, answer, cite sources" if len(names) < 2 else
           f"phiedge ask . \"your question\" --adapter {names[0]}  # retrieve, answer, cite sources "
           f"(adapters: {', '.join(names)})")
    # The card is published: the base's Hub id and the adapters' names, never the builder's local paths.
    base = rep["model"].get("hub_id") or Path(rep["model"]["ref"]).name
    lines = [f"# phiedge bundle: {base}" + (f" + adapter{'s' if len(names) > 1 else ''} {', '.join(names)}"
                                             if names else ""), "",
             (f"Built for target `{target}`." if target else "Built without a target profile.") +
             " Every artifact below passed the parity gate",
             "against the PyTorch merged model (see report.html).", "", "## Run it on the device", "",
             "```", f"pip install 'phiedge[{extras}]'     # the device path: no torch",
             "phiedge verify .                           # re-hash every file against manifest.json",
             "phiedge validate .                         # golden references, TTFT and tokens/s on this machine",
             ask, "```", "",
             "## Artifacts", ""]
    listed = set()
    for r in rep["artifacts"]:
        if r.get("adapter_path"):           # a separate adapter: its base artifact once, each adapter file once
            for path, what, size in ((r["path"], f"{r['format']} {r['precision']}, the base model", r["size_bytes"]),
                                     (r["adapter_path"], f"adapter `{r['adapter']}` for every {r['format']} base "
                                      f"artifact (`phiedge ask . … --adapter {r['adapter']}`)", r["adapter_size_bytes"])):
                if path not in listed:
                    listed.add(path)
                    lines.append(f"- `{path}/` — {what}, {size / 1e6:.1f} MB")
            continue
        lines.append(f"- `{r['path']}/` — {r['format']} {r['precision']}"
                     + (f" with adapter `{r['adapter']}` merged" if r.get("adapter") else "")
                     + f", {r['size_bytes'] / 1e6:.1f} MB")
        if r.get("runtime_settings"):
            lines.append(f"  (checked and run with {json.dumps(r['runtime_settings'])}: it failed the gate with the "
                         f"runtime's own defaults; `phiedge ask` / `validate` apply these from manifest.json)")
        if r["format"] == "gguf":
            lines.append("  (llama.cpp: keep n_ctx ≤ 4096 unless the prompt needs more — llama.cpp picks Phi-4-mini's "
                         "LongRoPE factors from n_ctx, not from the prompt length; Ollama: `ollama create NAME -f "
                         f"{r['path']}/Modelfile`)")
    lines += ["", "## Parity against PyTorch", "", *markdown_table(rep["artifacts"]), "",
              "## Each artifact on its own runtime", "", *card.run_lines(rep["artifacts"])]
    return card.render(card.front_matter(rep, rep["artifacts"]), "\n".join(lines) + "\n")
