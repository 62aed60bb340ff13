"""On-disk layout of a retriever folder, and writing it.

    retriever.sqlite   chunks, files (content hashes), metadata, FTS5 keyword index over chunks
    vectors.faiss      FAISS index; vector i belongs to chunk id i (ids are 0..n-1)
    embedder/          ONNX embedder (model.onnx, tokenizer.json, embedder.json)

Vectors live only in the FAISS file (IndexFlatIP and IndexHNSWFlat both keep them exactly and can give them
back with `reconstruct_n`), which is how an incremental build reuses the vectors of unchanged files.
Imports here are device-safe (sqlite3, numpy, faiss lazily).
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import RetrieverError

log = logging.getLogger(__name__)

DB_FILE = "retriever.sqlite"
FAISS_FILE = "vectors.faiss"
EMBEDDER_DIR = "embedder"
FORMAT = "phiedge-retriever"
FORMAT_VERSION = 1
HNSW_THRESHOLD = 20_000  # chunks; below it exact search (IndexFlatIP) is both exact and fast enough
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 96
FTS_TOKENIZE = "porter unicode61 remove_diacritics 2"

SCHEMA = f"""
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files(path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, n_chunks INTEGER NOT NULL);
CREATE TABLE chunks(
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, heading TEXT, text TEXT NOT NULL,
    char_start INTEGER NOT NULL, char_end INTEGER NOT NULL, n_tokens INTEGER NOT NULL);
CREATE INDEX chunks_source ON chunks(source);
CREATE VIRTUAL TABLE chunks_fts USING fts5(heading, text, content='chunks', content_rowid='id',
    tokenize='{FTS_TOKENIZE}');
"""


@dataclass(frozen=True)
class StoredChunk:
    source: str
    heading: str | None
    text: str
    start: int
    end: int
    n_tokens: int


@dataclass(frozen=True)
class FileRecord:
    path: str
    sha256: str
    size: int
    n_chunks: int


def import_faiss():  # noqa: ANN201 - the faiss module
    """faiss, without its loader's INFO lines about which CPU build it picked."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def choose_faiss(n: int, hnsw_threshold: int = HNSW_THRESHOLD) -> dict[str, Any]:
    if n >= hnsw_threshold:
        return {"type": "IndexHNSWFlat", "metric": "inner_product", "M": HNSW_M,
                "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH, "threshold": hnsw_threshold}
    return {"type": "IndexFlatIP", "metric": "inner_product", "threshold": hnsw_threshold}


def build_faiss(vectors: np.ndarray, spec: dict[str, Any]) -> Any:
    faiss = import_faiss()

    d = vectors.shape[1]
    if spec["type"] == "IndexFlatIP":
        index = faiss.IndexFlatIP(d)
    elif spec["type"] == "IndexHNSWFlat":
        index = faiss.IndexHNSWFlat(d, spec["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec["efConstruction"]
        index.hnsw.efSearch = spec["efSearch"]
    else:  # pragma: no cover
        raise RetrieverError(f"unknown FAISS index type {spec['type']!r}")
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def write_store(folder: Path, chunks: Sequence[StoredChunk], vectors: np.ndarray, files: Iterable[FileRecord],
                meta: dict[str, Any], *, hnsw_threshold: int = HNSW_THRESHOLD) -> dict[str, Any]:
    """Write retriever.sqlite and vectors.faiss into `folder` (which must not hold them yet).

    Returns the FAISS spec that was chosen; it is also recorded in meta under "faiss".
    """
    faiss = import_faiss()

    if len(chunks) != len(vectors):
        raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
    spec = choose_faiss(len(chunks), hnsw_threshold)
    index = build_faiss(vectors, spec)
    faiss.write_index(index, str(folder / FAISS_FILE))
    meta = dict(meta, faiss=spec, n_chunks=len(chunks), dim=int(vectors.shape[1]), format=FORMAT,
                format_version=FORMAT_VERSION, fts_tokenize=FTS_TOKENIZE)
    con = sqlite3.connect(folder / DB_FILE)
    try:
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.executescript(SCHEMA)
        with con:
            con.executemany("INSERT INTO chunks(id, source, heading, text, char_start, char_end, n_tokens) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)",
                            ((i, c.source, c.heading, c.text, c.start, c.end, c.n_tokens)
                             for i, c in enumerate(chunks)))
            con.executemany("INSERT INTO files(path, sha256, size, n_chunks) VALUES (?, ?, ?, ?)",
                            ((f.path, f.sha256, f.size, f.n_chunks) for f in files))
            con.execute("INSERT INTO chunks_fts(chunks_fts) VALUES('rebuild')")
            con.execute("INSERT INTO chunks_fts(chunks_fts) VALUES('optimize')")
            con.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                            ((k, json.dumps(v)) for k, v in sorted(meta.items())))
    finally:
        con.close()
    return spec


def connect_ro(folder: Path) -> sqlite3.Connection:
    db = folder / DB_FILE
    if not db.is_file():
        raise RetrieverError(f"{folder} is not a retriever (no {DB_FILE}): build one with `phiedge index DOCS --out "
                             f"{folder}`")
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False)
        con.execute("SELECT 1 FROM meta LIMIT 1")
    except sqlite3.DatabaseError as e:
        raise RetrieverError(f"{db} is not a readable retriever database ({e}): rebuild it with `phiedge index`") from None
    return con


def read_meta(con: sqlite3.Connection) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}


def read_files(con: sqlite3.Connection) -> dict[str, FileRecord]:
    return {r[0]: FileRecord(*r) for r in con.execute("SELECT path, sha256, size, n_chunks FROM files")}


def read_chunks_by_source(con: sqlite3.Connection) -> dict[str, list[tuple[int, StoredChunk]]]:
    out: dict[str, list[tuple[int, StoredChunk]]] = {}
    for row in con.execute("SELECT id, source, heading, text, char_start, char_end, n_tokens FROM chunks ORDER BY id"):
        out.setdefault(row[1], []).append((row[0], StoredChunk(*row[1:])))
    return out


def read_vectors(folder: Path) -> np.ndarray:
    faiss = import_faiss()

    index = faiss.read_index(str(folder / FAISS_FILE))
    if index.ntotal == 0:
        return np.zeros((0, index.d), dtype=np.float32)
    return index.reconstruct_n(0, index.ntotal)


def fsync_tree(folder: Path) -> None:
    """Flush every file of `folder` to disk before it is renamed into place."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
