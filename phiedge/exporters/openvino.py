"""OpenVINO IR for OpenVINO GenAI: optimum-intel's stateful export, NNCF weight compression, one folder per precision.

- Each folder holds openvino_model.xml/.bin (stateful: the KV cache lives inside the compiled model),
  openvino_tokenizer / openvino_detokenizer .xml/.bin (openvino-tokenizers), chat_template.jinja,
  tokenizer_config.json, config.json, generation_config.json and phiedge_openvino.json (how it was compressed
  and the runtime properties it was checked with), so `openvino_genai.LLMPipeline(folder)` runs it with no
  transformers on the device.
- LongRoPE: optimum-intel 2.2.0 patches the rotary embedding to pick the factor set from max(position_ids) + 1 of
  each call, as transformers does (1.27 froze the short factors: FIELD-NOTES).
- The export and the compression run in a child process (`_ov_export`): optimum traces the model with torch.
  The IR is exported once in fp32 and its weights compressed per precision; rope constants stay fp32
  (tiny fixture: long-probe max|Δ| 0.0084 this way, 2.31 with top-1 0.86 for OpenVINO's whole-IR fp16).
- Precision names: `fp32`, `fp16` (weights), `int8` (per-channel asym), `int4`, and int4 variants
  `int4-<token>-...` from INT4_TOKENS: group size, symmetry, int4 ratio `r<percent>` (the rest int8), and the
  data-aware algorithms `awq` / `se` (scale estimation) or `rtn` (data-free). Plain `int4` is data-aware
  (AWQ + scale estimation) when the build has calibration text (`--docs`), data-free otherwise; the artifact's
  meta says which. A group size that does not divide every layer width is lowered to a power of two that
  does, and the chosen one recorded.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from ..errors import ToolchainError, UsageError
from . import Artifact, Exporter, register, run_tool

log = logging.getLogger(__name__)

BASE_PRECISIONS = ("fp32", "fp16", "int8", "int4")
# int4 variant token -> (option group, the option it sets). One token per group. `r<percent>` is parsed apart.
INT4_TOKENS: dict[str, tuple[str, dict]] = {
    "g32": ("group", {"group_size": 32}),
    "g64": ("group", {"group_size": 64}),
    "g128": ("group", {"group_size": 128}),       # NNCF's and optimum's default
    "g256": ("group", {"group_size": 256}),
    "gpc": ("group", {"group_size": -1}),          # per output channel, no groups
    "sym": ("symmetry", {"sym": True}),            # int4 weights, no zero points
    "asym": ("symmetry", {"sym": False}),          # uint4 + zero points (optimum-cli's default)
    "awq": ("awq", {"data": "explicit", "awq": True}),             # activation-aware scales: needs --docs
    "se": ("se", {"data": "explicit", "scale_estimation": True}),  # scale estimation: needs --docs
    "rtn": ("awq", {"data": "none"}),              # data-free even when calibration text is there
}
RATIO_TOKEN = re.compile(r"^r(\d{1,3})$")          # r80: 80 % of the weights in int4, the rest int8
INT4_DEFAULTS = {"group_size": 128, "sym": False, "ratio": 1.0, "data": "auto", "awq": False,
                 "scale_estimation": False, "seq_len": 128, "num_samples": 32}
INT4_DEFAULT_TOKENS = frozenset({"g128", "asym", "r100"})
GROUP_ORDER = ("group", "symmetry", "ratio", "awq", "se")
REQUIRED = ("openvino", "openvino-tokenizers", "openvino-genai", "nncf", "optimum-intel", "optimum")
ARTIFACT_FILES = ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_tokenizer.bin",
                  "openvino_detokenizer.xml", "openvino_detokenizer.bin", "chat_template.jinja",
                  "generation_config.json", "config.json")
META_FILE = "phiedge_openvino.json"
# CPU plugin properties each precision is checked and shipped with. Measured on the tiny fixture with
# OpenVINO 2026.4.1 (tests/test_openvino.py; numbers in the module docstring of phiedge.runtimes.openvino).
# - INFERENCE_PRECISION_HINT f32: AMX CPUs default to bf16 (short max|Δ| 0.096, FIELD-NOTES); full precision
#   must not. Quantized weights are decompressed to f32 as well, so one setting for all.
# - DYNAMIC_QUANTIZATION_GROUP_SIZE 0: the CPU plugin otherwise quantizes activations to 8 bits in groups of
#   32 for compressed weights; off halved the int8 loss on SmolLM2 (FIELD-NOTES).
# - KV_CACHE_PRECISION f32: optimum writes f16 into the IR and the CPU default is u8; generation reads the cache.
CPU_PROPERTIES: dict[str, dict[str, str]] = {
    "fp32": {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"},
    "fp16": {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"},
    "int8": {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"},
    "int4": {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"},
}


@dataclass(frozen=True)
class Plan:
    name: str                   # canonical precision name, also the folder name
    base: str                   # fp32 | fp16 | int8 | int4
    int4: dict | None = None    # INT4_DEFAULTS with this variant's options


def parse_precision(value: str) -> Plan:
    """`int4-g64-sym-r80-awq` -> Plan; a UsageError names the bad part and the known ones."""
    base, *tokens = value.strip().lower().split("-")
    if base not in BASE_PRECISIONS:
        raise UsageError(f"openvino has no weight format '{value}': known are {', '.join(BASE_PRECISIONS)} "
                         f"(int4 takes options, e.g. int4-g64-sym-r80-awq)")
    if tokens and base != "int4":
        raise UsageError(f"openvino weight format '{value}': only int4 takes options "
                         f"({', '.join(INT4_TOKENS)}, r<percent>)")
    if base != "int4":
        return Plan(name=base, base=base)
    groups: dict[str, str] = {}
    opts = dict(INT4_DEFAULTS)
    for t in tokens:
        m = RATIO_TOKEN.match(t)
        if m:
            pct = int(m.group(1))
            if not 1 <= pct <= 100:
                raise UsageError(f"openvino weight format '{value}': ratio '{t}' must be r1..r100 (percent of "
                                 f"weights in int4)")
            group, set_ = "ratio", {"ratio": pct / 100}
        elif t in INT4_TOKENS:
            group, set_ = INT4_TOKENS[t]
        else:
            raise UsageError(f"openvino weight format '{value}': unknown int4 option '{t}': known are "
                             f"{', '.join(INT4_TOKENS)}, r<percent>")
        if group in groups:
            raise UsageError(f"openvino weight format '{value}': '{groups[group]}' and '{t}' both set the {group}: "
                             f"keep one")
        if t == "rtn" and "se" in groups or t == "se" and groups.get("awq") == "rtn":
            raise UsageError(f"openvino weight format '{value}': 'rtn' is data-free, 'se' needs data: keep one")
        groups[group] = t
        opts.update(set_)
    kept = [groups[g] for g in GROUP_ORDER if g in groups and groups[g] not in INT4_DEFAULT_TOKENS]
    return Plan(name="-".join([base, *kept]), base=base, int4=opts)


def toolchain_versions() -> dict[str, str]:
    out = {}
    for pkg in REQUIRED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            raise ToolchainError(f"{pkg} is not installed: `make install`, or pip install 'phiedge[openvino]' "
                                 f"and optimum-intel==2.2.0 with --no-deps (see the Makefile)") from None
    return out


@register
class OpenVINOExporter(Exporter):
    name = "openvino"
    PRECISIONS = BASE_PRECISIONS
    DEFAULT_PRECISION = "int4"
    USES_CALIBRATION = True       # the build passes its documents as settings["calibration_text"]
    # fp16 weights + an fp32 rope; int4 2.3 GB for 3.84 B parameters (FIELD-NOTES; the int8 embedding is ~0.6 GB).
    BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.05, "int4": 0.62}

    def check_precisions(self, precisions: list[str]) -> list[str]:
        plans: list[Plan] = []
        for p in precisions:
            plan = parse_precision(p)
            if plan.name not in [q.name for q in plans]:
                plans.append(plan)
        return [p.name for p in plans]

    def estimate_bytes(self, n_params: int, precisions: list[str]) -> int:
        return int(sum(self.BYTES_PER_PARAM[parse_precision(p).base] for p in precisions) * n_params)

    def export(self, merged_dir: Path, out_dir: Path, precisions: list[str], settings: dict) -> list[Artifact]:
        plans = [parse_precision(p) for p in self.check_precisions(precisions)]
        texts = [t for t in (settings.get("calibration_text") or []) if t and t.strip()]
        for p in plans:
            if p.int4 and p.int4["data"] == "explicit" and not texts:
                raise UsageError(f"openvino {p.name}: AWQ / scale estimation need calibration text: pass --docs "
                                 f"(the build's documents are used), or drop -awq / -se")
        versions = toolchain_versions()
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".job-") as jd:
            job = Path(jd) / "job.json"
            job.write_text(json.dumps({"merged": str(merged_dir), "out": str(out_dir),
                                       "plans": [asdict(p) for p in plans], "calibration_text": texts}))
            log.info("openvino %s: optimum-intel %s export + NNCF %s compression%s", ", ".join(p.name for p in plans),
                     versions["optimum-intel"], versions["nncf"],
                     f" ({len(texts)} calibration documents)" if texts else "")
            cost = run_tool([sys.executable, "-m", "phiedge.exporters._ov_export", str(job)],
                        f"optimum-intel OpenVINO export ({', '.join(p.name for p in plans)})")
        result = json.loads((out_dir / "result.json").read_text())
        artifacts = [self._finish(out_dir, p, result[p.name], versions, cost, bool(texts)) for p in plans]
        shutil.rmtree(out_dir / ".fp32-ir", ignore_errors=True)
        (out_dir / "result.json").unlink()
        return artifacts

    def _finish(self, out_dir: Path, plan: Plan, compression: dict, versions: dict, cost: dict,
                had_text: bool) -> Artifact:
        dest, tmp = out_dir / plan.name, out_dir / f"{plan.name}.partial"
        missing = [f for f in ARTIFACT_FILES if not (tmp / f).is_file()]
        if missing:
            raise ToolchainError(f"OpenVINO export ({plan.name}) wrote no {', '.join(missing)} in {tmp}: "
                                 f"rerun with PHIEDGE_DEBUG=1")
        meta = {"toolchain": versions, "weights": plan.base, "compression": compression,
                "cpu_properties": CPU_PROPERTIES[plan.base], "calibration_documents": had_text}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))      # a function of the inputs: no times inside
        meta = {**meta, "export_seconds": cost["seconds"], "export_peak_rss_mb": cost["peak_rss_mb"]}
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        files = tuple(sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()))
        art = Artifact(format=self.name, precision=plan.name, path=dest, files=files, meta=meta)
        log.info("openvino %s: %.1f MB (%s) in %.1f s for the whole export, peak %.0f MB", plan.name,
                 art.size_bytes / 1e6, compression.get("mode"), cost["seconds"], cost["peak_rss_mb"])
        return art
