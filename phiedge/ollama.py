"""Ollama's Modelfile beside each GGUF artifact of a bundle (`ollama create NAME -f Modelfile`).

For a model with Phi-4-mini's chat template the Modelfile carries TEMPLATE, the same template in Ollama's Go
text/template syntax (tools included: Ollama passes a request's tools as `.Tools`, rendered into the system turn
between <|tool|> and <|/tool|> as Phi-4-mini's template does with a system message's "tools"). For any other
template it leaves TEMPLATE out: Ollama then maps the GGUF's own tokenizer.chat_template to one it knows.

Equivalence is tested by rendering PHI_TEMPLATE with Go's own text/template (with Ollama's `json` function)
against Hugging Face's rendering of the same conversations (tests/test_tools.py). Device-path module.
"""
from __future__ import annotations

import json

from . import chat

MODELFILE = "Modelfile"
NUM_CTX = 4096
STOP = "<|end|>"

# Ollama's template (Go text/template, Ollama's `json` func). Tools go into the first system turn; with no system
# message, into an empty one (Hugging Face's template renders a system message's "tools" only, so the same
# conversation there has a system message whose content is "").
PHI_TEMPLATE = (
    '{{- if and .Tools (or (not .Messages) (ne (index .Messages 0).Role "system")) }}'
    '<|system|><|tool|>[{{ range $i, $t := .Tools }}{{ if $i }},{{ end }}{{ json $t.Function }}{{ end }}]'
    '<|/tool|><|end|>{{ end }}'
    '{{- range $i, $m := .Messages }}'
    '{{- if and (eq $m.Role "system") $.Tools (eq $i 0) }}'
    '<|system|>{{ $m.Content }}<|tool|>[{{ range $j, $t := $.Tools }}{{ if $j }},{{ end }}{{ json $t.Function }}'
    '{{ end }}]<|/tool|><|end|>'
    '{{- else }}<|{{ $m.Role }}|>{{ $m.Content }}<|end|>'
    '{{- end }}'
    '{{- end }}<|assistant|>'
)


def phi_render(messages: list[dict], tools: list[dict] | None) -> str:
    """What PHI_TEMPLATE renders, in Python: detects a model whose own template is Phi-4-mini's (is_phi)."""
    text, spec = "", _tools_json(tools or [])
    if tools and (not messages or messages[0]["role"] != "system"):
        text += f"<|system|><|tool|>{spec}<|/tool|><|end|>"
    for i, m in enumerate(messages):
        if m["role"] == "system" and tools and i == 0:
            text += f"<|system|>{m['content']}<|tool|>{spec}<|/tool|><|end|>"
        else:
            text += f"<|{m['role']}|>{m['content']}<|end|>"
    return text + "<|assistant|>"


def hf_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The same conversation as Hugging Face's Phi-4-mini template takes it: the tools as a JSON string on the
    first system message (an empty one when there is none), in the compact form Ollama's `json` writes."""
    if not tools:
        return [dict(m) for m in messages]
    spec = _tools_json(tools)
    msgs = [dict(m) for m in messages]
    if not msgs or msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": ""})
    msgs[0]["tools"] = spec
    return msgs


def _tools_json(tools: list[dict]) -> str:
    """The tools as PHI_TEMPLATE writes them: Ollama's `json` (compact) of each function, joined by commas."""
    return "[" + ",".join(json.dumps(t, separators=(",", ":")) for t in tools) + "]"


SAMPLE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
          {"role": "assistant", "content": "Cold."}, {"role": "user", "content": "And in Lima?"}]
