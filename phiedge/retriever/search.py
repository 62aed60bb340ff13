"""Device-side search: ONNX query embedding + FAISS (dense) + SQLite FTS5 bm25 (keyword), fused by RRF.

Imports only numpy, sqlite3, tokenizers, onnxruntime and faiss. Never torch / transformers /
sentence-transformers (a test proves it).
"""
from __future__ import annotations

import logging
import re
import sqlite3
from pathlib import Path
from typing import Any

from ..errors import RetrieverError, UsageError
from .embed import OnnxEmbedder
from .store import EMBEDDER_DIR, FAISS_FILE, FORMAT, FORMAT_VERSION, connect_ro, import_faiss, read_meta
from .types import MODES, Hit

log = logging.getLogger(__name__)

RRF_K = 60  # the usual constant of reciprocal rank fusion (Cormack et al. 2009)
CANDIDATES = 50  # how deep each list goes before fusion

# Very common English words: dropped from keyword queries (when something else is left), so a question
# like "how long is the context window?" does not make bm25 score every chunk that contains "the".
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
how i if in into is it its itself just me more most my no nor not of off on once only or other our ours out
over own same she should so some such than that the their theirs them then there these they this those through
to too under until up very was we were what when where which while who whom why will with would you your yours
""".split())
_TERM = re.compile(r"\w+", re.UNICODE)


# Large indexes: query terms found in more than 1/DF_FRACTION of the chunks are dropped from the keyword query
# (their IDF is low, and scoring every chunk that contains them costs ~0.5 us per posting in FTS5).
DF_FILTER_MIN_CHUNKS = 5_000
DF_FRACTION = 50
DF_MIN_CAP = 200


def query_terms(question: str) -> list[str]:
    """Distinct words of a question (case-insensitive), stopwords dropped unless nothing else is left."""
    terms = _TERM.findall(question)
    content = [t for t in terms if t.lower() not in STOPWORDS] or terms
    seen: dict[str, str] = {}
    for t in content:
        seen.setdefault(t.lower(), t)
    return list(seen.values())


def quote(term: str) -> str:
    """One FTS5 string token: no FTS5 operator or column syntax can get through."""
    return '"' + term.replace('"', '""') + '"'


class Retriever:
    """A built retriever folder, opened for search. Use `Retriever.open(folder)`."""

    def __init__(self, folder: Path, con: sqlite3.Connection, meta: dict[str, Any], index: Any,
                 embedder: OnnxEmbedder):
        self.folder = folder
        self.con = con
        self.meta = meta
        self.index = index
        self.embedder = embedder

    @classmethod
    def open(cls, folder: str | Path, *, threads: int | None = 1) -> "Retriever":
        """Open a retriever folder. `threads`: CPU threads for the query embedder and FAISS (None = all)."""
        faiss = import_faiss()

        folder = Path(folder)
        if not folder.is_dir():
            raise RetrieverError(f"retriever folder {folder} does not exist: build it with "
                                 f"`phiedge index DOCS --out {folder}`")
        con = connect_ro(folder)
        meta = read_meta(con)
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise RetrieverError(f"{folder} has retriever format {meta.get('format')!r} v{meta.get('format_version')}, "
                                 f"this phiedge reads v{FORMAT_VERSION}: rebuild it with `phiedge index`")
        if not (folder / FAISS_FILE).is_file():
            raise RetrieverError(f"{folder / FAISS_FILE} is missing: rebuild the retriever with `phiedge index`")
        try:
            index = faiss.read_index(str(folder / FAISS_FILE))
        except RuntimeError as e:
            raise RetrieverError(f"{folder / FAISS_FILE} is unreadable ({str(e).splitlines()[0][:100]}): the folder is "
                                 f"corrupt; rebuild it with `phiedge index`") from None
        if threads:
            faiss.omp_set_num_threads(threads)
        spec = meta.get("faiss", {})
        if spec.get("type") == "IndexHNSWFlat":
            index.hnsw.efSearch = int(spec.get("efSearch", 64))
        if index.ntotal != meta.get("n_chunks"):
            raise RetrieverError(f"{folder}: FAISS has {index.ntotal} vectors, database has {meta.get('n_chunks')} "
                                 f"chunks: the folder is corrupt; rebuild it with `phiedge index`")
        embedder = OnnxEmbedder(folder / EMBEDDER_DIR, threads=threads)
        if embedder.dim != index.d:
            raise RetrieverError(f"{folder}: embedder dim {embedder.dim} != index dim {index.d}: rebuild it")
        return cls(folder, con, meta, index, embedder)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.index.ntotal)

    # -- ranked id lists ------------------------------------------------------------------------------------
    def dense_ids(self, query: str, n: int) -> list[tuple[int, float]]:
        if n <= 0 or self.index.ntotal == 0:
            return []
        q = self.embedder.embed_query(query).reshape(1, -1)
        scores, ids = self.index.search(q, min(n, self.index.ntotal))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def keyword_expr(self, query: str) -> str | None:
        """The FTS5 expression for `query`. On large indexes, terms in more than 1/50 of the chunks are dropped;
        if every term is that common, the terms are ANDed instead of ORed."""
        terms = query_terms(query)
        if not terms:
            return None
        n_chunks = len(self)
        if n_chunks < DF_FILTER_MIN_CHUNKS:
            return " OR ".join(quote(t) for t in terms)
        cap = max(DF_MIN_CAP, n_chunks // DF_FRACTION)
        rare = [t for t in terms if self._df(t, cap) < cap]
        if rare:
            return " OR ".join(quote(t) for t in rare)
        return " AND ".join(quote(t) for t in terms)

    def _df(self, term: str, cap: int) -> int:
        """How many chunks contain `term`, counting no further than `cap`."""
        row = self.con.execute("SELECT count(*) FROM (SELECT 1 FROM chunks_fts WHERE chunks_fts MATCH ? LIMIT ?)",
                               (quote(term), cap)).fetchone()
        return int(row[0])

    def keyword_ids(self, query: str, n: int) -> list[tuple[int, float]]:
        expr = self.keyword_expr(query)
        if expr is None or n <= 0:
            return []
        rows = self.con.execute(
            "SELECT rowid, bm25(chunks_fts, 2.0, 1.0) AS s FROM chunks_fts WHERE chunks_fts MATCH ? "
            "ORDER BY s LIMIT ?", (expr, n)).fetchall()
        return [(int(r), -float(s)) for r, s in rows]

    def ranked_ids(self, query: str, k: int, mode: str = "hybrid") -> list[tuple[int, float]]:
        if mode not in MODES:
            raise UsageError(f"unknown search mode {mode!r}: pass one of {', '.join(MODES)} to --mode")
        if k < 1:
            raise UsageError(f"k must be at least 1, got {k}: pass -k 1 or more")
        if mode == "dense":
            return self.dense_ids(query, k)
        if mode == "keyword":
            return self.keyword_ids(query, k)
        depth = max(k, CANDIDATES)
        fused: dict[int, float] = {}
        for ranked in (self.dense_ids(query, depth), self.keyword_ids(query, depth)):
            for rank, (cid, _) in enumerate(ranked):
                fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + rank + 1)
        return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]

    # -- public -----------------------------------------------------------------------------------------------
    def search(self, query: str, k: int = 3, mode: str = "hybrid") -> list[Hit]:
        """The top `k` chunks for `query`, best first. `mode`: dense, keyword or hybrid (RRF of both)."""
        ranked = self.ranked_ids(query, k, mode)
        if not ranked:
            return []
        rows = self.fetch([cid for cid, _ in ranked])
        return [Hit(chunk_id=cid, text=rows[cid][2], source=rows[cid][0], heading=rows[cid][1], score=score)
                for cid, score in ranked if cid in rows]

    def fetch(self, ids: list[int]) -> dict[int, tuple[str, str | None, str]]:
        """(source, heading, text) by chunk id."""
        marks = ",".join("?" * len(ids))
        return {r[0]: (r[1], r[2], r[3]) for r in
                self.con.execute(f"SELECT id, source, heading, text FROM chunks WHERE id IN ({marks})", ids)}


def search(folder: str | Path, query: str, k: int = 3, mode: str = "hybrid") -> list[Hit]:
    """One-shot search (opens and closes the retriever)."""
    with Retriever.open(folder) as r:
        return r.search(query, k=k, mode=mode)

