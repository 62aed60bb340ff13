"""MLX for mlx-lm: mlx-lm's own converter, one folder per precision that `mlx_lm.load` / `mlx_lm.generate` run.

- Each folder holds model.safetensors (+ index), config.json (with mlx-lm's `quantization` table),
  tokenizer.json / tokenizer_config.json, chat_template.jinja and generation_config.json, as mlx-lm saves them.
- Conversion runs mlx-lm's `convert` in a child process (`_mlx_convert`) for its wall time and peak memory.
- Precision names (phiedge.exporters.grammar): `fp32`, `fp16`, `bf16`, `8bit`, `4bit`, `mixed_4_6` (mlx-lm's recipe: 6
bits for some
  v_proj/down_proj layers, 4 for the rest), with options for the quantized ones: group size `g32`/`g64`/`g128`
  and how the tied embedding (= the LM head) is stored: `emb4`, `emb8`, `embfp` (unquantized).
  Defaults, left out of canonical names: `g64` (mlx-lm's) and `emb8` (not mlx-lm's: measured below), so
  `4bit` is 4-bit layers with an 8-bit embedding and `4bit-emb4` is what `mlx_lm.convert -q` writes.
- Why `emb8` by default (tiny Phi fixture, short regime, KL nats / top-1 of 64): 4bit g64 emb4 0.0174 / 0.891,
  emb8 0.0059 / 0.938, embfp 0.0057 / 0.953; g32 0.0134 -> 0.0059; g128 0.0286 -> 0.0071; mixed_4_6
  0.0163 -> 0.0054. mlx-lm's mixed recipes give 6 bits to a `lm_head` module, which a tied model does not
  have, so its embedding stays at the low bit width unless phiedge sets it.
- Not offered: mlx-lm's 3- and 2-bit recipes (mixed_3_4, mixed_3_6, mixed_2_6): they convert and run, but
  no parity gate for them is measured on a real model yet (tiny fixture: KL 0.028-0.11 with emb8).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

from ..calibration import DEFAULT_TOKENS
from ..errors import ToolchainError, UnsupportedAdapterError
from ..source import config_dtype
from .base import TOOL_BYTES, Artifact, CliModifier, Exporter, register, run_tool
from .grammar import Grammar, Precision

log = logging.getLogger(__name__)

# precision -> (float dtype for mlx-lm's `dtype`, or None to keep the checkpoint's; quantized bits or None;
# mlx-lm mixed recipe or None)
BASES: dict[str, tuple[str | None, int | None, str | None]] = {
    "fp32": ("float32", None, None),
    "fp16": ("float16", None, None),
    "bf16": ("bfloat16", None, None),
    "8bit": (None, 8, None),
    "4bit": (None, 4, None),
    "mixed_4_6": (None, 4, "mixed_4_6"),
}
# option token -> (group, value). One token per group; quantized precisions only.
TOKENS: dict[str, tuple[str, int]] = {
    "g32": ("group", 32),
    "g64": ("group", 64),      # mlx-lm's default
    "g128": ("group", 128),
    "emb4": ("embed", 4),      # the tied embedding / LM head at 4 bits (mlx-lm's plain -q)
    "emb8": ("embed", 8),      # at 8 bits (phiedge's default: about a third of the KL of emb4)
    "embfp": ("embed", 0),     # unquantized, in the checkpoint's float dtype
    "gptq": ("algo", 1),       # mlx-lm's GPTQ on the --docs documents' calibration sample (phiedge.calibration)
}
NOT_OFFERED = "no parity gate is measured for it on a real model yet"
GRAMMAR = Grammar(
    "mlx", bases=tuple(BASES), option_bases=frozenset(b for b, (_, bits, _) in BASES.items() if bits),
    tokens=TOKENS, defaults={"group": "g64", "embed": "emb8"}, order=("group", "embed", "algo"),
    refused=((frozenset({"gptq", "embfp"}), None, "mlx-lm's GPTQ quantizes the embedding too: drop 'embfp'"),),
    refused_bases={b: NOT_OFFERED for b in ("mixed_3_4", "mixed_3_6", "mixed_2_6", "2bit", "3bit", "5bit", "6bit")},
    takes_options="only quantized precisions take options",
    options_hint="quantized ones take options, e.g. 4bit-g32-emb4")
ARTIFACT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")     # what mlx_lm.load(..., adapter_path=) reads
LAYER_MODULE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# mlx-lm's GPTQ: windows of this many tokens; its Hessians of every layer are held at once (fp32, in x in per
# linear: 12.2 GB at Phi-4-mini's widths), beside the model.
GPTQ_SEQ_LEN = 512
GPTQ_PEAK_PER_PARAM = 5.3


def convert_args(p: Precision) -> list[str]:
    """mlx-lm convert's arguments for a precision (phiedge.exporters._mlx_convert)."""
    dtype, bits, recipe = BASES[p.base]
    out = [] if dtype is None else ["--dtype", dtype]
    if bits is not None:
        out += ["--bits", str(bits), "--group-size", str(p.value("group")), "--embed-bits", str(p.value("embed"))]
        if recipe:
            out += ["--recipe", recipe]
    return out


