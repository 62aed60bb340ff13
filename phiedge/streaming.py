"""Token ids in, text out as it becomes safe to show: the one incremental decoder every runtime's stream uses.

    pieces = TextPieces(runtime.detokenize, stop=["\\n\\n"])
    for token in runtime.tokens(...):
        show(pieces.add(token))          # "" while a character is incomplete or a stop string may be starting
        if pieces.hit: break             # a stop string appeared: the answer ends before it
    show(pieces.finish())                # the rest; pieces.text is the whole answer

A byte-level BPE splits a multi-byte character over several tokens, and a tokenizer decodes a lone piece of one
as U+FFFD: text is released only once the tokens so far decode without a broken character at their end,
decoding a window (the tokens since the last release, with the ones before it as context, as text-generation
servers do) so the cost per token stays small. The answer is shown as `Session.chat` returns it: leading and
trailing whitespace dropped (so trailing whitespace is held until more text follows it), and never the start of
a stop string that may still complete.

Device-path module: no heavy imports.
"""
from __future__ import annotations

from typing import Callable

BROKEN = "\ufffd"


class TextPieces:
    def __init__(self, detokenize: Callable[[list[int]], str], stop: list[str] | tuple[str, ...] = ()):
        self.detokenize = detokenize
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.hit: str | None = None     # the stop string the answer ended at
        self._raw = ""                  # the decoded text so far (clean: no broken character at its end)
        self._prefix = self._read = 0   # the decode window: ids[_prefix:_read] were released already
        self._sent = 0                  # characters of the visible text released

    def add(self, token: int) -> str:
        """Take one token; the new text that is safe to show (maybe "")."""
        if self.hit is not None:
            return ""
        self.ids.append(token)
        before = self.detokenize(self.ids[self._prefix:self._read])
        after = self.detokenize(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(BROKEN):
            self._raw += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the answer: every token decoded whole (a character cut by the token limit stays U+FFFD)."""
        if self.hit is None:
            self._raw = self.detokenize(self.ids)
        return self._release(final=True)

    @property
    def text(self) -> str:
        """The answer so far as shown: what `add` and `finish` released."""
        return self._visible()[:self._sent]

    def _visible(self) -> str:
        if self.hit is None:
            cuts = [(i, s) for s in self.stop if (i := self._raw.find(s)) >= 0]
            if cuts:
                i, self.hit = min(cuts)
                self._raw = self._raw[:i]
        return self._raw.lstrip()

    def _release(self, final: bool) -> str:
        visible = self._visible()
        end = len(visible.rstrip())
        if not final and self.hit is None:
            end = len(visible[:end - self._held(visible[:end])].rstrip())   # whitespace waits for what follows
        piece = visible[self._sent:end] if end > self._sent else ""
        self._sent += len(piece)
        return piece

    def _held(self, text: str) -> int:
        """How many characters at the end of `text` may be the start of a stop string."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