SAMPLE_TOOLS = [{"name": "get_weather", "description": "Weather in a city.",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def is_phi(template: str, specials: dict) -> bool:
    """Whether a chat template renders conversations, with and without tools, as PHI_TEMPLATE does."""
    try:
        return all(chat.render(template, hf_messages(SAMPLE, t), specials) == phi_render(SAMPLE, t)
                   for t in (None, SAMPLE_TOOLS))
    except Exception:                   # a template that cannot take the sample is not Phi-4-mini's
        return False


def modelfile(gguf: str, *, phi: bool, n_ctx: int | None = None, adapter: str | None = None,
              switch: int | None = None, own_template: bool = False) -> str:
    """A Modelfile for `gguf` (a path relative to the Modelfile's folder), with `adapter` (llama.cpp LoRA file,
    relative too) applied by Ollama when given. `phi`: the template the model runs with is Phi-4-mini's (the
    adapter's own, `own_template`, when it carries one). `switch`: the model's LongRoPE switch (None: none)."""
    ctx = min(NUM_CTX, n_ctx or NUM_CTX, switch or NUM_CTX)
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM {gguf}"]
    if adapter:
        lines += ["# The adapter kept separate, applied by Ollama at load. Recent Ollama versions load a GGUF LoRA",
                  "# adapter without error and ignore it or apply it wrongly (not exercised here); the merged",
                  "# artifacts of a --adapter-mode both bundle are the ones to ship to Ollama.",
                  f"ADAPTER {adapter}"]
    if phi:
        lines += ["# Phi-4-mini's chat template in Ollama's syntax, tools in the system turn between <|tool|> and",
                  "# <|/tool|> (rendered text checked against Hugging Face's template by phiedge's tests).",
                  f'TEMPLATE """{PHI_TEMPLATE}"""']
    elif adapter and own_template:
        lines += ["# No TEMPLATE: the adapter's own chat template (adapters/<name>/) is not Phi-4-mini's, and Ollama",
                  "# would prompt it with the base GGUF's: ship a merged artifact (--adapter-mode both) to Ollama."]
    else:
        lines += ["# No TEMPLATE: Ollama maps the GGUF's own chat template (tokenizer.chat_template) to one it knows."]
    lines += [f'PARAMETER stop "{STOP}"'] if phi else []
    if switch:
        lines += [f"# num_ctx at most {switch}: llama.cpp picks LongRoPE's factors from the context size, not from the",
                  "# prompt's length, so a larger num_ctx would run every short prompt with the long factors (the",
                  f"# model was checked with the short ones below {switch} positions and the long ones past them)."]
    else:
        lines += ["# num_ctx: the target's context size, at most 4096."]
    lines += [f"PARAMETER num_ctx {ctx}"]
    return "\n".join(lines) + "\n"


def modelfiles(results, *, phi: dict, own: frozenset = frozenset(), n_ctx: int | None = None,
               switch: int | None = None) -> dict[str, str]:
    """{path in the bundle: text} for every GGUF artifact (phiedge.checks.ArtifactResult): `<folder>/Modelfile`
    for a merged one (or one without adapter), `<folder>/Modelfile.<adapter>` with ADAPTER for a base artifact
    with an adapter kept separate. `phi`: by adapter name (None: the base), whether the template that variant
    runs with is Phi-4-mini's; `own`: the adapters whose own template it is (phiedge.tokenizer_files)."""
    import posixpath
    out = {}
    for r in results:
        if r.artifact.format != "gguf":
            continue
        gguf = "./" + next(f for f in r.artifact.files if f.endswith(".gguf"))
        if r.adapter_files is None:
            out[f"{r.name}/{MODELFILE}"] = modelfile(gguf, phi=phi[r.adapter], n_ctx=n_ctx, switch=switch)
        else:
            lora = next(f for f in r.adapter_files.files if f.endswith(".gguf"))
            rel = posixpath.relpath(f"{r.adapter_path}/{lora}", r.name)
            out[f"{r.name}/{MODELFILE}.{r.adapter}"] = modelfile(gguf, phi=phi[r.adapter], n_ctx=n_ctx, adapter=rel,
                                                                 switch=switch, own_template=r.adapter in own)
    return out
