"""ONNX for onnxruntime-genai: its own model builder, one folder per precision that `og.Model` loads directly.

- Why the builder: its Phi-3 LongRoPE graph keeps both cos/sin caches and switches between them with an
  `If` on the total sequence length, as Hugging Face does (tests/test_onnx.py holds both regimes). Each folder holds
  model.onnx + model.onnx.data (external weights), genai_config.json,
  tokenizer.json / tokenizer_config.json and chat_template.jinja.
- The builder runs in a child process through `_genai_build` (it puts its own `builders`/`quantization`
  folders on sys.path, and its LM-head detection needs one fix: see there). Its int4 pass quantizes the whole
  graph in fp32 at once (23.6 GB at full size); `_genai_nbits` runs the same quantizer one weight at a time,
  byte for byte the same model.
- Precision names (phiedge.exporters.grammar): `fp32`, `fp16` (cuda/dml only: see EXECUTION_PROVIDERS), `int4`,
  and int4 variants `int4-<token>-<token>...` with tokens from INT4_TOKENS (block size, symmetry, algorithm,
  accuracy level, 8-bit output layer), e.g. `int4-b64-rtn-acc4`. The builder's defaults (b32, sym) are left
  out of the canonical name, so one build has one name.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
from importlib import metadata
from pathlib import Path

from ..calibration import DEFAULT_TOKENS
from ..errors import ToolchainError, UnsupportedAdapterError, UsageError
from .base import TOOL_BYTES, Artifact, Exporter, register, run_tool
from .grammar import Grammar, Precision

log = logging.getLogger(__name__)

BASE_PRECISIONS = ("fp32", "fp16", "int4")
# Builder --execution_provider -> the precisions its own help lists as valid for it (builder.py get_args).
# Not fp16 on CPU: the builder writes it (MultiHeadAttention + repeat_kv instead of GroupQueryAttention) and
# its prefill logits match (tiny model: top1 1.0 both regimes, max|Δ| 0.07 / 0.02), but the first decode step
# fails in onnxruntime ("Shape mismatch attempting to re-use buffer" at a Cast in repeat_kv), so it cannot
# generate.
EXECUTION_PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "int4"),
    "cuda": ("fp32", "fp16", "int4"),
    "dml": ("fp16", "int4"),
    "webgpu": ("int4",),
}
DEFAULT_EXECUTION_PROVIDER = "cpu"
IMAT = "imat"
# int4 option token -> (option group, the builder's --extra_options KEY=VALUE, None: phiedge's own). One per group.
INT4_TOKENS: dict[str, tuple[str, str]] = {
    "b16": ("block", "block_size=16"),          # MatMulNBits block size (builder default 32)
    "b32": ("block", "block_size=32"),
    "b64": ("block", "block_size=64"),
    "b128": ("block", "block_size=128"),
    "b256": ("block", "block_size=256"),
    "sym": ("symmetry", "is_symmetric=true"),   # int4 weights, no zero points (builder default)
    "asym": ("symmetry", "is_symmetric=false"),  # uint4 weights + zero points
    "rtn": ("algorithm", "algo_config=rtn"),     # onnxruntime's RTN quantizer (the default is MLAS's own RTN)
    "k_quant": ("algorithm", "algo_config=k_quant"),   # always stores zero points: -sym and -asym build alike
    # importance-weighted asymmetric int4 from the --docs documents, handed to the builder as a GPTQ checkpoint
    # (_onnx_imatrix); -head8 puts its LM head / tied embedding in 8 bits
    IMAT: ("algorithm", None),
    "acc1": ("accuracy", "accuracy_level=1"),    # MatMulNBits compute: fp32 activations
    "acc2": ("accuracy", "accuracy_level=2"),    # fp16
    "acc3": ("accuracy", "accuracy_level=3"),    # bf16
    "acc4": ("accuracy", "accuracy_level=4"),    # int8 activations (the CPU default)
    "head8": ("head", "matmul_mixed_precision=last_matmul:int8"),  # LM head (and the tied embedding) in 8 bits
    # head8 plus llama.cpp's Q4_K_M choice of sensitive layers in 8 bits (first/last eighth, every third
    # layer's qkv/v/down projections): the builder's `mixed_layers` selector
    "mixed8": ("head", "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8"),
}
GRAMMAR = Grammar(
    "onnx", bases=BASE_PRECISIONS, option_bases=frozenset({"int4"}), tokens=INT4_TOKENS,
    defaults={"block": "b32", "symmetry": "sym"}, order=("block", "symmetry", "algorithm", "accuracy", "head"),
    option_noun="int4 option", takes_options="only int4 takes options",
    options_hint="int4 takes options, e.g. int4-b64-rtn-acc4",
    # Combinations the builder writes but onnxruntime cannot load (measured with onnxruntime-genai 0.18.0 on the
    # tied-embedding tiny Phi): (tokens present, group that must then be given, why and what to do instead).
    refused=(
        (frozenset({"asym"}), "algorithm",
         "asymmetric int4 with the builder's default quantizer gives the tied embedding a uint8 GatherBlockQuantized "
         "input that onnxruntime refuses to load (Type Error at /model/embed_tokens/Reshape); add -rtn or -k_quant, "
         "which store zero points the shared embedding can use"),
        (frozenset({"mixed8"}), "algorithm",
         "8-bit layers with the builder's default quantizer leave the tied embedding pointing at an initializer it "
         "never writes (lm_head.MatMul.weight_Q8G32, as with -head8); add -rtn or -k_quant"),
        (frozenset({"head8"}), "algorithm",
         "an 8-bit output layer with the builder's default quantizer leaves the tied embedding pointing at an "
         "initializer it never writes (lm_head.MatMul.weight_Q8G32: 'not a graph input, initializer, or output'); "
         "add -rtn or -k_quant (the targets use int4-k_quant-mixed8)"),
    ))
IMAT_PEAK_PER_PARAM = 2.6   # the calibration pass is GGUF's importance matrix's (9.04 GiB at 3.84 B parameters)
IMAT_SEQ_LEN = 512
ARTIFACT_FILES = ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja")


def builder_options(p: Precision) -> tuple[str, ...]:
    """The builder's --extra_options for a precision: its explicit (non-default) tokens only, so the command
    is the builder's own for a default int4. A data-aware int4 (`imat`) arrives quantized: the builder is told
    nothing of blocks, quantizer or head, which the checkpoint carries."""
    calibrated = _calibrated(p)
    return tuple(INT4_TOKENS[t][1] for g, t in p.given
                 if INT4_TOKENS[t][1] is not None and not (calibrated and g in ("block", "head")))


def _calibrated(p: Precision) -> bool:
    return any(t == IMAT for _, t in p.given)


def check_execution_provider(ep: str, plans: list[Precision]) -> str:
    key = str(ep).lower()
    if key not in EXECUTION_PROVIDERS:
        raise UsageError(f"onnx has no execution provider '{ep}': known are {', '.join(EXECUTION_PROVIDERS)}")
    for p in plans:
        if p.base not in EXECUTION_PROVIDERS[key]:
            takers = [e for e, precs in EXECUTION_PROVIDERS.items() if p.base in precs]
            raise UsageError(f"onnx precision '{p.name}' is not built for execution provider '{key}', which takes "
                             f"{', '.join(EXECUTION_PROVIDERS[key])} ({p.base} is for {', '.join(takers)})")
    return key


def builder_version() -> str:
    """onnxruntime-genai's version, once its builder's undeclared dependency onnx-ir is there too."""
    try:
        version = metadata.version("onnxruntime-genai")
    except metadata.PackageNotFoundError:
        raise ToolchainError("onnxruntime-genai is not installed: pip install 'phiedge[onnx]'") from None
    if importlib.util.find_spec("onnx_ir") is None:
        raise ToolchainError("onnxruntime-genai's model builder needs onnx-ir, which it does not declare: "
                             "pip install 'phiedge[onnx]'")
    return version


@register
class ONNXExporter(Exporter):
    name = "onnx"
    GRAMMAR = GRAMMAR
    DEFAULT_PRECISION = "int4"
    CLI_FLAG = "--onnx-precision"
    CLI_HELP = "ONNX precisions: fp32, fp16, int4 or int4-<options> such as int4-b64-rtn-acc4"
    TOOL_MODULES = ("phiedge.exporters._genai_build", "phiedge.exporters._genai_nbits", "phiedge.exporters._onnx_lora",
                    "phiedge.exporters._onnx_imatrix", "phiedge.calibration")
    # Measured: fp32 keeps the tied embedding once; int4 2.5 GB for 3.84 B parameters (make bench: bench/results.json).
    BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int4": 0.66}
    # The builder maps the checkpoint and writes the graph lazily; phiedge's per-weight int4 pass (_genai_nbits)
    # holds a slice or two in fp32 and the quantized model. Measured at 3.84 B (bf16), int4-k_quant-mixed8 with 2
    # threads: 4.46 GB in 461 s with 384 Ki-element slices (16 Mi-element slices: 6.1-6.3 GB; the builder's own
    # whole-graph pass: 23.6 GB).
    PEAK_BYTES_PER_PARAM = 1.2

    TOOL_4BIT = "int4"
    # (block 64 with k_quant fails in the builder on SmolLM2's widths: "cannot reshape array of size 1296")
    SWEEP = ("int4", "int4-k_quant", "int4-k_quant-head8", "int4-k_quant-mixed8", "int4-b16-k_quant-head8",
             "int4-imat-head8", "int4-b64-imat-head8")

    def tensors(self, art: Artifact) -> list[tuple[str, int]]:
        import onnx
        graph = onnx.load(str(art.path / "model.onnx"), load_external_data=False).graph
        return [(t.name, int(next((e.value for e in t.external_data if e.key == "length"), 0)) or len(t.raw_data))
                for t in graph.initializer]

    def check_precisions(self, precisions: list[str], execution_provider: str = DEFAULT_EXECUTION_PROVIDER
                         ) -> list[str]:
        names = self.GRAMMAR.canonical(precisions)
        plans = [self.parse(n) for n in names]
        check_execution_provider(execution_provider, plans)
        for p in plans:
            if _calibrated(p) and p.value("head") and "mixed_layers" in p.value("head"):
                raise UsageError(f"onnx precision '{p.name}': data-aware int4 takes -head8 (its LM head in 8 bits), "
                                 f"not the builder's mixed8 layer selection: use "
                                 f"{p.name.replace('mixed8', 'head8')}")
        return names

    def calibrates(self, precisions: list[str]) -> bool:
        return any(_calibrated(self.parse(p)) for p in precisions)

    def _needs(self, precisions: list[str], calibration: bool, settings: dict) -> list[str]:
        return [f"onnx {p}: data-aware int4 is calibrated on the documents: pass --docs, or build the data-free "
                f"{p.replace(IMAT, 'k_quant')} (--onnx-precision {p.replace(IMAT, 'k_quant')})"
                for p in precisions if not calibration and _calibrated(self.parse(p))]

    def peak_bytes(self, n_params: int, precision: str) -> int:
        per_param = IMAT_PEAK_PER_PARAM if _calibrated(self.parse(precision)) else self.PEAK_BYTES_PER_PARAM
        return int(per_param * n_params) + TOOL_BYTES

    ADAPTER_RUNTIME = "onnxruntime-genai"
    BASE_SETTINGS = {"separate_adapters": True}     # the base's graph takes LoRA weights as inputs

    def toolchain(self) -> dict[str, str]:
        return {"onnxruntime-genai": builder_version()}

    def export_adapter(self, base_dir: Path, adapter_dir: Path, out_dir: Path) -> tuple[str, ...]:
        """The PEFT adapter as onnxruntime's adapter file (`.onnx_adapter`, its own AdapterFormat) for any ONNX
        precision of this base built with LoRA inputs (_onnx_lora): per module Aᵀ and (s·B)ᵀ, fp32, PEFT's
        scaling folded in (phiedge.adapters)."""
        from ..adapters import folded
        from ._onnx_lora import ADAPTER_FILE, modules_of, write_adapter
        _, modules = folded(adapter_dir, self.ADAPTER_RUNTIME)
        layers = modules_of(_header(base_dir))
        for path in modules:
            layer, _, module = path.removeprefix("model.layers.").partition(".")
            if not layer.isdigit() or module not in layers.get(int(layer), {}):
                raise UnsupportedAdapterError(f"the adapter adapts {path}, which is not a linear module of the base's "
                                              f"decoder layers: onnx cannot keep it separate; build it with "
                                              f"--adapter-mode merged")
        out_dir.mkdir(parents=True, exist_ok=True)
        write_adapter(modules, out_dir / ADAPTER_FILE)
        return (ADAPTER_FILE,)

    def export(self, merged_dir: Path, out_dir: Path, precisions: list[str], settings: dict) -> list[Artifact]:
        ep = str(settings.get("execution_provider", DEFAULT_EXECUTION_PROVIDER)).lower()
        plans = [self.parse(p) for p in self.check_precisions(precisions, ep)]
        version = builder_version()
        threads = int(settings.get("threads", 1))
        slots = bool(settings.get("separate_adapters"))
        artifacts = [self._build(merged_dir, out_dir, plan, ep, version, threads, slots, settings) for plan in plans]
        shutil.rmtree(out_dir / ".work", ignore_errors=True)
        return artifacts

    def _build(self, merged_dir: Path, out_dir: Path, plan: Precision, ep: str, version: str, threads: int,
               lora_inputs: bool = False, settings: dict | None = None) -> Artifact:
        """One precision: the builder writes `<name>.partial/`, renamed to `<name>/` once complete; with
        `lora_inputs` (a base for adapters kept separate), its graph takes LoRA weights as inputs (_onnx_lora).
        A data-aware int4 is first written as a GPTQ checkpoint (_onnx_imatrix) that the builder reads instead."""
        dest, tmp = out_dir / plan.name, out_dir / f"{plan.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        options = builder_options(plan)
        source, calibration = merged_dir, None
        if _calibrated(plan):
            source, calibration = self._calibrate(merged_dir, out_dir / ".work", plan, settings or {})
        cmd = [sys.executable, "-m", "phiedge.exporters._genai_build", "--threads", str(threads),
               "-i", str(source), "-o", str(tmp),
               "-p", plan.base, "-e", ep, "-c", str(out_dir / ".work"), "--extra_options", "hf_token=false",
               *options]
        log.info("onnx %s: onnxruntime-genai %s builder (%s)", plan.name, version, " ".join(options) or "defaults")
        try:
            cost = run_tool(cmd, f"onnxruntime-genai model builder ({plan.name}, {ep})")
        except ToolchainError as e:
            if "cannot reshape array" in str(e) and "algo_config=k_quant" in options:
                raise ToolchainError(f"onnx {plan.name}: the builder's k_quant cannot quantize this model's layer "
                                     f"widths in these blocks ({str(e).split(': ', 1)[-1]}); its blocks of 32 can: "
                                     f"drop the block option (e.g. int4-k_quant-head8)") from None
            raise
        meta = {"onnxruntime_genai": version, "execution_provider": ep, "builder_options": list(options),
                "shared_embeddings": _shares_embedding(merged_dir), "export_seconds": cost["seconds"],
                "export_peak_rss_mb": cost["peak_rss_mb"]}
        if calibration:
            meta["calibration"] = calibration
        if lora_inputs:
            from ._onnx_lora import add_lora_inputs
            config = json.loads((merged_dir / "config.json").read_text())
            meta["lora_inputs"] = len(add_lora_inputs(tmp / "model.onnx", _header(merged_dir), config))
        return self.finish(tmp, dest, plan.name, ARTIFACT_FILES, meta, f"onnxruntime-genai model builder ({plan.name})")


    @staticmethod
    def _calibrate(merged_dir: Path, work: Path, plan: Precision, settings: dict) -> tuple[Path, dict]:
        """The importance-weighted GPTQ checkpoint of `plan` and its calibration record (one calibration pass
        per export, shared by its data-aware precisions)."""
        block = int(str(plan.value("block")).split("=")[1])
        head_bits = 8 if plan.value("head") else 4
        budget = int(settings.get("calibration_tokens") or DEFAULT_TOKENS)
        work.mkdir(parents=True, exist_ok=True)
        out = work / f"gptq-b{block}-h{head_bits}"
        job = out.with_suffix(".job.json")
        job.write_text(json.dumps({"model": str(merged_dir), "out": str(out), "stats": str(work / "stats.npz"),
                                   "texts": [t for t in settings.get("calibration_text") or [] if t.strip()],
                                   "seq_len": IMAT_SEQ_LEN, "budget": budget, "block": block,
                                   "head_bits": head_bits}))
        ran = run_tool([sys.executable, "-m", "phiedge.exporters._onnx_imatrix", str(job)],
                       f"data-aware int4 ({plan.name})")
        record = {**json.loads(out.with_suffix(".json").read_text()), "budget": budget,
                  "peak_rss_mb": ran["peak_rss_mb"]}
        log.info("onnx %s: importance-weighted int4 over %d calibration tokens, sha256 %s", plan.name,
                 record["tokens"], record["sha256"][:12])
        return out, record


def _header(model_dir: Path) -> dict[str, list[int]]:
    """{tensor name: shape} over the checkpoint's safetensors files (headers only)."""
    from ..tensorfile import safetensors_header
    return {n: t["shape"] for f in sorted(model_dir.glob("*.safetensors")) for n, t in safetensors_header(f).items()}


def _shares_embedding(model_dir: Path) -> bool:
    """The builder shares a tied embedding with the LM head (quantized alike) whenever the config ties them."""
    return bool(json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings", False))
