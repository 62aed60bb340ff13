"""Split documents into chunks counted in tokens of the embedder's own tokenizer.

Chunk text is always a slice of the original document (located by whitespace-separated words and the
tokenizer's character offsets), never decoded word-pieces: decoding lowercases and splits identifiers.
A chunk never cuts inside a word, unless a single word is longer than a whole chunk.
Chunks never cross a section (heading) boundary, so each chunk has exactly one heading.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .ingest import Document

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

DEFAULT_CHUNK_TOKENS = 200
DEFAULT_OVERLAP = 40

_WORD = re.compile(r"\S+")
_SENTENCE_END = re.compile(r"[.!?:;][\"')\]]*$")


@dataclass(frozen=True)
class Chunk:
    source: str
    heading: str | None
    text: str
    start: int  # character offsets into the document text
    end: int
    n_tokens: int

    def embed_text(self) -> str:
        """What the embedder sees: the chunk, prefixed with its heading when the chunk does not start with it."""
        return embed_text(self.heading, self.text)


def embed_text(heading: str | None, text: str) -> str:
    if heading and heading not in text[: len(heading) + 16]:
        return f"{heading}\n{text}"
    return text


def plain_tokenizer(tokenizer: "Tokenizer") -> "Tokenizer":
    """A copy of the tokenizer with truncation and padding switched off (for counting tokens)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


def chunk_document(doc: Document, tokenizer: "Tokenizer", chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                   overlap: int = DEFAULT_OVERLAP) -> list[Chunk]:
    """Chunks of one document. `tokenizer` must not truncate (see `plain_tokenizer`)."""
    if chunk_tokens < 8:
        raise ValueError(f"chunk_tokens must be at least 8, got {chunk_tokens}")
    if not 0 <= overlap < chunk_tokens:
        raise ValueError(f"overlap must be in [0, chunk_tokens), got {overlap}")
    sections = doc.sections or [(0, None)]
    bounds = [s for s, _ in sections[1:]] + [len(doc.text)]
    chunks: list[Chunk] = []
    carry: int | None = None  # start of a heading-only section, merged into the next section
    for k, ((start, heading), end) in enumerate(zip(sections, bounds)):
        body = doc.text[start:end].strip()
        first, _, rest = body.partition("\n")
        heading_only = not body or (heading is not None and not rest.strip() and heading in first)
        if k + 1 < len(sections) and heading_only:
            # only a heading line (e.g. "# Chapter" right before "## Section"): no chunk of its own
            carry = start if carry is None else carry
            continue
        span_start = start if carry is None else carry
        carry = None
        chunks.extend(_chunk_span(doc, span_start, end, heading, tokenizer, chunk_tokens, overlap))
    return chunks


@dataclass
class _Unit:
    start: int  # offsets relative to the segment
    end: int
    n_tokens: int
    breaks_after: bool  # a good place to end a chunk (sentence end or paragraph break)


def _units(seg: str, tokenizer: "Tokenizer", chunk_tokens: int) -> list[_Unit]:
    words = [(m.start(), m.end()) for m in _WORD.finditer(seg)]
    if not words:
        return []
    enc = tokenizer.encode(seg, add_special_tokens=False)
    starts = [w[0] for w in words]
    tok_by_word: list[list[tuple[int, int]]] = [[] for _ in words]
    for (a, b) in enc.offsets:
        if b <= a:
            continue
        i = bisect.bisect_right(starts, a) - 1
        if i >= 0:
            tok_by_word[i].append((a, b))
    units: list[_Unit] = []
    for wi, ((a, b), toks) in enumerate(zip(words, tok_by_word)):
        nxt = words[wi + 1][0] if wi + 1 < len(words) else len(seg)
        para = "\n\n" in seg[b:nxt] or "\n" in seg[b:nxt] and _SENTENCE_END.search(seg[a:b]) is not None
        brk = para or _SENTENCE_END.search(seg[a:b]) is not None
        if len(toks) <= chunk_tokens:
            units.append(_Unit(a, b, len(toks), brk))
            continue
        # A "word" longer than a whole chunk (a URL, a base64 blob): cut it between tokens.
        for k in range(0, len(toks), chunk_tokens):
            piece = toks[k:k + chunk_tokens]
            last = k + chunk_tokens >= len(toks)
            units.append(_Unit(a if k == 0 else piece[0][0], b if last else piece[-1][1], len(piece), brk and last))
    return units


def _chunk_span(doc: Document, s: int, e: int, heading: str | None, tokenizer: "Tokenizer",
                chunk_tokens: int, overlap: int) -> list[Chunk]:
    seg = doc.text[s:e]
    units = _units(seg, tokenizer, chunk_tokens)
    out: list[Chunk] = []
    i, n = 0, len(units)
    while i < n:
        total, j = 0, i
        while j < n and total + units[j].n_tokens <= chunk_tokens:
            total += units[j].n_tokens
            j += 1
        if j < n:
            # Ended on the size limit: prefer to end at a sentence or paragraph break in the last 40%.
            acc = total
            for k in range(j - 1, i, -1):
                if acc < 0.6 * chunk_tokens:
                    break
                if units[k].breaks_after:
                    total = sum(u.n_tokens for u in units[i:k + 1])
                    j = k + 1
                    break
                acc -= units[k].n_tokens
        a, b = units[i].start, units[j - 1].end
        if total > 0:
            out.append(Chunk(doc.path, heading, seg[a:b], s + a, s + b, total))
        if j >= n:
            break
        # Next chunk starts `overlap` tokens back, at a word boundary, always moving forward.
        back, nxt = 0, j
        while nxt - 1 > i and back + units[nxt - 1].n_tokens <= overlap:
            back += units[nxt - 1].n_tokens
            nxt -= 1
        i = max(nxt, i + 1)
    return out
