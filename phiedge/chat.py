"""The prompt every runtime sees: the model's own chat template, rendered once, the same way everywhere.

Device-path module: jinja2 and json only.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidCheckpointError, UsageError

# End-of-turn token texts across chat templates (Phi-4, ChatML, Llama 3, GPT-style): generation stops on any
# that the vocabulary has as a single token, besides the configured eos ids.
END_TOKENS = ("<|end|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")
# The files a chat template and its special tokens are read from (load_template).
TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja")


def load_template(model_dir: Path) -> tuple[str, dict]:
    """(chat template, special tokens) from a Hugging Face model or artifact folder."""
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    tpl = cfg.get("chat_template")
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.exists():
        tpl = jinja_file.read_text()
    if isinstance(tpl, list):  # named templates: take "default"
        tpl = next((t["template"] for t in tpl if t.get("name") == "default"), tpl[0]["template"])
    if not tpl:
        raise InvalidCheckpointError(f"{model_dir} has no chat template (tokenizer_config.json or "
                                     f"chat_template.jinja): copy it from the base model")
    specials = {k: _tok_str(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return tpl, specials


def _tok_str(v) -> str:
    if isinstance(v, dict):
        return v.get("content", "")
    return v or ""


@lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render(template: str, messages: list[dict], specials: dict | None = None,
           add_generation_prompt: bool = True) -> str:
    """The prompt text. Tools on a message (phiedge.tools.messages) are also passed as the standard `tools`
    variable; a template that renders neither form is refused rather than silently dropping them."""
    from .tools import tools_of
    tools = tools_of(messages)
    text = _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                      **({"tools": tools} if tools else {}), **(specials or {}))
    if tools and not all(t.get("name", "") in text for t in tools):
        raise UsageError("this model's chat template does not render tools (neither a system message's "
                         "\"tools\" as Phi-4-mini's does, nor the `tools` variable): ask without --tools, or use a "
                         "model whose template takes them")
    return text
