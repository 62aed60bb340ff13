"""`phiedge chat`: a conversation with an opened bundle in the terminal, one turn per line.

Answers stream as they are generated, their sources follow each; /reset, /adapter NAME, /sources, /help and
/quit steer it. Read from a pipe it answers each line in turn (no prompt is shown), so it can be scripted:

    printf 'What does the with statement do?\\n/adapter legal\\nAnd the pass statement?\\n' | phiedge chat bundle/

A turn that fails (a question past the device's context, an unknown adapter) prints its one-line error and the
conversation goes on; the command then exits non-zero at the end.
Device-path module: no heavy imports.
"""
from __future__ import annotations

from typing import Callable, Iterable

from .errors import PhiedgeError, UsageError

HELP = ("/reset forget the conversation · /adapter NAME answer with another adapter · /sources the last answer's "
        "chunks · /quit")


def converse(session, lines: Iterable[str], say: Callable[..., None], *, prompt: Callable[[], None] | None = None,
             system: str | None = None, **options) -> int:
    """Hold a conversation on `session` (phiedge.open) from `lines`; `say(text, nl=True, err=False)` writes;
    `prompt()` shows the prompt before each line (interactive only); `options` go to Session.chat. The number of
    turns that failed."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    last = None
    failed = 0
    if prompt:
        prompt()
    for line in lines:
        line = line.strip()
        try:
            if not line:
                pass
            elif line in ("/quit", "/exit"):
                break
            elif line == "/reset":
                history, last = history[:1] if system else [], None
                say("(conversation reset)", err=True)
            elif line == "/help":
                say(HELP, err=True)
            elif line == "/sources":
                for i, hit in enumerate(last.chunks if last else [], 1):
                    say(f"[{i}] {hit.source}" + (f" — {hit.heading}" if getattr(hit, "heading", None) else "")
                        + f" (score {hit.score:.3f})\n    " + " ".join(hit.text.split())[:400])
                if not (last and last.chunks):
                    say("(no sources yet)", err=True)
            elif line.startswith("/adapter"):
                name = line[len("/adapter"):].strip()
                if not name:
                    raise UsageError("/adapter needs a name: /adapter NAME")
                session.use_adapter(name)
                say(f"(now answering with {session.label})", err=True)
            elif line.startswith("/"):
                raise UsageError(f"unknown command {line.split()[0]}: {HELP}")
            else:
                turn = [*history, {"role": "user", "content": line}]
                answer = None
                for chunk in session.chat(turn, stream=True, **options):
                    say(chunk.text, nl=False)
                    answer = chunk.answer
                say("")
                if answer.sources:
                    say("sources: " + "; ".join(answer.sources))
                note = f", {answer.dropped_turns} oldest turns left out to fit" if answer.dropped_turns else ""
                say(f"({answer.runtime}: {answer.prompt_tokens} prompt tokens, first token {answer.ttft_s:.2f} s, "
                    f"{answer.decode_tps:.1f} tok/s{note})", err=True)
                history = [*turn, {"role": "assistant", "content": answer.text}]
                last = answer
        except PhiedgeError as e:
            failed += 1
            say(f"error: {e}", err=True)
        if prompt:
            prompt()
    return failed

