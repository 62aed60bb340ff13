"""The device path: `ask` and `validate` on a built bundle. Imports no torch and no transformers
(runtime packages themselves excepted: mlx-lm needs transformers for its tokenizer).
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bundle, parity, rag
from .errors import BundleError, UsageError
from .runtimes import RuntimeSettings, get

log = logging.getLogger("phiedge")


@dataclass
class Answer:
    text: str
    sources: list[str]
    runtime: str
    ttft_s: float
    decode_tps: float


def _settings(manifest: dict, threads: int | None, *, cap_context: bool) -> RuntimeSettings:
    """The profile's runtime settings; ask is held to the device's context size, validation probes are not."""
    rt = (manifest.get("target") or {}).get("runtime", {})
    extra = {"max_ctx": rt.get("n_ctx")} if cap_context and rt.get("n_ctx") else {}
    if rt.get("fallback"):               # device to use (and record) when the profile's device is absent
        extra["fallback"] = rt["fallback"]
    return RuntimeSettings(threads=threads or rt.get("threads", 2), device=rt.get("device", "CPU"), extra=extra)


def _pick(manifest: dict, runtime: str | None) -> dict:
    arts = manifest["artifacts"]
    if runtime:
        want = [a for a in arts if a["format"] == runtime or a["path"] == runtime]
        if not want:
            raise UsageError(f"bundle has no '{runtime}' artifact: it has {', '.join(a['path'] for a in arts)}")
        return want[0]
    for a in arts:                       # the first whose runtime this machine has
        if importlib.util.find_spec(get(a["format"]).package) is not None:
            return a
    raise BundleError(f"none of this bundle's runtimes is installed here ({', '.join(a['format'] for a in arts)}): "
                      f"pip install 'phiedge[{arts[0]['format']}]'")


def ask(folder: Path, question: str, *, runtime: str | None = None, k: int = 3, max_new_tokens: int = 256,
        threads: int | None = None, key: Path | None = None) -> Answer:
    folder = Path(folder)
    manifest = bundle.verify(folder, key)
    if not manifest.get("retriever"):
        raise BundleError(f"bundle {folder} has no retriever: rebuild it with --docs")
    from .retriever import Retriever
    with Retriever.open(folder / manifest["retriever"]) as r:
        hits = r.search(question, k=k)
    art = _pick(manifest, runtime)
    rt = get(art["format"]).load(folder / art["path"], _settings(manifest, threads, cap_context=True))
    try:
        gen = rt.generate(rag.messages(question, hits), max_new_tokens=max_new_tokens)
    finally:
        rt.close()
    return Answer(text=gen.text.strip(), sources=rag.sources(hits), runtime=f"{art['format']} {art['precision']}",
                  ttft_s=gen.ttft_s, decode_tps=gen.decode_tps)


def _topk_metrics(golden: np.lib.npyio.NpzFile, regime: str, cand: np.ndarray) -> parity.Metrics:
    """Top-1 agreement and KL restricted to the reference's top-k tokens (the bundle keeps no full logits)."""
    idx, lp_ref = golden[f"{regime}_topk_idx"], golden[f"{regime}_topk_logprob"].astype(np.float64)
    lq = cand.astype(np.float64)
    lq = lq - lq.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    lq_k = np.take_along_axis(lq, idx.astype(np.int64), -1)
    kl = float((np.exp(lp_ref) * (lp_ref - lq_k)).sum(-1).mean())
    top1 = float((cand.argmax(-1) == idx[:, 0]).mean())
    return parity.Metrics(top1=top1, kl=max(kl, 0.0), max_abs=float("nan"), positions=int(idx.shape[0]))


def validate(folder: Path, *, threads: int | None = None, key: Path | None = None) -> dict:
    """Check every artifact whose runtime this machine has against the golden references; write a device
    report beside the bundle. Artifacts whose runtime is missing are listed as not validated."""
    folder = Path(folder)
    manifest = bundle.verify(folder, key)
    golden = np.load(folder / bundle.GOLDEN)
    overrides = {p.upper(): (*v, None)[:3] for p, v in ((manifest.get("target") or {}).get("thresholds") or {}).items()}
    results = []
    for art in manifest["artifacts"]:
        cls = get(art["format"])
        row = {"format": art["format"], "precision": art["precision"], "path": art["path"]}
        if importlib.util.find_spec(cls.package) is None:
            row.update(status="not validated", reason=f"runtime package '{cls.package}' is not installed here")
            results.append(row)
            continue
        limits = parity.thresholds_for(art["precision"], overrides)
        rt = cls.load(folder / art["path"], _settings(manifest, threads, cap_context=False))
        fails, metrics = [], {}
        for regime in ("short", "long"):
            if f"{regime}_ids" not in golden:
                continue
            m = _topk_metrics(golden, regime, rt.logits(golden[f"{regime}_ids"].tolist(), golden[f"{regime}_topk_idx"].shape[0]))
            metrics[regime] = m.as_dict()
            fails += parity.failures(regime, m, (limits[0], limits[1], None))
        t0 = time.perf_counter()
        gen = rt.generate_ids(golden["short_ids"].tolist(), 32, stop_ids=set())
        rt.close()
        want = golden["short_greedy"].tolist() if "short_greedy" in golden else []
        match = next((i for i, (a, b) in enumerate(zip(gen.ids, want)) if a != b), min(len(gen.ids), len(want)))
        row.update(status="passed" if not fails else "failed", parity=metrics, failures=fails,
                   greedy={"prefix_match": match, "of": len(want)},
                   ttft_s=round(gen.ttft_s, 4), decode_tps=round(gen.decode_tps, 2),
                   seconds=round(time.perf_counter() - t0, 2))
        if getattr(rt, "fallback_from", None):   # the profile's device is absent here: recorded, not hidden
            row["device"] = {"used": rt.device, "requested": rt.fallback_from}
        results.append(row)
    report = {"bundle": str(folder.resolve()), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "machine": platform.machine(),
                          "processor": platform.processor(), "python": platform.python_version()},
              "runtime_versions": _runtime_versions(), "artifacts": results,
              "passed": all(r["status"] == "passed" for r in results if r["status"] != "not validated")}
    out = folder.parent / f"{folder.name}.device-report.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    report["path"] = str(out)
    return report


def _runtime_versions() -> dict:
    from importlib import metadata
    out = {}
    for name in ("llama-cpp-python", "onnxruntime-genai", "onnxruntime", "openvino-genai", "mlx-lm", "faiss-cpu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
