#!/usr/bin/env python3
"""Build a tiny Phi-4-mini-shaped model and LoRA adapters, entirely offline.

The model carries every feature of Phi-4-mini that converters get wrong:
Phi3ForCausalLM, GQA 3:1, head_dim 64, partial rotary 0.75, LongRoPE with *distinct* short and long
factor lists switching at 4096 positions, tied input/output embeddings, a byte-level BPE tokenizer with
o200k's split regex (llama.cpp's `gpt-4o` pre-tokenizer) trained on Python's own documentation, and the
Phi-4 chat template. It is trained for a few minutes so its next-token distributions are peaked and top-1
agreement between runtimes means something, then briefly on synthetic tool-call conversations in Phi-4-mini's
format (tool_conversations) so its function calls are deterministic.

Two folders hold the same weights, saved the two ways users' checkpoints come:
  model/            as transformers 5 saves it: config.json with nested `rope_parameters` and `dtype`, the
                    tokenizer through `PreTrainedTokenizerFast.save_pretrained` ("tokenizer_class":
                    "TokenizersBackend", the template in chat_template.jinja)
  model-published/  in the layout of Phi-4-mini-instruct's published files (transformers 4.45): top-level
                    rope settings, `rope_scaling` with `type`, `torch_dtype`, "tokenizer_class":
                    "GPT2Tokenizer" with the template inside tokenizer_config.json

Adapters (all with non-zero B, on qkv_proj, o_proj, gate_up_proj, down_proj):
  lora/      plain LoRA r=8
  rslora/    rsLoRA with rank_pattern / alpha_pattern
  dora/      DoRA
  noop/      LoRA with B = 0 (changes nothing: the merge proof must refuse it)
lora/ and rslora/ also hold the tokenizer saved beside them as TRL does: lora's the base's own, rslora's with a
template that opens every conversation with a fixed system turn (ACME_SYSTEM).

Beside them, model-random/: the same shape, config and tokenizer, randomly initialised (transformers' own
initialisation, seed RANDOM_SEED) and never trained. It has no preference for well-formed text, so it is the
model that proves a constraint (`ask --json-schema`) holds by itself (tests/test_schemas.py).

Usage: python scripts/make_tiny_phi.py OUT_DIR [--steps N]
Writes OUT_DIR/model, OUT_DIR/model-published, OUT_DIR/adapters/<kind>, then OUT_DIR/.complete holding
FIXTURE_VERSION (the directory is built under a temporary name and renamed, so an interrupted run never looks
complete; tests rebuild a fixture of another version).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
import zlib
from pathlib import Path

# o200k's split regex, as in Phi-4-mini's tokenizer.json (llama.cpp: LLAMA_VOCAB_PRE_TYPE_GPT4O).
O200K_SPLIT = (
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
# Phi-4-mini-instruct's special tokens (ids differ: ours follow the small vocabulary).
SPECIALS = ["<|endoftext|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>",
            "<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

FIXTURE_VERSION = "5"                   # bump when the fixture changes: tests rebuild older ones
RANDOM_SEED = 1234                      # model-random's weights
BPE_VOCAB = 2000 - len(SPECIALS)          # padded to 2048 in the config, as 200,064 is
HIDDEN, HEADS, KV_HEADS, LAYERS, INTERMEDIATE = 768, 12, 4, 2, 1024   # widths are multiples of 256 (K-quants)
TOOL_STEPS = 60                                                         # the tool-call phase
ROTARY_HALF = int(HIDDEN // HEADS * 0.75) // 2                          # 24 factors per list


def corpus() -> list[str]:
    """Python's reference text (always offline), all of it for the tokenizer."""
    from pydoc_data.topics import topics
    return [t for _, t in sorted(topics.items())]


def training_text(texts: list[str], tok, budget: int = 40_000) -> list[int]:
    """A small slice the model can nearly memorise in a few minutes on a CPU: the start of the reference
    text (what the long probe reads) and the `with` statement (the short probe's context). Peaked
    distributions there make top-1 agreement between runtimes a sharp test."""
    ids: list[int] = []
    for t in texts:
        if "The \"with\" statement" in t:
            ids += tok.encode(t).ids
    for t in texts:
        if len(ids) >= budget:
            break
        ids += tok.encode(t).ids
    return ids


def train_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))


def save_tokenizer(model_dir: Path) -> None:
    """The tokenizer as a user of transformers 5 saves one: `PreTrainedTokenizerFast(...).save_pretrained`
    writes "tokenizer_class": "TokenizersBackend" and the chat template as chat_template.jinja."""
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                  model_max_length=131072, clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model_dir)


