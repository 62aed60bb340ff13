"""Merge a PEFT LoRA into its base, prove the merge, save the merged checkpoint, record reference logits.

The proof: on a probe prompt, the merged model's logits equal the adapter-wrapped (PEFT) model's within a
tolerance set by the dtype, and differ from the base's (an adapter that changes nothing is refused, not
silently shipped). One model copy is in memory at any time: the base is wrapped, probed with the adapter
on and off, merged in place, probed again.
"""
from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import probes as probes_mod
from .errors import MergeProofError
from .source import Source

log = logging.getLogger(__name__)

# Files copied verbatim from the base: exporters read them exactly as published.
PASSTHROUGH = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
               "chat_template.jinja", "chat_template.json")
# Allowed |merged - peft| on the probe logits, by dtype: fp32 merges are exact up to summation order;
# 16-bit merges round W + s*BA once more, so they get a budget relative to the logit range.
MERGE_TOLERANCE = {"float32": (1e-3, 0.0), "bfloat16": (0.05, 0.03), "float16": (0.02, 0.01)}
GREEDY_TOKENS = 16
# fp32_compute upcasts a half-precision weight in slices of at most this many bytes: Phi-4-mini's tied
# embedding / LM head is 2.4 GB in fp32, a transient copy the merge stage's peak does not need.
UPCAST_SLICE_BYTES = 256 * 2**20


@dataclass
class MergeProof:
    adapter: str | None
    dtype: str
    max_abs_vs_peft: float | None
    max_abs_vs_base: float | None
    tolerance: float | None
    top1_vs_peft: float | None


def _dtype_name(config: dict) -> str:
    return str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")


@contextmanager
def fp32_compute():
    """Run a half-precision checkpoint's forward in fp32, weights kept as stored (upcast per layer, on the fly).

    On CPUs without AVX-512 BF16 / AMX, torch's bf16 matmul has no fast kernel: 0.1 GFLOPS against 50 for fp32
    on this 2-core AVX2 machine, so one forward of the real Phi-4-mini over the 233-token proof probe took more
    than 13 minutes and the 4200-token reference would take days. Upcasting each weight as it is used costs one
    extra read of the weights per forward and one fp32 slice of at most UPCAST_SLICE_BYTES at a time (rows of the
    output dimension: each output is the same dot product), and the activations are fp32, which is also the
    better reference.
    A no-op for fp32 checkpoints."""
    import torch
    import torch.nn.functional as F
    lin, emb = torch.nn.Linear.forward, torch.nn.Embedding.forward

    def linear(self, x):
        w = self.weight
        if w.dtype not in (torch.bfloat16, torch.float16):
            return lin(self, x)
        x, b = x.float(), None if self.bias is None else self.bias.float()
        rows = max(1, UPCAST_SLICE_BYTES // (4 * w.shape[1]))
        if rows >= w.shape[0]:
            return F.linear(x, w.float(), b)
        return torch.cat([F.linear(x, w[i:i + rows].float(), None if b is None else b[i:i + rows])
                          for i in range(0, w.shape[0], rows)], dim=-1)

    def embedding(self, ids):
        out = emb(self, ids)
        return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out

    torch.nn.Linear.forward, torch.nn.Embedding.forward = linear, embedding
    try:
        yield
    finally:
        torch.nn.Linear.forward, torch.nn.Embedding.forward = lin, emb


def _logits(model, ids: list[int]) -> np.ndarray:
    """The proof's logits: the probe's last COMPARE_LAST positions (all 799 positions of Phi-4-mini's probe
    would be 640 MB per copy, three copies held at once)."""
    import torch
    with torch.no_grad(), fp32_compute():
        out = model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=probes_mod.COMPARE_LAST)
    return out.logits[0, -probes_mod.COMPARE_LAST:].float().numpy()


