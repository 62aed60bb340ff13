"""LoRA adapters kept separate from their base: what a runtime's adapter file needs from a PEFT adapter.

PEFT adds `s_m · B_m A_m x` to each adapted module m, where s_m = alpha_m / r_m (rsLoRA: alpha_m / sqrt(r_m)),
and `rank_pattern` / `alpha_pattern` choose r_m and alpha_m per module. The runtimes hold one scale per adapter
(llama.cpp an alpha per file, mlx-lm one `scale`, OpenVINO GenAI one `alpha`), so phiedge folds each module's
s_m into its B once (`fold_scales`) and has the runtime apply a scale of exactly 1: rsLoRA and both patterns then
mean what PEFT means, whatever the runtime reads of them.

Build time only (safetensors + torch; the adapter's tensors are small: tens of MB for Phi-4-mini at rank 16).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UnsupportedAdapterError

PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def pattern_key(patterns, module: str) -> str | None:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first pattern that matches the module path's end."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)


def module_scales(config: dict, ranks: dict[str, int]) -> dict[str, float]:
    """{module path: PEFT's scaling} for every adapted module, from adapter_config.json and each module's rank
    (its lora_A rows, which rank_pattern set when it was trained)."""
    rslora = bool(config.get("use_rslora"))
    out = {}
    for module, r in ranks.items():
        alpha_key = pattern_key((config.get("alpha_pattern") or {}).keys(), module)
        alpha = float((config.get("alpha_pattern") or {})[alpha_key] if alpha_key else config["lora_alpha"])
        out[module] = alpha / math.sqrt(r) if rslora else alpha / r
    return out


MAGNITUDE = ".lora_magnitude_vector"      # PEFT's DoRA magnitude per output row (saved without `.default`)


def refuse_unfoldable(config: dict, names: list[str], runtime: str, dora: bool = False) -> None:
    """What `runtime`'s LoRA file cannot hold, refused with the reason: DoRA's magnitudes (unless `dora`: the
    runtime applies them), LoRA biases, whole modules saved beside the adapter."""
    is_dora = config.get("use_dora") or any(MAGNITUDE in n for n in names)
    if is_dora and not dora:
        raise UnsupportedAdapterError(f"the adapter is DoRA, and {runtime} applies plain LoRA only (DoRA's magnitude "
                                      f"vectors would be dropped): build it with --adapter-mode merged")
    if config.get("lora_bias") or any(n.endswith(".lora_B.bias") for n in names):
        raise UnsupportedAdapterError(f"the adapter trains a LoRA bias, which {runtime}'s LoRA cannot apply: build "
                                      f"it with --adapter-mode merged")
    other = sorted(n for n in names if not n.endswith((A_SUFFIX, B_SUFFIX)) and not (is_dora and MAGNITUDE in n))
    if other:
        raise UnsupportedAdapterError(f"the adapter holds tensors that are not LoRA A/B pairs ({other[0]}"
                                      f"{' and more' if len(other) > 1 else ''}: modules_to_save?), which {runtime} "
                                      f"cannot load beside a base: build it with --adapter-mode merged")


@dataclass(frozen=True)
class Folded:
    """One adapted module with PEFT's scaling folded into B (fp32 torch tensors): A (r, in), B (out, r), and DoRA's
    magnitude (out,) or None; `scale` is what was folded."""
    a: object
    b: object
    magnitude: object | None
    scale: float


def folded(adapter_dir: Path, runtime: str, dora: bool = False) -> tuple[dict, dict[str, Folded]]:
    """(adapter_config.json, {module path without PEFT's prefix: Folded}) of the PEFT adapter in `adapter_dir`,
    after refusing what `runtime` cannot hold (refuse_unfoldable)."""
    from safetensors.torch import load_file  # torch: adapters trained in bf16 are saved bf16
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    refuse_unfoldable(config, list(tensors), runtime, dora=dora)
    modules = sorted(n[:-len(A_SUFFIX)] for n in tensors if n.endswith(A_SUFFIX))
    ranks = {m.removeprefix(PREFIX): int(tensors[m + A_SUFFIX].shape[0]) for m in modules}
    scales = module_scales(config, ranks)
    out = {}
    for m in modules:
        key = m.removeprefix(PREFIX)
        mag = next((t for n, t in tensors.items() if n.startswith(m + MAGNITUDE)), None)
        out[key] = Folded(tensors[m + A_SUFFIX].float().contiguous(),
                          (tensors[m + B_SUFFIX].double() * scales[key]).float().contiguous(),
                          None if mag is None else mag.float().contiguous(), scales[key])
    return config, out


def fold_scales(adapter_dir: Path, out_dir: Path, runtime: str) -> dict:
    """A copy of the PEFT adapter in `out_dir` whose every lora_B holds its module's scaling (fp32), and whose
    adapter_config.json says `lora_alpha: 0` with no patterns and no rsLoRA: the scale is in the tensors. Returns
    {module path: scale folded}."""
    from safetensors.torch import save_file
    config, modules = folded(adapter_dir, runtime)
    out = {}
    for key, f in modules.items():
        out[PREFIX + key + A_SUFFIX], out[PREFIX + key + B_SUFFIX] = f.a, f.b
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / "adapter_model.safetensors"))
    config = {**config, "lora_alpha": 0, "alpha_pattern": {}, "rank_pattern": {}, "use_rslora": False,
              "phiedge_folded_scales": True}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return {key: f.scale for key, f in modules.items()}