def write_published(model_dir: Path, out: Path) -> None:
    """The same checkpoint in Phi-4-mini-instruct's published layout: weights hard-linked, config rewritten to
    transformers 4.45's layout, the tokenizer config as Microsoft ships it (GPT2Tokenizer, template inside)."""
    out.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.suffix == ".safetensors":
            os.link(f, out / f.name)
        elif f.name in ("config.json", "generation_config.json", "tokenizer.json"):
            shutil.copy2(f, out / f.name)
    write_published_config(out / "config.json")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, indent=2))


def phi_config(vocab_size: int, bos: int, eos: int):
    from transformers import Phi3Config
    rng = random.Random(7)
    short = [round(1.0 + 0.5 * i / (ROTARY_HALF - 1), 4) for i in range(ROTARY_HALF)]          # 1.0 .. 1.5
    long = [round(1.0 + 40.0 * (i / (ROTARY_HALF - 1)) ** 2 + rng.random() * 0.1, 4) for i in range(ROTARY_HALF)]
    return Phi3Config(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        hidden_act="silu", max_position_embeddings=131072, original_max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=0.75,
        rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long},
        tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos, pad_token_id=bos,
        attention_bias=False, sliding_window=262144, use_cache=True, torch_dtype="float32",
    )


def write_published_config(path: Path) -> None:
    """Rewrite config.json in the layout of Phi-4-mini-instruct's published config (transformers 4.45):
    `rope_scaling` with `type`, top-level rope_theta / partial_rotary_factor, `torch_dtype`. That layout is
    what users download, so it is what every converter must read."""
    cfg = json.loads(path.read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp["rope_theta"]
    cfg["partial_rotary_factor"] = rp["partial_rotary_factor"]
    cfg["original_max_position_embeddings"] = rp["original_max_position_embeddings"]
    cfg["rope_scaling"] = {"long_factor": rp["long_factor"], "short_factor": rp["short_factor"], "type": "longrope"}
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg["transformers_version"] = "4.45.0"
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def train(model, ids: list[int], steps: int, seq: int = 128, batch: int = 16) -> float:
    import torch
    data = torch.tensor(ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    loss_v = float("nan")
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + seq] for s in starts])
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        loss_v = out.loss.item()
        if step % 25 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss_v:.3f}", flush=True)
    model.eval()
    return loss_v


