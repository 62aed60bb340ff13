"""Merge a PEFT LoRA into its base, prove the merge, save the merged checkpoint (the reference logits of the
checks are phiedge.checks.reference's).

The proof: on a probe prompt, the merged model's logits equal the adapter-wrapped (PEFT) model's within a
tolerance set by the dtype, and differ from the base's (an adapter that changes nothing is refused, not
silently shipped). One model copy is in memory at any time: the base is wrapped, probed with the adapter
on and off, merged in place, probed again.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import tokenizer_files
from .checks import probes as probes_mod
from .checks.reference import last_logits
from .errors import MergeProofError
from .source import Source, config_dtype

log = logging.getLogger(__name__)

# Files copied verbatim from the base: exporters read them exactly as published.
PASSTHROUGH = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
               "chat_template.jinja", "chat_template.json")
# Allowed |merged - peft| on the probe logits, by dtype: fp32 merges are exact up to summation order;
# 16-bit merges round W + s*BA once more, so they get a budget relative to the logit range.
MERGE_TOLERANCE = {"float32": (1e-3, 0.0), "bfloat16": (0.05, 0.03), "float16": (0.02, 0.01)}


@dataclass
class MergeProof:
    adapter: str | None
    dtype: str
    max_abs_vs_peft: float | None
    max_abs_vs_base: float | None
    tolerance: float | None
    top1_vs_peft: float | None
    tokenizer: dict | None = None     # phiedge.tokenizer_files.record: whose template the merged checkpoint holds


def merge(model: Source, adapter: Source | None, config: dict, out_dir: Path, *,
          allow_noop: bool = False) -> MergeProof:
    """Write the merged checkpoint to out_dir (complete or absent) and return the proof."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype_str = config_dtype(config)
    dtype = getattr(torch, dtype_str)
    probe = probes_mod.make(model.path, None)[0].ids
    log.info("loading %s (%s)", model.ref, dtype_str)
    base = AutoModelForCausalLM.from_pretrained(model.path, dtype=dtype, low_cpu_mem_usage=True)
    base.eval()
    proof = MergeProof(adapter=adapter.ref if adapter else None, dtype=dtype_str, max_abs_vs_peft=None,
                       max_abs_vs_base=None, tolerance=None, top1_vs_peft=None)
    if adapter is not None:
        from peft import PeftModel
        wrapped = PeftModel.from_pretrained(base, adapter.path, is_trainable=False)
        wrapped.eval()
        l_peft = last_logits(wrapped, probe)
        with wrapped.disable_adapter():
            l_base = last_logits(wrapped, probe)
        # In place: from_pretrained memory-maps the base's safetensors (privately: the files are never written,
        # tests/test_merge.py), and a merged copy of every adapted matrix beside the mapped originals doubled
        # the stage's resident memory (18.9 GB at 3.8B). safe_merge's NaN check is the proof's finite check.
        merged = wrapped.merge_and_unload(safe_merge=False)
        l_merged = last_logits(merged, probe)
        abs_tol, rel_tol = MERGE_TOLERANCE.get(dtype_str, MERGE_TOLERANCE["float32"])
        tol = abs_tol + rel_tol * float(np.abs(l_peft).max())
        proof.max_abs_vs_peft = float(np.abs(l_merged - l_peft).max())
        proof.max_abs_vs_base = float(np.abs(l_merged - l_base).max())
        proof.tolerance = tol
        proof.top1_vs_peft = float((l_merged.argmax(-1) == l_peft.argmax(-1)).mean())
        if not np.isfinite(l_merged).all():
            raise MergeProofError(f"the merged model's logits are not finite (NaN or inf): the merge of "
                                  f"{adapter.ref} overflowed {dtype_str}; report it with its adapter_config.json")
        if proof.max_abs_vs_peft > tol:
            raise MergeProofError(f"merged logits differ from the PEFT model by {proof.max_abs_vs_peft:.4g} "
                                  f"(tolerance {tol:.3g}): the merge of {adapter.ref} is wrong; report it with "
                                  f"its adapter_config.json")
        if proof.max_abs_vs_base <= tol and not allow_noop:
            raise MergeProofError(f"adapter {adapter.ref} changes nothing (merged vs base logits differ by "
                                  f"{proof.max_abs_vs_base:.2g}, below {tol:.2g}): check that it is the trained "
                                  f"adapter (lora_B all zero?), or pass --allow-noop-adapter to ship the base")
        model_out = merged
    else:
        model_out = base
    proof.tokenizer = _save(model_out, model, adapter, out_dir)
    del model_out
    return proof


def _save(model_obj, model: Source, adapter: Source | None, out_dir: Path) -> dict:
    """The merged checkpoint: the base's config and tokenizer files, then the adapter's template, special tokens
    and eos ids where it carries its own (phiedge.tokenizer_files); returns the tokenizer's record."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model_obj.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
    for name in PASSTHROUGH:
        src = model.path / name
        if src.exists():
            shutil.copy2(src, tmp / name)
    written = tokenizer_files.apply(adapter.path, model.path, tmp) if adapter is not None else []
    if written:
        log.info("the adapter's own tokenizer files win: %s", ", ".join(written))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return tokenizer_files.record(out_dir, "adapter" if written else "base")


def proof_dict(p: MergeProof) -> dict:
    return asdict(p)
