"""The probe prompts every artifact is checked on: one per LongRoPE regime, the same token ids everywhere.

LongRoPE switches factor sets when the sequence grows past `original_max_position_embeddings` (4096 for
Phi-4-mini). The short probe stays well below it; the long probe is a single prefill past it. Both are
chat-formatted so the template and special tokens are exercised too.

The long regime has two measurements (`span`). RoPE attention depends on position differences only, so the
long probe's last LONG_SPAN tokens prefilled alone *at their own positions* (past the switch) run the long
factors, the attention scaling and the LM head on the same rows at ~1/16 of a 4200-token prefill. Runtimes
that take position ids (PyTorch, OpenVINO, MLX) or choose factors by context size (llama.cpp) can run it;
onnxruntime-genai switches on the attention-mask width and needs the real prompt. Only a real long prefill
catches a chunked or split prefill, or an error that grows with the distance between tokens (fp16 inverse
frequencies: tests/test_openvino.py), so every build runs one per format (phiedge.build: the format's first
precision; its precisions share one export's rope) and the span for the rest. Text comes from Python's own
documentation (always present, no download), so probes are identical on every machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from .. import chat

COMPARE_LAST = 64            # positions compared per regime (the last N of each prompt)
LONG_MARGIN = 104            # the long probe ends this many tokens past the switch point
LONG_SPAN = 256              # tokens of the long probe's span: COMPARE_LAST rows after 192 of context
SHORT_QUESTION = "What does the with statement do in Python? Answer in one sentence."


@dataclass(frozen=True)
class Probe:
    name: str                 # "short" | "long"
    ids: list[int]
    start: int = 0            # the position of ids[0]: 0 for a whole prompt

    @property
    def n(self) -> int:
        return len(self.ids)


def span(long: Probe) -> Probe:
    """The long probe's last LONG_SPAN tokens at their own positions (see the module docstring)."""
    cut = max(0, long.n - LONG_SPAN)
    return Probe(long.name, long.ids[cut:], long.start + cut)


def _doc_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def _encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def make(model_dir: Path, switch_at: int | None) -> list[Probe]:
    """Short probe always; long probe (switch_at + LONG_MARGIN tokens) when the model has LongRoPE."""
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    template, specials = chat.load_template(model_dir)
    doc = _doc_text()
    context = doc[doc.find("The \"with\" statement"):][:700]
    short_text = chat.render(template, [
        {"role": "system", "content": "You are a helpful assistant. Use the context.\n" + context},
        {"role": "user", "content": SHORT_QUESTION}], specials)
    probes = [Probe("short", _encode(tok, short_text))]
    if switch_at:
        target = switch_at + LONG_MARGIN
        head = _encode(tok, chat.render(template, [{"role": "user", "content": "Summarise:\n"}], specials,
                                        add_generation_prompt=False))
        body = _encode(tok, doc)
        while len(body) < target:
            body = body + body
        tail = _encode(tok, chat.render(template, [{"role": "user", "content": "Done."}], specials))
        ids = head + body[: target - len(head) - len(tail)] + tail
        probes.append(Probe("long", ids))
    return probes


def switch_point(config: dict) -> int | None:
    """The LongRoPE switch (original_max_position_embeddings), or None if the model has no LongRoPE."""
    rs = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = str(rs.get("type") or rs.get("rope_type") or "").lower()
    if kind not in ("longrope", "su"):
        return None
    return int(config.get("original_max_position_embeddings") or rs.get("original_max_position_embeddings"))