# Synthetic tool-call conversations in Phi-4-mini's format (tools in the system turn between <|tool|> and <|/tool|>,
# the call between <|tool_call|> and <|/tool_call|>): a short second training phase makes the fixture's calls
# deterministic, so every runtime's tool-call smoke has a real call to reproduce.
TOOL_SYSTEM = "You are a helpful assistant with some tools."
CITIES = ["Paris", "London", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Seoul", "Quito", "Perth", "Dakar", "Riga"]
TOOLS = {
    "get_weather": {"name": "get_weather", "description": "Weather in a city.",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    "get_time": {"name": "get_time", "description": "Local time in a city.",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
}
QUESTIONS = {"get_weather": "What is the weather in {city} right now?", "get_time": "What time is it in {city}?"}


def tool_conversations() -> list[str]:
    """Every (tool set, question, city): the tools as one JSON list, the answer as Phi-4-mini writes a call."""
    convs = []
    for tools in (["get_weather"], ["get_time"], ["get_weather", "get_time"], ["get_time", "get_weather"]):
        spec = json.dumps([TOOLS[t] for t in tools])
        for name in tools:
            for city in CITIES:
                call = json.dumps([{"name": name, "arguments": {"city": city}}])
                convs.append(f"<|system|>{TOOL_SYSTEM}<|tool|>{spec}<|/tool|><|end|><|user|>"
                             f"{QUESTIONS[name].format(city=city)}<|end|><|assistant|><|tool_call|>{call}"
                             f"<|/tool_call|><|end|>")
    return convs


def train_tool_calls(model, doc_ids: list[int], tok, steps: int) -> float:
    """Two thirds of each batch whole tool conversations (padding not scored), a third document windows (so the
    documents' distributions stay peaked)."""
    import torch
    convs = [tok.encode(c).ids for c in tool_conversations()]
    seq = max(map(len, convs))
    data = torch.tensor(doc_ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    pad = tok.token_to_id("<|endoftext|>")
    model.train()
    loss_v = float("nan")
    for step in range(steps):
        picks = torch.randint(0, len(convs), (8,), generator=g).tolist()
        x = torch.full((12, seq), pad, dtype=torch.long)
        labels = torch.full((12, seq), -100, dtype=torch.long)
        for row, i in enumerate(picks):
            x[row, :len(convs[i])] = labels[row, :len(convs[i])] = torch.tensor(convs[i])
        for row, s in enumerate(torch.randint(0, len(data) - seq - 1, (4,), generator=g).tolist(), 8):
            x[row] = labels[row] = data[s:s + seq]
        out = model(input_ids=x, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        loss_v = out.loss.item()
        if step % 20 == 0 or step == steps - 1:
            print(f"  tool step {step:4d} loss {loss_v:.3f}", flush=True)
    model.eval()
    return loss_v


def make_adapter(model_dir: Path, out: Path, kind: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    common = dict(target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], lora_dropout=0.0,
                  task_type="CAUSAL_LM")
    cfg = {
        "lora": LoraConfig(r=8, lora_alpha=16, **common),
        "rslora": LoraConfig(r=8, lora_alpha=16, use_rslora=True,
                             rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 32}, **common),
        "dora": LoraConfig(r=8, lora_alpha=16, use_dora=True, **common),
        "noop": LoraConfig(r=8, lora_alpha=16, **common),
    }[kind]
    peft_model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(zlib.crc32(kind.encode()))   # not hash(): salted per process
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.zeros_like(p) if kind == "noop" else torch.randn(p.shape, generator=g) * 0.02)
            elif "lora_magnitude" in name:
                p.mul_(1.0 + 0.05 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out)
    # Adapters from the Hub name their base; ours names the tiny model's (a local path is what users see).
    cfg_path = out / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = "phiedge/tiny-phi4-mini"
    cfg_path.write_text(json.dumps(data, indent=2))
    if kind in ADAPTER_TEMPLATES:
        save_adapter_tokenizer(model_dir, out, ADAPTER_TEMPLATES[kind])


# The tokenizer saved beside an adapter, as TRL and PEFT's examples do (`tokenizer.save_pretrained(output_dir)`):
# lora's is the base's own (it changes nothing); rslora's was trained with a fixed system turn before the
# conversation (its template wins over the base's, phiedge.tokenizer_files).
ACME_SYSTEM = "<|system|>You are a support agent for ACME.<|end|>"
ADAPTER_TEMPLATES = {"lora": None, "rslora": "{{ '" + ACME_SYSTEM + "' }}" + CHAT_TEMPLATE}


def save_adapter_tokenizer(model_dir: Path, out: Path, template: str | None) -> None:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(out)


def save_random(config, model_dir: Path, out: Path) -> None:
    """The untrained model: the trained one's config and tokenizer, weights as transformers initialises them."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(RANDOM_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for f in model_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, out / f.name)


def build(out: Path, steps: int) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model_dir = out / "model"
    model_dir.mkdir(parents=True)
    texts = corpus()
    t0 = time.time()
    train_tokenizer(texts, model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    n_tok = tok.get_vocab_size()
    vocab = int(math.ceil(n_tok / 64) * 64)  # padded, as Phi-4-mini's 200,064
    bos, eos = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|end|>")
    config = phi_config(vocab, bos, eos)
    config.architectures = ["Phi3ForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    print(f"tokenizer: {n_tok} tokens (config vocab {vocab}); model: {sum(p.numel() for p in model.parameters())/1e6:.1f} M params")
    doc_ids = training_text(texts, tok)
    loss = train(model, doc_ids, steps)
    tool_loss = train_tool_calls(model, doc_ids, tok, TOOL_STEPS)
    model.save_pretrained(model_dir, safe_serialization=True)
    GenerationConfig(bos_token_id=bos, eos_token_id=[eos, bos], pad_token_id=bos).save_pretrained(model_dir)
    save_tokenizer(model_dir)
    write_published(model_dir, out / "model-published")
    save_random(config, model_dir, out / "model-random")
    for kind in ("lora", "rslora", "dora", "noop"):
        make_adapter(model_dir, out / "adapters" / kind, kind)
    (out / "fixture.json").write_text(json.dumps({"final_loss": loss, "steps": steps, "tool_loss": tool_loss,
                                                  "seconds": round(time.time() - t0, 1)}, indent=2))
    print(f"built in {time.time() - t0:.0f} s, final loss {loss:.3f}")


def is_current(out: Path) -> bool:
    marker = out / ".complete"
    return marker.exists() and marker.read_text().strip() == FIXTURE_VERSION


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=int(os.environ.get("PHIEDGE_TINY_STEPS", "150")))
    args = ap.parse_args()
    if is_current(args.out):
        print(f"{args.out} is complete; nothing to do")
        return 0
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp, args.steps)
    (tmp / ".complete").write_text(FIXTURE_VERSION + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
