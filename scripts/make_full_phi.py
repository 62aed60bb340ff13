#!/usr/bin/env python3
"""A full-size Phi-4-mini-shaped checkpoint for benchmarks: the published configuration, random weights.

The cost of merging, exporting and running does not depend on the weights' values, so this stands in for
microsoft/Phi-4-mini-instruct where the Hub cannot be reached: 3.8 B parameters in bf16 (config from
scripts/phi4-mini-instruct.config.json), two safetensors shards with the published tensor names and no
`lm_head.weight` (tied), a byte-level BPE tokenizer with o200k's split regex whose vocabulary has the real
size, the Phi-4 chat template, and a rank-16 LoRA adapter on every linear module.

Weights are written one tensor at a time (peak memory ≈ one shard), never as a whole model in memory.

Usage: python scripts/make_full_phi.py OUT_DIR [--config PATH] [--layers N]
  --layers N: fewer layers, same widths (to try the pipeline quickly)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_tiny_phi import CHAT_TEMPLATE, O200K_SPLIT, SPECIALS  # noqa: E402

DEFAULT_CONFIG = HERE / "phi4-mini-instruct.config.json"
SHARD_BYTES = 5 * 2**30
LORA_RANK = 16
LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.qkv_proj.weight", (qkv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_up_proj.weight", (2 * inter, h)), (p + "mlp.down_proj.weight", (h, inter)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    return out


def _bf16(rng: np.random.Generator, shape: tuple[int, ...], std: float, ones: bool = False) -> np.ndarray:
    """Random bf16 as uint16 bit patterns (numpy has no bfloat16): the top half of float32."""
    x = np.ones(shape, np.float32) if ones else rng.standard_normal(shape, dtype=np.float32) * std
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def write_weights(cfg: dict, out: Path, seed: int = 0) -> int:
    """Shards of at most SHARD_BYTES written with safetensors' own layout, plus the index. Returns #params."""
    rng = np.random.default_rng(seed)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(cfg):
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for k, names in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in names:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shape in names:
                f.write(_bf16(rng, shape, cfg["initializer_range"], ones=len(shape) == 1).tobytes())
                weight_map[name] = fname
                total += int(np.prod(shape))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=2))
    return total


def write_tokenizer(cfg: dict, out: Path) -> None:
    """A valid byte-level BPE with the real vocabulary size: 256 byte tokens, merges of existing pairs up to
    the size, then Phi-4's special tokens at the top (ids below vocab_size, as the padded 200,064)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    byte_tokens = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(sorted(byte_tokens))}
    merges: list[tuple[str, str]] = []
    n_target = cfg["vocab_size"] - 64 - len(SPECIALS)          # leave padding like the real vocabulary
    base = sorted(byte_tokens)
    tokens = list(vocab)
    i = 0
    while len(vocab) < n_target:
        a, b = base[i % len(base)], tokens[(i * 7919) % len(tokens)]
        i += 1
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            tokens.append(a + b)
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_bos_token": False,
        "model_max_length": cfg["max_position_embeddings"], "chat_template": CHAT_TEMPLATE}, indent=2))
    ids = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<|end|>")}
    cfg.update(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|end|>"])
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"]}, indent=2))


def write_adapter(cfg: dict, out: Path, seed: int = 1) -> None:
    """Rank-16 LoRA (fp32, PEFT layout) on every linear module, non-zero B."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    shapes = dict(tensor_shapes(cfg))
    tensors = {}
    for name, shape in shapes.items():
        module = name.rsplit(".", 1)[0]
        if module.split(".")[-1] not in LORA_TARGETS:
            continue
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((LORA_RANK, shape[1])) * 0.01).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((shape[0], LORA_RANK)) * 0.001).astype(np.float32)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "microsoft/Phi-4-mini-instruct",
        "r": LORA_RANK, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": list(LORA_TARGETS),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True}, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--layers", type=int, default=None)
    args = ap.parse_args()
    if (args.out / ".complete").exists():
        print(f"{args.out} is complete; nothing to do")
        return 0
    cfg = json.loads(args.config.read_text())
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    write_tokenizer(cfg, tmp / "model")
    n = write_weights(cfg, tmp / "model")
    (tmp / "model" / "config.json").write_text(json.dumps(cfg, indent=2))
    write_adapter(cfg, tmp / "adapter")
    (tmp / ".complete").write_text(json.dumps({"parameters": n}) + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(f"{args.out}: {n / 1e9:.3f} B parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
