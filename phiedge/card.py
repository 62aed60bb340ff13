"""The Hugging Face model card of a bundle (its README.md) and of each per-format repository `phiedge push
--per-artifact` makes: YAML front matter (base_model, base_model_relation, library_name, tags) and a body with the
parity table (phiedge.report.markdown_table) and how to run each artifact on its runtime.

    base_model_id(model, config, adapter_configs, given)   # the Hub id the card names, or None
    front_matter(rep, rows, per_format=None)               # dict for the YAML header
    render(meta, body) -> str                              # "---\\n<yaml>---\\n\\n<body>"

Device-path module: json only (the YAML is written by hand: flat keys, string lists).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# library_name per format (the Hub's names), and the tags each format's repositories carry.
LIBRARY = {"gguf": "gguf", "onnx": "onnx", "openvino": "openvino", "mlx": "mlx"}
TAGS = {"gguf": ["gguf", "llama.cpp"], "onnx": ["onnx", "onnxruntime-genai"], "openvino": ["openvino", "openvino-genai"],
        "mlx": ["mlx", "mlx-lm"]}
# How each format's artifact runs on its own runtime, once downloaded ({dir}: its folder): an install line, then
# lines a shell runs as they are (tests/test_publish.py runs them on the test bundle).
RUN = {
    "gguf": ["pip install llama-cpp-python",
             "python -c \"from llama_cpp import Llama; m = Llama('{dir}/model.gguf', n_ctx=4096, verbose=False); \\",
             "print(m.create_chat_completion([{{'role': 'user', 'content': 'Hello'}}], max_tokens=32)['choices'][0])\""],
    "onnx": ["pip install onnxruntime-genai",
             "python -c \"import onnxruntime_genai as og; m = og.Model('{dir}'); t = og.Tokenizer(m); p = og.GeneratorParams(m); \\",
             "p.set_search_options(max_length=64); g = og.Generator(m, p); g.append_tokens(t.encode('Hello')); \\",
             "exec('while not g.is_done(): g.generate_next_token()'); print(t.decode(g.get_sequence(0)))\""],
    "openvino": ["pip install openvino-genai",
                 "python -c \"import openvino_genai as ov; p = ov.LLMPipeline('{dir}', 'CPU'); \\",
                 "print(p.generate('Hello', max_new_tokens=32))\""],
    "mlx": ["pip install mlx-lm                        # Apple silicon",
            "mlx_lm.generate --model {dir} --prompt 'Hello' --max-tokens 32"],
}


def base_model_id(model_ref: str, model_dir: Path, adapter_configs: list[dict], given: str | None = None) -> str | None:
    """The Hub id a card names as base_model: --base-model-id, else the --model given as a Hub id, else the
    checkpoint's recorded name (config.json's _name_or_path, when it is a Hub id), else an adapter's
    base_model_name_or_path. None: nothing names it (push then asks for --base-model-id)."""
    if given:
        return given
    candidates = [model_ref if not Path(model_ref).expanduser().exists() else None]
    cfg = Path(model_dir) / "config.json"
    if cfg.exists():
        candidates.append(json.loads(cfg.read_text()).get("_name_or_path"))
    candidates += [a.get("base_model_name_or_path") for a in adapter_configs]
    return next((c for c in candidates if isinstance(c, str) and HUB_ID.match(c)), None)


def relation(rows: list[dict]) -> str | None:
    """How these artifacts relate to base_model: quantized when any is quantized, adapter when all are adapters
    kept separate, finetune when an adapter is merged, none for a full-precision copy of the base itself."""
    if any(not r["full_precision"] for r in rows):
        return "quantized"
    if rows and all(r.get("adapter_path") for r in rows):
        return "adapter"
    if any(r.get("adapter") for r in rows):
        return "finetune"
    return None


def front_matter(rep: dict, rows: list[dict], fmt: str | None = None) -> dict:
    formats = sorted({r["format"] for r in rows})
    meta: dict = {}
    if rep["model"].get("hub_id"):
        meta["base_model"] = rep["model"]["hub_id"]
        rel = relation(rows)
        if rel:
            meta["base_model_relation"] = rel
    one = fmt or (formats[0] if len(formats) == 1 else None)
    meta["library_name"] = LIBRARY[one] if one else "phiedge"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["phiedge"] + [t for f in formats for t in TAGS[f]] + \
        (["lora"] if any(r.get("adapter") for r in rows) else []) + \
        (["function-calling"] if any((r.get("toolcall") or {}).get("held") for r in rows) else [])
    return meta


def render(meta: dict, body: str) -> str:
    """Model card text: YAML front matter (strings quoted as JSON, which YAML reads) then the body."""
    lines = ["---"]
    for k, v in meta.items():
        if isinstance(v, list):
            lines.append(f"{k}:")
            lines += [f"- {json.dumps(x)}" for x in v]
        else:
            lines.append(f"{k}: {json.dumps(v)}")
    return "\n".join(lines + ["---", "", body])


def run_lines(rows: list[dict], root: str = ".") -> list[str]:
    """Markdown: per format, the three lines that run its first artifact from a downloaded copy at `root`."""
    out = []
    for fmt in dict.fromkeys(r["format"] for r in rows):
        first = next(r for r in rows if r["format"] == fmt)
        out += [f"**{fmt}** (`{first['path']}/`)", "", "```"] + \
            [line.format(dir=f"{root}/{first['path']}") for line in RUN[fmt]] + ["```", ""]
    return out
