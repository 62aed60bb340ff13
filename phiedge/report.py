"""report.json: what was built, from what, and how each artifact compares with the source model."""
from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path

from . import probes
from .source import Source

VERSIONED = ("phiedge", "torch", "transformers", "peft", "llama-cpp-python", "huggingface-hub", "tokenizers")


def versions() -> dict[str, str | None]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def build_report(*, model: Source, adapter: Source | None, proof: dict, rows: list[dict], timings: dict,
                 config: dict, out: Path) -> dict:
    return {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"ref": model.ref, "revision": model.revision, "architecture": (config.get("architectures") or [None])[0]},
        "adapter": None if adapter is None else {"ref": adapter.ref, "revision": adapter.revision},
        "merge": proof,
        "probes": {"compare_last": probes.COMPARE_LAST, "longrope_switch": probes.switch_point(config)},
        "artifacts": rows,
        "passed": all(r["passed"] for r in rows),
        "timings_s": timings,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine()},
        "versions": versions(),
    }


def write(rep: dict, folder: Path) -> Path:
    path = folder / "report.json"
    tmp = path.with_name("report.json.partial")
    tmp.write_text(json.dumps(rep, indent=2) + "\n")
    tmp.rename(path)
    return path


def table(rep: dict) -> str:
    """The parity table as plain text, for the terminal."""
    lines = [f"{'format':8} {'precision':9} {'size':>9}  {'short top1':>10} {'short KL':>9}  {'long top1':>9} {'long KL':>9}  result"]
    for r in rep["artifacts"]:
        s, lg = r["parity"]["short"] or {}, r["parity"]["long"] or {}
        lines.append(f"{r['format']:8} {r['precision']:9} {r['size_bytes'] / 1e6:8.1f}M  "
                     f"{s.get('top1', float('nan')):10.3f} {s.get('kl', float('nan')):9.2g}  "
                     f"{lg.get('top1', float('nan')):9.3f} {lg.get('kl', float('nan')):9.2g}  "
                     f"{'PASS' if r['passed'] else 'FAIL'}")
    m = rep["merge"]
    if m.get("max_abs_vs_peft") is not None:
        lines.append(f"merge proof: |merged - peft| {m['max_abs_vs_peft']:.2g} (tol {m['tolerance']:.2g}), "
                     f"|merged - base| {m['max_abs_vs_base']:.3g}")
    return "\n".join(lines)
