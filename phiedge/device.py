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
from pathlib import Path

from . import bundle
from .checks import ArtifactResult, Limits, ProbeSet, measure
from .checks.golden import GOLDEN, golden_suffix
from .errors import BundleError, UsageError
from .runtimes import RuntimeSettings, get
from .session import Answer, Session  # noqa: F401  (Answer: ask's result, as before)

log = logging.getLogger("phiedge")


def settings(manifest: dict, art: dict, threads: int | None, *, cap_context: bool,
              folder: Path | None = None) -> RuntimeSettings:
    """The profile's runtime settings and those the artifact passed its check with (runtime_settings: its
    runtime's exact ones when its own failed), with its separate adapter applied; ask is held to the device's
    context size, validation probes are not."""
    rt = (manifest.get("target") or {}).get("runtime", {})
    extra = dict(art.get("runtime_settings") or {})
    if art.get("adapter_path") and folder is not None:
        extra["adapter"] = str(Path(folder) / art["adapter_path"])
    if cap_context and rt.get("n_ctx"):
        extra["max_ctx"] = rt["n_ctx"]
    if rt.get("fallback"):               # device to use (and record) when the profile's device is absent
        extra["fallback"] = rt["fallback"]
    return RuntimeSettings(threads=threads or rt.get("threads", 2), device=rt.get("device", "CPU"), extra=extra)


def adapter_rows(manifest: dict, adapter: str | None) -> list[dict]:
    """The artifacts of one adapter. Without a name, every artifact of a bundle built with one adapter (or none);
    a bundle of several adapters needs the name."""
    arts = manifest["artifacts"]
    names = list(dict.fromkeys(a.get("adapter") for a in arts))
    if adapter is None:
        if len(names) > 1:
            raise UsageError(f"this bundle holds artifacts of {len(names)} adapters ({_names(names)}): pass "
                             f"--adapter NAME")
        return arts
    want = [a for a in arts if a.get("adapter") == adapter]
    if not want:
        raise UsageError(f"this bundle has no adapter '{adapter}': it has {_names(names)}")
    return want


def _names(names: list) -> str:
    return ", ".join("none (the base)" if n is None else n for n in names)


def pick(manifest: dict, runtime: str | None, adapter: str | None = None) -> dict:
    arts = adapter_rows(manifest, adapter)
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


def ask(folder: Path, question: str, *, runtime: str | None = None, adapter: str | None = None, k: int = 3,
        max_new_tokens: int = 256, threads: int | None = None, key: Path | None = None,
        tools: list[dict] | None = None, json_schema: dict | None = None, stream: bool = False,
        temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
    """Answer from the bundle's documents (k chunks; k=0: none): one question on a fresh session
    (phiedge.session: tools parsed and checked, a JSON schema held by the runtime's constraint and validated).
    stream=True: the session's chunks as they come (the last carries the Answer), the bundle closed after them."""
    s = Session(Path(folder), runtime=runtime, adapter=adapter, key=key, threads=threads)
    try:
        chunks = s.chat([{"role": "user", "content": question}], stream=True, tools=tools, response_format=json_schema,
                        k=k, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    except BaseException:
        s.close()
        raise

    def closing():
        with s:
            yield from chunks
    if stream:
        return closing()
    for chunk in closing():
        pass
    return chunk.answer


def validate(folder: Path, *, threads: int | None = None, key: Path | None = None,
             only: list[str] | None = None, adapter: str | None = None) -> dict:
    """Check every artifact whose runtime this machine has (of every adapter, or of `adapter`) against its
    golden references (the same measure and judge as the build, on top-k references); write a device report
    beside the bundle. Artifacts whose runtime is missing are listed as not validated."""
    folder = Path(folder)
    manifest = bundle.verify(folder, key)
    overrides = {p.upper(): (*v, None)[:3] for p, v in ((manifest.get("target") or {}).get("thresholds") or {}).items()}
    arts = manifest["artifacts"]
    names = list(dict.fromkeys(a["path"] for a in arts))
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise UsageError(f"bundle {folder} has no artifact '{unknown[0]}': it has {', '.join(names)}")
    mine = adapter_rows(manifest, adapter) if adapter is not None else arts

    def skipped(art: dict) -> str | None:
        if not any(art is a for a in mine):
            return "not selected (--adapter)"
        return "not selected (--artifact)" if only and art["path"] not in only else None
    probes: dict[str, ProbeSet] = {}
    results = []
    for art in arts:
        why = skipped(art)
        if why:
            results.append({**_row_id(art), "status": "not validated", "reason": why})
            continue
        golden = art.get("golden") or GOLDEN
        if golden not in probes:
            probes[golden] = ProbeSet.from_golden(folder / golden)
        results.append(_validate_one(folder, manifest, art, probes[golden], overrides, threads))
    report = {"bundle": str(folder.resolve()), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "machine": platform.machine(),
                          "processor": platform.processor(), "python": platform.python_version()},
              "runtime_versions": _runtime_versions(), "artifacts": results,
              "passed": all(r["status"] == "passed" for r in results if r["status"] != "not validated")}
    out = folder.parent / f"{folder.name}.device-report.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    report["path"] = str(out)
    return report


def _validate_one(folder: Path, manifest: dict, art: dict, probes: ProbeSet, overrides: dict,
                  threads: int | None) -> dict:
    from .artifact import Artifact
    cls = get(art["format"])
    if importlib.util.find_spec(cls.package) is None:
        return {**_row_id(art), "status": "not validated",
                "reason": f"runtime package '{cls.package}' is not installed here"}

    def files_of(path: str, precision: str) -> Artifact:
        prefix = path + "/"
        return Artifact(format=art["format"], precision=precision, path=folder / path,
                        files=tuple(sorted(f[len(prefix):] for f in manifest["files"] if f.startswith(prefix))))
    artifact = files_of(art["path"], art["precision"])
    t0 = time.perf_counter()
    rt = cls.load(artifact.path, settings(manifest, art, threads, cap_context=False, folder=folder))
    try:
        m = measure(rt, probes)
    finally:
        rt.close()
    r = ArtifactResult.of(artifact, Limits.for_precision(art["precision"], overrides), m,
                          settings=art.get("runtime_settings"), adapter=art.get("adapter"),
                          suffix=golden_suffix(art.get("golden")),
                          adapter_files=files_of(art["adapter_path"], "adapter") if art.get("adapter_path") else None)
    row = r.to_json()
    greedy = row.get("greedy") or {}
    row.update(status="passed" if r.passed else "failed", ttft_s=greedy.get("ttft_s"),
               decode_tps=greedy.get("decode_tps"), seconds=round(time.perf_counter() - t0, 2))
    return row


def _row_id(art: dict) -> dict:
    return {k: art.get(k) for k in ("format", "precision", "adapter", "path", "adapter_path", "label")}


def _runtime_versions() -> dict:
    from importlib import metadata
    out = {}
    for name in ("llama-cpp-python", "onnxruntime-genai", "onnxruntime", "openvino-genai", "mlx-lm", "faiss-cpu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
