"""OpenVINO IR for OpenVINO GenAI: optimum-intel's stateful export, NNCF weight compression, one folder per precision.

- Each folder holds openvino_model.xml/.bin (stateful: the KV cache lives inside the compiled model),
  openvino_tokenizer / openvino_detokenizer .xml/.bin (openvino-tokenizers), chat_template.jinja,
  tokenizer_config.json, config.json, generation_config.json and phiedge_openvino.json (how it was compressed
  and the runtime properties it was checked with), so `openvino_genai.LLMPipeline(folder)` runs it with no
  transformers on the device.
- LongRoPE: optimum-intel 2.2.0 patches the rotary embedding to pick the factor set from max(position_ids) + 1 of
  each call, as transformers does (tests/test_openvino.py holds both regimes).
- The export and the compression run in a child process (`_ov_export`): optimum traces the model with torch.
  The IR is exported once in fp32 and its weights compressed per precision; rope constants stay fp32
  (tiny fixture: long-probe max|Δ| 0.0084 this way, 2.31 with top-1 0.86 for OpenVINO's whole-IR fp16).
- Precision names (phiedge.exporters.grammar): `fp32`, `fp16` (weights), `int8` (per-channel asym), `int4`, and int4
variants
  `int4-<token>-...` from INT4_TOKENS: group size, symmetry, int4 ratio `r<percent>` (the rest int8), and the
  algorithms: plain `int4` is AWQ computed from the weights alone (NNCF's data-free AWQ), `awq` makes AWQ
  data-aware and `se` adds scale estimation, `gptq` rounds each layer by GPTQ (with data-aware AWQ before it
  unless `rtn`; all three calibrate on the `--docs` documents), `rtn` is plain round-to-nearest; the artifact's
  meta says which ran. A group size that does not divide every layer width is lowered to a power of two that
  does, and the chosen one recorded.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from ..errors import ToolchainError, UsageError
from ..openvino_ir import EXACT_CPU
from .base import TOOL_BYTES, Artifact, Exporter, register, run_tool
from .grammar import Grammar, Pattern, Precision

log = logging.getLogger(__name__)

BASE_PRECISIONS = ("fp32", "fp16", "int8", "int4")
# int4 option token -> (option group, the options it sets). One token per group; `r<percent>` is a Pattern.
INT4_TOKENS: dict[str, tuple[str, dict]] = {
    "g32": ("group", {"group_size": 32}),
    "g64": ("group", {"group_size": 64}),
    "g128": ("group", {"group_size": 128}),       # NNCF's and optimum's default
    "g256": ("group", {"group_size": 256}),
    "gpc": ("group", {"group_size": -1}),          # per output channel, no groups
    "sym": ("symmetry", {"sym": True}),            # int4 weights, no zero points
    "asym": ("symmetry", {"sym": False}),          # uint4 + zero points (optimum-cli's default)
    "awq": ("awq", {"data": "explicit"}),          # AWQ's scales searched on the documents' activations: needs --docs
    "se": ("se", {"data": "explicit", "scale_estimation": True}),  # + scale estimation (with AWQ): needs --docs
    "rtn": ("awq", {"awq": False}),                # round to nearest: no AWQ at all
    "gptq": ("gptq", {"data": "explicit", "gptq": True}),  # NNCF's GPTQ on the documents (after data-aware AWQ)
    # NNCF keeps the embedding and the last layer (the tied LM head) in int8 by default ("backup" precision);
    # emb4 compresses them to int4 too (its `all_layers`): 16 % of Phi-4-mini's parameters at half the bits
    "emb4": ("embed", {"all_layers": True}),
}
# int4's default is data-free AWQ: chosen on SmolLM2-135M + the demo LoRA (int4 g64, mean KL against PyTorch fp32 on
# four held-out texts / NNCF's compression time) and on the 3.84 B bench model (g128, the compression alone; its
# IR export before it takes 91 s):
#   round to nearest                0.296 / 15.9 s    3.84 B:    58 s
#   data-free AWQ (the default)     0.190 / 15.5 s    3.84 B:   124 s
#   data-aware AWQ                  0.209 / 28.9 s
#   AWQ + scale estimation          0.166 / 45.3 s    3.84 B: > 2170 s (scale estimation alone ~960 s, NNCF's steps)
#   AWQ + one scale-estimation step 0.182 / 29.6 s    3.84 B: + ~140 s for that step
# Scale estimation's search runs per weight in numpy whatever the calibration size (two threads over weights
# gain 1.3x: it is bound by memory bandwidth), so at full size it cannot come within 2x of data-free int4; the
# docs-calibrated variants stay a choice (int4-awq, int4-se). Their knobs: statistics over 12 windows of 128
# tokens, scale estimation over 8 of them, AWQ's grid in 20 steps instead of NNCF's 100 (0.157 against NNCF's
# defaults' 0.187 on other held-out text, 38 s against 83 s).
INT4_BASE = {"data": "none", "awq": True, "scale_estimation": False, "seq_len": 128, "num_samples": 12,
             "awq_steps": 20, "se_subset": 8, "all_layers": False, "gptq": False}


def _ratio(m) -> dict:
    pct = int(m.group(1))
    if not 1 <= pct <= 100:
        raise ValueError("must be r1..r100 (percent of weights in int4)")
    return {"ratio": pct / 100}


GRAMMAR = Grammar(
    "openvino", bases=BASE_PRECISIONS, option_bases=frozenset({"int4"}), tokens=INT4_TOKENS,
    patterns=(Pattern(r"r(\d{1,3})", "ratio", _ratio, "r<percent>"),),   # r80: 80 % in int4, the rest int8
    defaults={"group": "g128", "symmetry": "asym", "ratio": "r100"},
    order=("group", "symmetry", "ratio", "embed", "awq", "se", "gptq"),
    refused=((frozenset({"rtn", "se"}), None, "'rtn' is data-free, 'se' needs data: keep one"),),
    noun="weight format", option_noun="int4 option", takes_options="only int4 takes options",
    options_hint="int4 takes options, e.g. int4-g64-sym-r80-awq")
REQUIRED = ("openvino", "openvino-tokenizers", "openvino-genai", "nncf", "optimum-intel", "optimum")
ARTIFACT_FILES = ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_tokenizer.bin",
                  "openvino_detokenizer.xml", "openvino_detokenizer.bin", "chat_template.jinja",
                  "generation_config.json", "config.json")
META_FILE = "phiedge_openvino.json"
# CPU plugin properties each precision is checked and shipped with (OpenVINO 2026.4.1).
# Full precision, exact: an AMX CPU's default inference precision is bf16 (the exact settings:
# tests/test_openvino.py), the
# CPU plugin quantizes activations to 8 bits in groups of 32 for compressed weights, and its KV cache defaults to
# u8 (optimum writes f16 into the IR): fp32 / fp16 must have none of that.
# Quantized: the runtime's own defaults, which are what make int8/int4 fast on the CPUs the intel-cpu profile
# targets (bf16 on AMX, VNNI dynamic activations, u8 KV cache). Measured on this AMX VM, tiny bf16 fixture, int4:
# KL short 0.0086 / long 0.0094 with the defaults against 0.0085 / 0.0096 exact, and the 4200-token prefill in
# 0.9 s instead of 6.3 s. The gate checks these settings; they are recorded per artifact.
# An artifact whose defaults fail the check is checked again with EXACT_CPU and ships with it when it passes so
# (Runtime.exact_settings; the report's runtime_settings).
CPU_PROPERTIES: dict[str, dict[str, str]] = {"fp32": EXACT_CPU, "fp16": EXACT_CPU, "int8": {}, "int4": {}}


def calibrated(plan: dict) -> bool:
    """Whether a job plan's compression calibrates on the documents (int4-awq, -se, -gptq)."""
    return plan["int4"] is not None and plan["int4"]["data"] == "explicit"


