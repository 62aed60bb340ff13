"""MLX for mlx-lm: mlx-lm's own converter, one folder per precision that `mlx_lm.load` / `mlx_lm.generate` run.

- Each folder holds model.safetensors (+ index), config.json (with mlx-lm's `quantization` table),
  tokenizer.json / tokenizer_config.json, chat_template.jinja and generation_config.json, as mlx-lm saves them.
- Conversion runs mlx-lm's `convert` in a child process (`_mlx_convert`) for its wall time and peak memory.
- Precision names: `fp32`, `fp16`, `bf16`, `8bit`, `4bit`, `mixed_4_6` (mlx-lm's recipe: 6 bits for some
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
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..errors import ToolchainError, UsageError
from . import Artifact, Exporter, register, run_tool

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
REFUSED_BASES = {"mixed_3_4", "mixed_3_6", "mixed_2_6", "2bit", "3bit", "5bit", "6bit"}
# option token -> (group, value). One token per group; quantized precisions only.
TOKENS: dict[str, tuple[str, int]] = {
    "g32": ("group", 32),
    "g64": ("group", 64),      # mlx-lm's default
    "g128": ("group", 128),
    "emb4": ("embed", 4),      # the tied embedding / LM head at 4 bits (mlx-lm's plain -q)
    "emb8": ("embed", 8),      # at 8 bits (phiedge's default: about a third of the KL of emb4)
    "embfp": ("embed", 0),     # unquantized, in the checkpoint's float dtype
}
DEFAULT_TOKENS = frozenset({"g64", "emb8"})
GROUP_ORDER = ("group", "embed")
ARTIFACT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class Plan:
    name: str                  # canonical precision name, also the folder name
    dtype: str | None
    bits: int | None
    recipe: str | None
    group_size: int
    embed_bits: int | None     # None: float precision; 0: keep unquantized

    def args(self) -> list[str]:
        out = [] if self.dtype is None else ["--dtype", self.dtype]
        if self.bits is not None:
            out += ["--bits", str(self.bits), "--group-size", str(self.group_size),
                    "--embed-bits", str(self.embed_bits)]
            if self.recipe:
                out += ["--recipe", self.recipe]
        return out


def parse_precision(value: str) -> Plan:
    base, *tokens = value.strip().lower().split("-")
    if base in REFUSED_BASES:
        raise UsageError(f"mlx precision '{value}' is not offered: no parity gate is measured for it on a real "
                         f"model yet; use {', '.join(BASES)}")
    if base not in BASES:
        raise UsageError(f"mlx has no precision '{value}': known are {', '.join(BASES)} "
                         f"(quantized ones take options, e.g. 4bit-g32-emb4)")
    dtype, bits, recipe = BASES[base]
    if tokens and bits is None:
        raise UsageError(f"mlx precision '{value}': only quantized precisions take options ({', '.join(TOKENS)})")
    groups: dict[str, str] = {}
    for t in tokens:
        if t not in TOKENS:
            raise UsageError(f"mlx precision '{value}': unknown option '{t}': known are {', '.join(TOKENS)}")
        g = TOKENS[t][0]
        if g in groups:
            raise UsageError(f"mlx precision '{value}': '{groups[g]}' and '{t}' both set the {g}: keep one")
        groups[g] = t
    if bits is None:
        return Plan(base, dtype, None, None, 64, None)
    groups.setdefault("group", "g64")
    groups.setdefault("embed", "emb8")
    kept = [groups[g] for g in GROUP_ORDER if groups[g] not in DEFAULT_TOKENS]
    return Plan(name="-".join([base, *kept]), dtype=dtype, bits=bits, recipe=recipe,
                group_size=TOKENS[groups["group"]][1], embed_bits=TOKENS[groups["embed"]][1])


def with_group_size(precisions: list[str], group_size: int | None) -> list[str]:
    """`--mlx-group-size N`: add `-gN` to every quantized precision that does not name its own group size."""
    if group_size is None:
        return precisions
    if f"g{group_size}" not in TOKENS:
        raise UsageError(f"mlx has no group size {group_size}: known are 32, 64, 128")
    out = []
    for p in precisions:
        base, *tokens = p.strip().lower().split("-")
        quantized = BASES.get(base, (None, None, None))[1] is not None
        has_group = any(TOKENS.get(t, ("",))[0] == "group" for t in tokens)
        out.append(f"{p}-g{group_size}" if quantized and not has_group else p)
    return out


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
    PRECISIONS = tuple(BASES)
    DEFAULT_PRECISION = "4bit"
    # 4bit: 4.5 bits per layer weight (fp16 scale + bias per 64) plus the 8-bit embedding.
    BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "8bit": 1.07, "4bit": 0.66, "mixed_4_6": 0.72}

    def check_precisions(self, precisions: list[str]) -> list[str]:
        names: list[str] = []
        for p in precisions:
            name = parse_precision(p).name
            if name not in names:
                names.append(name)
        return names

    def estimate_bytes(self, n_params: int, precisions: list[str]) -> int:
        return int(sum(self.BYTES_PER_PARAM[p.split("-")[0]] for p in self.check_precisions(precisions)) * n_params)

    def export(self, merged_dir: Path, out_dir: Path, precisions: list[str], settings: dict) -> list[Artifact]:
        plans = [parse_precision(p) for p in self.check_precisions(precisions)]
        version = converter_version()
        return [self._convert(merged_dir, out_dir, plan, version) for plan in plans]

    def _convert(self, merged_dir: Path, out_dir: Path, plan: Plan, version: str) -> Artifact:
        dest, tmp = out_dir / plan.name, out_dir / f"{plan.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)          # mlx-lm refuses an existing output path
        cmd = [sys.executable, "-m", "phiedge.exporters._mlx_convert", str(merged_dir), str(tmp), *plan.args()]
        log.info("mlx %s: mlx-lm %s convert (%s)", plan.name, version, " ".join(plan.args()) or "checkpoint dtype")
        cost = run_tool(cmd, f"mlx-lm convert ({plan.name})")
        missing = [f for f in ARTIFACT_FILES if not (tmp / f).is_file()]
        if missing:
            raise ToolchainError(f"mlx-lm convert ({plan.name}) wrote no {', '.join(missing)} in {tmp}: "
                                 f"rerun with PHIEDGE_DEBUG=1")
        config = published_layout(json.loads((tmp / "config.json").read_text()))
        (tmp / "config.json").write_text(json.dumps(config, indent=4))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        files = tuple(sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()))
        art = Artifact(format=self.name, precision=plan.name, path=dest, files=files,
                       meta={"mlx_lm": version, "mlx": metadata.version("mlx"),
                             "dtype": plan.dtype or config.get("torch_dtype") or config.get("dtype"),
                             "quantization": config.get("quantization"), "recipe": plan.recipe,
                             "embedding_bits": plan.embed_bits,
                             "export_seconds": cost["seconds"], "export_peak_rss_mb": cost["peak_rss_mb"]})
        log.info("mlx %s: %.1f MB in %.1f s, peak %.0f MB", plan.name, art.size_bytes / 1e6, cost["seconds"],
                 cost["peak_rss_mb"])
        return art