def merge(model: Source, adapter: Source | None, config: dict, out_dir: Path, *,
          allow_noop: bool = False) -> MergeProof:
    """Write the merged checkpoint to out_dir (complete or absent) and return the proof."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype_name = _dtype_name(config)
    dtype = getattr(torch, dtype_name)
    probe = probes_mod.make(model.path, None)[0].ids
    log.info("loading %s (%s)", model.ref, dtype_name)
    base = AutoModelForCausalLM.from_pretrained(model.path, dtype=dtype, low_cpu_mem_usage=True)
    base.eval()
    proof = MergeProof(adapter=adapter.ref if adapter else None, dtype=dtype_name, max_abs_vs_peft=None,
                       max_abs_vs_base=None, tolerance=None, top1_vs_peft=None)
    if adapter is not None:
        from peft import PeftModel
        wrapped = PeftModel.from_pretrained(base, adapter.path, is_trainable=False)
        wrapped.eval()
        l_peft = _logits(wrapped, probe)
        with wrapped.disable_adapter():
            l_base = _logits(wrapped, probe)
        # In place: from_pretrained memory-maps the base's safetensors (privately: the files are never written,
        # tests/test_merge.py), and a merged copy of every adapted matrix beside the mapped originals doubled
        # the stage's resident memory (18.9 GB at 3.8B). safe_merge's NaN check is the proof's finite check.
        merged = wrapped.merge_and_unload(safe_merge=False)
        l_merged = _logits(merged, probe)
        abs_tol, rel_tol = MERGE_TOLERANCE.get(dtype_name, MERGE_TOLERANCE["float32"])
        tol = abs_tol + rel_tol * float(np.abs(l_peft).max())
        proof.max_abs_vs_peft = float(np.abs(l_merged - l_peft).max())
        proof.max_abs_vs_base = float(np.abs(l_merged - l_base).max())
        proof.tolerance = tol
        proof.top1_vs_peft = float((l_merged.argmax(-1) == l_peft.argmax(-1)).mean())
        if not np.isfinite(l_merged).all():
            raise MergeProofError(f"the merged model's logits are not finite (NaN or inf): the merge of "
                                  f"{adapter.ref} overflowed {dtype_name}; report it with its adapter_config.json")
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
    _save(model_out, model, out_dir)
    del model_out
    return proof


def _save(model_obj, model: Source, out_dir: Path) -> None:
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model_obj.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
    for name in PASSTHROUGH:
        src = model.path / name
        if src.exists():
            shutil.copy2(src, tmp / name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def reference(merged_dir: Path, config: dict, out_file: Path) -> None:
    """PyTorch reference for every probe: last-N logits, greedy tokens and their margins, saved as .npz."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, _dtype_name(config))
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype, low_cpu_mem_usage=True)
    model.eval()
    arrays: dict[str, np.ndarray] = {}
    for p in probes_mod.make(merged_dir, probes_mod.switch_point(config)):
        log.info("reference logits: %s probe, %d tokens", p.name, p.n)
        with torch.no_grad(), fp32_compute():
            out = model(input_ids=torch.tensor([p.ids]), use_cache=False, logits_to_keep=probes_mod.COMPARE_LAST)
        arrays[f"{p.name}_ids"] = np.array(p.ids, dtype=np.int32)
        arrays[f"{p.name}_logits"] = out.logits[0, -probes_mod.COMPARE_LAST:].float().numpy()
        if p.name == "short":
            tokens, margins = _greedy(model, p.ids, GREEDY_TOKENS, _eos_ids(merged_dir))
            arrays["short_greedy"] = np.array(tokens, dtype=np.int32)
            arrays["short_greedy_margins"] = np.array(margins, dtype=np.float32)
    from .bundle import save_npz
    tmp = out_file.with_name(out_file.name + ".partial.npz")
    save_npz(tmp, arrays)
    tmp.rename(out_file)


def _greedy(model, ids: list[int], n: int, eos: list[int]) -> tuple[list[int], list[float]]:
    """PyTorch greedy continuation (stop token excluded) and, at each of its steps, the margin between the
    chosen token's logit and the runner-up's: where that margin is within a precision's logit tolerance,
    an artifact of that precision may take the other token without being wrong (parity.token_agreement)."""
    import torch
    with torch.no_grad(), fp32_compute():
        ids_t = torch.tensor([ids])
        gen = model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos or None, pad_token_id=(eos or [0])[0],
                             output_logits=True, return_dict_in_generate=True)
    toks = gen.sequences[0, len(ids):].tolist()
    keep = next((i for i, t in enumerate(toks) if t in eos), len(toks))
    margins = [float(d[0] - d[1]) for d in (torch.topk(step[0].float(), 2).values for step in gen.logits[:keep])]
    return toks[:keep], margins


def greedy(merged_dir: Path, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of the merged checkpoint for a prompt (the smoke RAG reference), with their margins."""
    import torch
    from transformers import AutoModelForCausalLM
    config = json.loads((merged_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=getattr(torch, _dtype_name(config)))
    model.eval()
    return _greedy(model, ids, n, _eos_ids(merged_dir))


def _eos_ids(model_dir: Path) -> list[int]:
    """Stop tokens: generation_config's eos ids plus the template's end-of-turn token."""
    ids: list[int] = []
    gc = model_dir / "generation_config.json"
    if gc.exists():
        e = json.loads(gc.read_text()).get("eos_token_id")
        ids += e if isinstance(e, list) else ([e] if e is not None else [])
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    from .chat import END_TOKENS
    for t in END_TOKENS:
        i = tok.token_to_id(t)
        if i is not None and i not in ids:
            ids.append(i)
    return ids


def proof_dict(p: MergeProof) -> dict:
    return asdict(p)
