"""Embedded retriever shipped in the bundle.

Build time (torch, sentence-transformers): `build_index(docs_dir, out_dir, ...) -> IndexResult`.
Device side (onnxruntime, tokenizers, faiss, sqlite3, numpy only): `Retriever.open(folder).search(q, k, mode)`.

Importing this package never imports torch, transformers or sentence-transformers: `build_index` imports
its build-time modules when called.
"""
from __future__ import annotations

import os

from .chunk import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP
from .search import Retriever
from .types import MODES, Hit, IndexResult, SkippedFile

__all__ = ["MODES", "Hit", "IndexResult", "Retriever", "SkippedFile", "build_index", "evaluate"]


def build_index(docs_dir: str | os.PathLike, out_dir: str | os.PathLike, *, embedder: str | os.PathLike | None = None,
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS, overlap: int = DEFAULT_OVERLAP, **kwargs: object) -> IndexResult:
    """Index `docs_dir` into the retriever folder `out_dir` (incremental when it already holds one).

    See `phiedge.retriever.build.build_index` for the other keyword arguments.
    """
    from .build import build_index as _build

    return _build(docs_dir, out_dir, embedder=embedder, chunk_tokens=chunk_tokens, overlap=overlap,
                  **kwargs)  # type: ignore[arg-type]


def evaluate(retriever: Retriever, qa_path: str | os.PathLike) -> dict:
    """Recall@1/3/5 and MRR per mode for a JSONL file of {"question", "needle"} lines."""
    from .evaluation import evaluate as _evaluate
    from .evaluation import load_qa

    return _evaluate(retriever, load_qa(qa_path))