def gptq(p: Precision) -> bool:
    return bool(p.value("algo"))


def _pop_json(path: Path) -> dict:
    """A record the converter left in the artifact folder, read and removed (it does not ship)."""
    data = json.loads(path.read_text())
    path.unlink()
    return data


def published_layout(config: dict) -> dict:
    """The config with rope settings where mlx-lm reads them. transformers 5 saves them nested in
    `rope_parameters` (rope_theta, partial_rotary_factor, the LongRoPE factors); mlx-lm 0.31 reads the
    published top-level keys and, finding none, runs rope_theta 10000 and no LongRoPE without a word
    (SmolLM2 saved by transformers 5: MLX fp16 top-1 0.72, KL 0.17). Top-level keys already present win."""
    out = dict(config)
    rp = out.get("rope_parameters")
    if not isinstance(rp, dict):
        return out
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in rp:
            out.setdefault(key, rp[key])
    kind = rp.get("rope_type") or rp.get("type")
    if kind and kind != "default" and not out.get("rope_scaling"):
        out["rope_scaling"] = {**{k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")},
                               "type": kind, "rope_type": kind}
    return out


def converter_version() -> str:
    """mlx-lm's version, once `mlx` itself imports (on Linux `mlx[cpu]`; `mlx-cpu` alone has no `mlx` module)."""
    try:
        version = metadata.version("mlx-lm")
    except metadata.PackageNotFoundError:
        raise ToolchainError("mlx-lm is not installed: pip install 'phiedge[mlx]'") from None
    if importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx.core") is None:
        raise ToolchainError("mlx-lm is installed but mlx is not (on Linux install 'mlx[cpu]', not 'mlx-cpu'): "
                             "pip install 'phiedge[mlx]'")
    return version


@register
class MLXExporter(Exporter):
    name = "mlx"
    GRAMMAR = GRAMMAR
    DEFAULT_PRECISION = "4bit"
    TOOL_4BIT = "4bit-emb4"          # `mlx_lm.convert -q`: 4 bits, group 64, the embedding at 4 bits too
    SWEEP = ("4bit-emb4", "4bit", "4bit-g32-emb4", "4bit-g32", "mixed_4_6-emb4", "mixed_4_6", "8bit")
    CLI_FLAG = "--mlx-quant"
    CLI_HELP = ("MLX precisions: fp32, fp16, bf16, 8bit, 4bit, mixed_4_6, quantized ones with options such as "
                "4bit-g32 or 4bit-emb4 (4bit: 4-bit layers, 8-bit tied embedding)")
    CLI_MODIFIERS = {"--mlx-group-size": CliModifier("group", "g{}", ("32", "64", "128"),
                                                     "Group size for every quantized MLX precision that names none "
                                                     "(default 64).")}
    TOOL_MODULES = ("phiedge.exporters._mlx_convert", "phiedge.calibration")

    def tensors(self, art: Artifact) -> list[tuple[str, int]]:
        from ..tensorfile import safetensors_header
        return [(n, t["data_offsets"][1] - t["data_offsets"][0]) for f in sorted(art.path.glob("*.safetensors"))
                for n, t in safetensors_header(f).items()]
    # 4bit: 4.5 bits per layer weight (fp16 scale + bias per 64) plus the 8-bit embedding.
    PEAK_BYTES_PER_PARAM = 1.1          # mlx_lm.convert 4-bit: 4.1 GB at 3.84 B (make bench: bench/results.json)
    BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "8bit": 1.07, "4bit": 0.66, "mixed_4_6": 0.72}

    ADAPTER_RUNTIME = "mlx-lm"
    ADAPTER_DORA = True                 # mlx-lm's DoRALinear: PEFT's DoRA, magnitude `m` per output row

    def toolchain(self) -> dict[str, str]:
        return {"mlx-lm": converter_version()}

    def export_adapter(self, base_dir: Path, adapter_dir: Path, out_dir: Path) -> tuple[str, ...]:
        """The PEFT adapter in mlx-lm's own format (ADAPTER_FILES), for any MLX artifact of this base: per module
        `lora_a` = Aᵀ (in, r) and `lora_b` = (s·B)ᵀ (r, out) with PEFT's scaling s folded in (phiedge.adapters;
        `scale` 1.0), DoRA's magnitude as `m`. mlx-lm's Phi-3 keeps Hugging Face's fused qkv_proj / gate_up_proj,
        so module names map 1:1. mlx-lm makes every adapted module one rank: modules of a lower rank (PEFT's
        rank_pattern) are padded with zero columns of A and zero rows of B, which add exact zeros."""
        import numpy as np
        from safetensors.numpy import save_file

        from ..adapters import folded
        config, modules = folded(adapter_dir, self.ADAPTER_RUNTIME, dora=True)
        n_layers = int(json.loads((base_dir / "config.json").read_text())["num_hidden_layers"])
        rank = max(int(f.a.shape[0]) for f in modules.values())
        tensors, keys = {}, set()
        for path, f in modules.items():
            m = LAYER_MODULE.match(path)
            if not m:
                raise UnsupportedAdapterError(f"the adapter adapts {path}, outside the decoder layers, which mlx-lm "
                                              f"cannot load beside a base: build it with --adapter-mode merged")
            keys.add(m.group(2))
            r = int(f.a.shape[0])
            a = f.a.T.numpy()                                            # (in, r)
            b = f.b.T.numpy()                                            # (r, out)
            if r < rank:
                a = np.concatenate([a, np.zeros((a.shape[0], rank - r), a.dtype)], axis=1)
                b = np.concatenate([b, np.zeros((rank - r, b.shape[1]), b.dtype)], axis=0)
            tensors[f"{path}.lora_a"], tensors[f"{path}.lora_b"] = a.copy(), b.copy()
            if f.magnitude is not None:
                tensors[f"{path}.m"] = f.magnitude.numpy().copy()
        dora = any(f.magnitude is not None for f in modules.values())
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out_dir / "adapters.safetensors.partial"))
        (out_dir / "adapter_config.json").write_text(json.dumps({
            "fine_tune_type": "dora" if dora else "lora", "num_layers": n_layers,
            "lora_parameters": {"rank": rank, "scale": 1.0, "dropout": 0.0, "keys": sorted(keys)},
            "phiedge": {"source": "peft", "folded_scales": True, "peft_type": config.get("peft_type")}}, indent=2))
        (out_dir / "adapters.safetensors.partial").rename(out_dir / "adapters.safetensors")
        return ADAPTER_FILES

    def calibrates(self, precisions: list[str]) -> bool:
        return any(gptq(self.parse(p)) for p in precisions)

    def _needs(self, precisions: list[str], calibration: bool, settings: dict) -> list[str]:
        out = []
        for p in (self.parse(p) for p in precisions):
            if gptq(p) and not calibration:
                out.append(f"mlx {p.name}: GPTQ calibrates on the documents: pass --docs (or drop '-gptq')")
            if gptq(p) and BASES[p.base][2]:        # every quantized base but the mixed recipes is 4 or 8 bits
                out.append(f"mlx {p.name}: mlx-lm's GPTQ quantizes every layer at one width, not a mixed recipe: "
                           f"use 4bit-gptq or 8bit-gptq")
        return out

    def peak_bytes(self, n_params: int, precision: str) -> int:
        per_param = GPTQ_PEAK_PER_PARAM if gptq(self.parse(precision)) else self.PEAK_BYTES_PER_PARAM
        return int(per_param * n_params) + TOOL_BYTES

    def export(self, merged_dir: Path, out_dir: Path, precisions: list[str], settings: dict) -> list[Artifact]:
        plans = [self.parse(p) for p in self.check_precisions(precisions)]
        version = converter_version()
        return [self._convert(merged_dir, out_dir, plan, version, settings) for plan in plans]

    def _convert(self, merged_dir: Path, out_dir: Path, plan: Precision, version: str, settings: dict) -> Artifact:
        dest, tmp = out_dir / plan.name, out_dir / f"{plan.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)          # mlx-lm refuses an existing output path
        args = convert_args(plan)
        if gptq(plan):
            job = out_dir / f"{plan.name}.gptq.json"
            job.write_text(json.dumps({"texts": [t for t in settings.get("calibration_text") or [] if t.strip()],
                                       "seq_len": GPTQ_SEQ_LEN,
                                       "budget": int(settings.get("calibration_tokens") or DEFAULT_TOKENS)}))
            args += ["--gptq", str(job)]
        cmd = [sys.executable, "-m", "phiedge.exporters._mlx_convert", str(merged_dir), str(tmp), *args]
        log.info("mlx %s: mlx-lm %s convert (%s)", plan.name, version, " ".join(args) or "checkpoint dtype")
        cost = run_tool(cmd, f"mlx-lm convert ({plan.name})")
        config_file = tmp / "config.json"
        config = published_layout(json.loads(config_file.read_text())) if config_file.is_file() else {}
        if config:
            config_file.write_text(json.dumps(config, indent=4))
        dtype, _, recipe = BASES[plan.base]
        meta = {"mlx_lm": version, "mlx": metadata.version("mlx"),
                "dtype": dtype or (config_dtype(config) if config else None),
                "quantization": config.get("quantization"), "recipe": recipe, "embedding_bits": plan.value("embed"),
                **({"gptq": _pop_json(tmp / "phiedge_gptq.json")} if gptq(plan) else {}),
                "export_seconds": cost["seconds"], "export_peak_rss_mb": cost["peak_rss_mb"]}
        return self.finish(tmp, dest, plan.name, ARTIFACT_FILES, meta, f"mlx-lm convert ({plan.name})")
