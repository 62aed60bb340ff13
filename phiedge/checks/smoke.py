"""The smoke RAG question's reference: retrieval, prompt and PyTorch's greedy answer. Build time only."""
from __future__ import annotations

import json
from pathlib import Path

from .reference import greedy


def smoke_reference(merged_dir: Path, retriever_dir: Path, out_file: Path, *, question: str | None,
                    needle: str | None, fact: str | None, n_tokens: int) -> None:
    """Retrieve for the smoke question, build the RAG prompt, and record PyTorch's greedy answer to it (in a
    child process: the model is gone when this returns). A fact the fine-tuned model's own answer lacks is bad
    input (UsageError)."""
    from .. import rag
    from ..errors import UsageError
    from ..memory import isolated
    from ..retriever import Retriever
    from .judge import states
    with Retriever.open(retriever_dir) as r:
        if not question:
            question, needle = _default_question(r)
        hits = r.search(question, k=3)
    ids = rag.prompt_ids(merged_dir, rag.messages(question, hits))
    tokens, margins = isolated(greedy, merged_dir, ids, n_tokens)
    needle = needle or question
    answer = rag.detokenize(merged_dir, tokens)
    if fact and not states(answer, fact):
        raise UsageError(f"the fine-tuned model's own answer to the smoke question does not contain "
                         f"{fact!r}: pass a --smoke-answer it gives, or a --smoke-question it answers")
    out_file.write_text(json.dumps({
        "question": question, "needle": needle, "fact": fact, "prompt_ids": ids, "reference_tokens": tokens,
        "reference_margins": [round(m, 5) for m in margins], "reference_answer": answer,
        "retrieved": [{"source": h.source, "chunk_id": h.chunk_id} for h in hits],
        "retrieved_has_needle": any(needle.lower() in h.text.lower() for h in hits)}, indent=1))


def _default_question(r) -> tuple[str, str]:
    """No --smoke-question: ask for the opening sentence of the corpus's first chunk; that chunk must come back."""
    first = r.fetch([0]).get(0)                    # (source, heading, text)
    text = first[2] if first else ""
    sentence = text.strip().split("\n")[0].split(". ")[0][:160]
    return f"What does the documentation say about: {sentence}?", sentence
