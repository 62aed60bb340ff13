"""The RAG prompt, shared by every runtime: retrieved chunks as numbered sources in the system turn.

Device-path module: no heavy imports.
"""
from __future__ import annotations

from .errors import UsageError

SYSTEM = ("You are a helpful assistant. Answer the question using only the context below. "
          "Be brief.\n\nContext:\n{context}")


def messages(question: str, hits: list) -> list[dict]:
    """Chat messages for `question` with `hits` (objects with .text and .source) as context."""
    return conversation([{"role": "user", "content": question}], hits)


def query(messages: list[dict]) -> str:
    """What a conversation retrieves for: its latest user turn."""
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content") or "")
    raise UsageError("the conversation has no user turn: end it with {\"role\": \"user\", \"content\": ...}")


def conversation(msgs: list[dict], hits: list, tools: list[dict] | None = None) -> list[dict]:
    """The one rule for a conversation with retrieved context: earlier turns kept as given; the context in the
    system turn, after the client's own system message when there is one (else the RAG system turn of `messages`);
    with tools, where `tool_system` puts it, the tools on that system turn as Phi-4-mini's template takes them.
    One user question and no system message give exactly `messages` (or phiedge.tools.messages with tools)."""
    import json
    own = msgs[0] if msgs and msgs[0].get("role") == "system" else None
    if tools is not None:
        system = tool_system(hits)
        head = {"role": "system", "content": f"{own['content']}\n\n{system}" if own else system,
                "tools": json.dumps(tools)}
    else:
        head = {"role": "system", "content": f"{own['content']}\n\nContext:\n{_context(hits)}" if own
                else SYSTEM.format(context=_context(hits))}
    return [head, *(dict(m) for m in (msgs[1:] if own else msgs))]


def trim(msgs: list[dict], fits) -> tuple[list[dict], int]:
    """The conversation within the device's context: while `fits(msgs)` is false, drop the oldest turn -- never the
    system turn, never the latest user turn or what follows it -- and then any turn left leading without the user
    turn before it. (msgs, how many turns were dropped); as given when nothing can go."""
    head = 1 if msgs and msgs[0].get("role") == "system" else 0
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=len(msgs))
    dropped = 0
    while head < last and not fits(msgs):
        msgs = msgs[:head] + msgs[head + 1:]
        last -= 1
        dropped += 1
        while head < last and msgs[head].get("role") != "user":
            msgs = msgs[:head] + msgs[head + 1:]
            last -= 1
            dropped += 1
    return msgs, dropped


def tool_system(hits: list) -> str:
    """The system turn of a question asked with tools: Phi-4-mini's own tool prompt, the retrieved chunks after it."""
    from .tools import SYSTEM as TOOLS
    return TOOLS if not hits else TOOLS + "\n\nContext:\n" + _context(hits)


def _context(hits: list) -> str:
    return "\n\n".join(f"[{i}] ({h.source}) {h.text.strip()}" for i, h in enumerate(hits, 1))


def sources(hits: list) -> list[str]:
    return [f"[{i}] {h.source}" + (f" — {h.heading}" if getattr(h, "heading", None) else "")
            for i, h in enumerate(hits, 1)]


def prompt_ids(model_dir, msgs: list[dict]) -> list[int]:
    """Token ids of the chat prompt with the model's own template and tokenizer.json (no transformers)."""
    from pathlib import Path

    from tokenizers import Tokenizer

    from . import chat
    model_dir = Path(model_dir)
    template, specials = chat.load_template(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tok.encode(chat.render(template, msgs, specials), add_special_tokens=False).ids


def detokenize(model_dir, ids: list[int]) -> str:
    """Text of `ids` with the model's own tokenizer.json, special tokens dropped."""
    from pathlib import Path

    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).decode(ids, skip_special_tokens=True)