def job_plan(p: Precision) -> dict:
    """What the export child (_ov_export) needs of a precision: name, base, and int4's NNCF options."""
    if p.base != "int4":
        return {"name": p.name, "base": p.base, "int4": None}
    opts = dict(INT4_BASE)
    for _, value in p.values:
        opts.update(value)
    return {"name": p.name, "base": p.base, "int4": opts}


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
    GRAMMAR = GRAMMAR
    DEFAULT_PRECISION = "int4"
    TOOL_4BIT = "int4-g64-rtn"       # optimum-cli's --weight-format int4 without a dataset, at its group size 64
    SWEEP = ("int4-g64-rtn", "int4", "int4-g64", "int4-g32", "int4-awq", "int4-g64-awq", "int4-g64-r80", "int8")
    CLI_FLAG = "--ov-weights"
    CLI_HELP = ("OpenVINO weights: fp32, fp16, int8, int4 or int4-<options> such as int4-g64-sym-r80-awq-se "
                "(-awq / -se calibrate on the --docs documents)")
    TOOL_MODULES = ("phiedge.exporters._ov_export",)
    # fp16 weights + an fp32 rope; int4 2.3 GB for 3.84 B parameters (make bench: bench/results.json; the int8
    # embedding is ~0.6 GB).
    BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.05, "int4": 0.62}
    # optimum's trace of the checkpoint in its own dtype, then NNCF's compression of the saved IR. Measured at 3.84 B
    # (bf16), data-free int4, PSS of the export child: the trace 8.75 GB (the bf16 torch model beside the IR it
    # writes); the compression 12.18 GB while the base IR's mapped pages stayed resident, 7.51 GB with them let go
    # as it goes (pages.MappedPagesDropped), in 90 s instead of 100 (the trace before it: 50 s). optimum-cli's own
    # int4 export: 10.0 GB (it loaded an fp32 copy before: 23.1 GB).
    PEAK_BYTES_PER_PARAM = 2.35
    # -gptq: 10.6 GB (max RSS of one child that traced and then ran NNCF's GPTQ, stopped 22 minutes in, a third of
    # the layers done: the layer-by-layer engine holds one layer's inputs at a time).
    GPTQ_PEAK_BYTES_PER_PARAM = 2.8

    ADAPTER_RUNTIME = "OpenVINO GenAI"
    # A base for adapters kept separate compresses without AWQ: AWQ divides a MatMul's input channels by scales it
    # folds into the op before (Llama's up_proj before down_proj), so a LoRA fed that MatMul's input, OpenVINO
    # GenAI's own as much as phiedge's scoring model, adds its update to rescaled activations. Measured on
    # SmolLM2-135M + a demo task adapter, KL against PEFT: fp32 base exact, int4 round-to-nearest 0.71, int4
    # data-free AWQ 3.12 (the gate failed it). Phi-3's fused gate_up_proj gives AWQ no such pair.
    BASE_SETTINGS = {"lora_base": True}

    def export_adapter(self, base_dir: Path, adapter_dir: Path, out_dir: Path) -> tuple[str, ...]:
        """The PEFT adapter as OpenVINO GenAI's `ov_genai.Adapter` reads it: PEFT's safetensors (names as PEFT
        writes them; GenAI matches each module path within a MatMul's name), PEFT's per-module scaling folded into
        lora_B (phiedge.adapters) and no `.alpha` tensors, so `AdapterConfig(adapter, 1.0)` applies exactly
        PEFT's update. The runtime's scoring model applies the same file (phiedge.runtimes.openvino)."""
        from ..adapters import fold_scales
        from ..openvino_ir import ADAPTER_FILE
        work = out_dir / ".work"
        shutil.rmtree(work, ignore_errors=True)
        fold_scales(adapter_dir, work, self.ADAPTER_RUNTIME)
        (work / "adapter_model.safetensors").rename(out_dir / ADAPTER_FILE)
        shutil.rmtree(work, ignore_errors=True)
        return (ADAPTER_FILE,)

    def toolchain(self) -> dict[str, str]:
        return toolchain_versions()

    PREPARES = True

    def prepare(self, checkpoint: Path, out_dir: Path, settings: dict) -> None:
        """optimum-intel's trace of the checkpoint (the fp32-computing IR and the tokenizer IRs, _ov_export), once
        for every precision compressed from it."""
        out_dir.mkdir(parents=True, exist_ok=True)
        job = out_dir / "job.json"
        job.write_text(json.dumps({"merged": str(checkpoint), "out": str(out_dir), "base": str(out_dir / "ir"),
                                   "plans": []}))
        run_tool([sys.executable, "-m", "phiedge.exporters._ov_export", str(job)], "optimum-intel OpenVINO trace")
        job.unlink()
        (out_dir / "result.json").unlink(missing_ok=True)

    def calibrates(self, precisions: list[str]) -> bool:
        return any(calibrated(job_plan(self.parse(p))) for p in precisions)

    def tensors(self, art: Artifact) -> list[tuple[str, int]]:
        """Every constant of the IR (its XML's Const layers), each stored range counted once."""
        import xml.etree.ElementTree as ET
        seen: dict[tuple[int, int], str] = {}
        for layer in ET.parse(art.path / "openvino_model.xml").getroot().iter("layer"):
            data = layer.find("data")
            if layer.get("type") == "Const" and data is not None and data.get("size"):
                seen.setdefault((int(data.get("offset", 0)), int(data.get("size"))), layer.get("name", ""))
        return [(name, size) for (_, size), name in seen.items()]

    def peak_bytes(self, n_params: int, precision: str) -> int:
        plan = job_plan(self.parse(precision))
        if plan["int4"] and plan["int4"]["gptq"]:
            return int(self.GPTQ_PEAK_BYTES_PER_PARAM * n_params) + TOOL_BYTES
        return super().peak_bytes(n_params, precision)

    def _needs(self, precisions: list[str], calibration: bool, settings: dict) -> list[str]:
        return [f"openvino {p}: data-aware AWQ / scale estimation / GPTQ need calibration text: "
                f"pass --docs (the build's documents are used), or drop -awq / -se / -gptq (plain int4's AWQ "
                f"is data-free)" for p in precisions
                if not calibration and calibrated(job_plan(self.parse(p)))]

    def export(self, merged_dir: Path, out_dir: Path, precisions: list[str], settings: dict) -> list[Artifact]:
        plans = [job_plan(self.parse(p)) for p in self.check_precisions(precisions)]
        for plan in plans:
            if settings.get("lora_base") and plan["int4"] and plan["int4"]["awq"]:
                log.info("openvino %s: compressed without AWQ, a base for adapters kept separate (AWQ rescales the "
                         "inputs a LoRA reads)", plan["name"])
                plan["int4"]["awq"] = False
        texts = [t for t in (settings.get("calibration_text") or []) if t and t.strip()]
        needs = self._needs(precisions, bool(texts), settings)
        if needs:
            raise UsageError(needs[0])
        versions = toolchain_versions()
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".job-") as jd:
            job = Path(jd) / "job.json"
            prepared = settings.get("prepared")
            job.write_text(json.dumps({"merged": str(merged_dir), "out": str(out_dir),
                                       "base": str(Path(prepared) / "ir") if prepared else None,
                                       "plans": plans, "calibration_text": texts}))
            log.info("openvino %s: optimum-intel %s export + NNCF %s compression%s", ", ".join(p["name"] for p in plans),
                     versions["optimum-intel"], versions["nncf"],
                     f" ({len(texts)} calibration documents)" if texts else "")
            cost = run_tool([sys.executable, "-m", "phiedge.exporters._ov_export", str(job)],
                        f"optimum-intel OpenVINO export ({', '.join(p['name'] for p in plans)})")
        result = json.loads((out_dir / "result.json").read_text())
        artifacts = [self._finish(out_dir, p, result[p["name"]], versions, cost, bool(texts)) for p in plans]
        shutil.rmtree(out_dir / ".base-ir", ignore_errors=True)
        (out_dir / "result.json").unlink()
        return artifacts

    def _finish(self, out_dir: Path, plan: dict, compression: dict, versions: dict, cost: dict,
                had_text: bool) -> Artifact:
        tmp = out_dir / f"{plan['name']}.partial"
        meta = {"toolchain": versions, "weights": plan["base"], "compression": compression,
                "cpu_properties": CPU_PROPERTIES[plan["base"]], "calibration_documents": had_text and calibrated(plan)}
        if tmp.is_dir():
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))    # a function of the inputs: no times inside
        meta = {**meta, "export_seconds": cost["seconds"], "export_peak_rss_mb": cost["peak_rss_mb"]}
        return self.finish(tmp, out_dir / plan["name"], plan["name"], ARTIFACT_FILES, meta,
                           f"OpenVINO export ({plan['name']})")
