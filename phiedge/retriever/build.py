"""Build (or incrementally update) a retriever folder. Build time only.

The new retriever is written into a temporary folder beside `out_dir` and renamed into place when complete,
so an interrupted build never leaves something that looks like a finished retriever.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputExistsError, RetrieverError, UsageError
from .chunk import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP, Chunk, chunk_document, plain_tokenizer
from .embed import CONFIG_FILE, TOKENIZER_FILE, OnnxEmbedder
from .ingest import SkipFile, list_files, load_document, no_documents_message, read_bytes, sha256
from .store import (
    DB_FILE,
    EMBEDDER_DIR,
    FAISS_FILE,
    FORMAT_VERSION,
    HNSW_THRESHOLD,
    FileRecord,
    StoredChunk,
    connect_ro,
    fsync_tree,
    read_chunks_by_source,
    read_files,
    read_meta,
    read_vectors,
    write_store,
)
from .types import IndexResult, SkippedFile

log = logging.getLogger(__name__)

MANIFEST_FILE = "retriever.json"
VERIFY_SAMPLE = 64


@dataclass
class _Previous:
    meta: dict[str, Any]
    files: dict[str, FileRecord]
    chunks: dict[str, list[tuple[int, StoredChunk]]]
    vectors: np.ndarray
    compatible: bool
    reason: str | None


def build_index(docs_dir: str | os.PathLike, out_dir: str | os.PathLike, *, embedder: str | os.PathLike | None = None,
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS, overlap: int = DEFAULT_OVERLAP, batch_size: int = 32,
                hnsw_threshold: int = HNSW_THRESHOLD, verify_sample: int = VERIFY_SAMPLE,
                threads: int | None = None, follow_links: bool = False) -> IndexResult:
    """Index every .md/.txt/.html/.pdf file under `docs_dir` into the retriever folder `out_dir`.

    If `out_dir` already holds a retriever built with the same embedder and chunk settings, only files whose
    content hash changed are chunked and embedded again; deleted files leave the index.
    `embedder`: None (the packaged all-MiniLM-L6-v2), a sentence-transformers folder, or a Hub id.
    Symbolic links out of `docs_dir` are skipped (and listed in `skipped`) unless `follow_links`.
    Every file of the folder is a function of the documents and settings only (no build time inside), so two
    builds of the same documents are byte-identical.
    Raises RetrieverError (bad docs folder, zero chunks, failed ONNX proof), UsageError (bad settings),
    OutputExistsError (`out_dir` is a non-empty folder that is not a retriever).
    """
    t0 = time.perf_counter()
    job = _Index(Path(docs_dir), Path(out_dir), embedder, chunk_tokens, overlap, batch_size, verify_sample, threads)
    job.scan(follow_links)
    if job.up_to_date():
        log.info("%s is up to date (%d files, %d chunks)", job.out, job.result.n_files, job.result.n_chunks)
    else:
        job.write(hnsw_threshold)
        log.info("indexed %d files into %d chunks in %s (%s): %s", job.result.n_files, job.result.n_chunks, job.out,
                 job.result.faiss_index, job.result.counts())
    job.result.seconds = time.perf_counter() - t0
    return job.result


class _Index:
    """One (re)build of a retriever folder, step by step: check, scan, reuse or embed, write."""

    def __init__(self, docs: Path, out: Path, embedder, chunk_tokens: int, overlap: int, batch_size: int,
                 verify_sample: int, threads: int | None):
        from .export import resolve_embedder
        _check_settings(chunk_tokens, overlap, batch_size, verify_sample)
        if not docs.exists():
            raise RetrieverError(f"docs folder {docs} does not exist: pass a folder of .md/.txt/.html/.pdf files")
        if not docs.is_dir():
            raise RetrieverError(f"{docs} is a file, not a folder: pass the folder that holds it")
        _recover_interrupted_swap(out)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / DB_FILE).is_file())):
            raise OutputExistsError(f"output {out} exists and is not a retriever: choose another --out or remove it")
        self.docs, self.out, self.src = docs, out, resolve_embedder(embedder)
        self.chunk_tokens, self.overlap, self.batch_size = chunk_tokens, overlap, batch_size
        self.verify_sample, self.threads = verify_sample, threads
        _check_chunk_fits(self.src.path, chunk_tokens)
        self.settings = {"chunk_tokens": chunk_tokens, "overlap": overlap,
                         "embedder_fingerprint": self.src.fingerprint, "format_version": FORMAT_VERSION}
        self.prev = _load_previous(out, self.settings)
        self.reused: dict[str, FileRecord] = {}
        self.todo: list[tuple[str, str, int, Any]] = []      # (rel path, sha256, size, Document)
        self.result = IndexResult(out_dir=str(out), n_files=0, n_chunks=0,
                                  rebuilt_reason=self.prev.reason if self.prev else None)

    def scan(self, follow_links: bool) -> None:
        """Which files are unchanged (their chunks and vectors are reused), which are read anew, which skipped."""
        files, skipped = list_files(self.docs, follow_links=follow_links)
        self.result.skipped = list(skipped)
        prev = self.prev
        out_in_docs = self.out.resolve() if _inside(self.out, self.docs) else None  # never index our own output
        for p in files:
            rel = p.relative_to(self.docs).as_posix()
            if out_in_docs is not None and out_in_docs in p.resolve().parents:
                continue
            try:
                data = read_bytes(p)
                digest = sha256(data)
                old = prev.files.get(rel) if prev else None
                if old is not None and prev.compatible and old.sha256 == digest:
                    self.reused[rel] = old
                    self.result.unchanged.append(rel)
                    continue
                doc = load_document(p, rel, data)
            except SkipFile as e:
                self.result.skipped.append(SkippedFile(rel, str(e)))
                continue
            self.todo.append((rel, digest, len(data), doc))
        for s in self.result.skipped:
            log.warning("skipped %s: %s", s.path, s.reason)
        if not self.todo and not self.reused:
            raise RetrieverError(no_documents_message(self.docs, self.result.skipped))

    def up_to_date(self) -> bool:
        """Nothing changed: the folder is left as it is (no rewrite, no FAISS rebuild)."""
        prev, r = self.prev, self.result
        if prev is None or not prev.compatible or self.todo or set(self.reused) != set(prev.files) or \
                sorted((s.path, s.reason) for s in r.skipped) != \
                sorted((s["path"], s["reason"]) for s in prev.meta.get("skipped", [])):
            return False
        r.n_files = len(self.reused)
        r.n_chunks = int(prev.meta.get("n_chunks", len(prev.vectors)))
        r.faiss_index = prev.meta.get("faiss", {}).get("type", "")
        r.onnx_min_cosine = prev.meta.get("onnx_min_cosine")
        return True

    def write(self, hnsw_threshold: int) -> None:
        """The new retriever in a temporary folder beside `out`, renamed into place when complete."""
        out = self.out
        tmp = out.parent / f".{out.name}.building-{os.getpid()}"
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            cfg, st_model, proof = self._embedder(tmp / EMBEDDER_DIR)
            new_chunks = self._chunk(tmp / EMBEDDER_DIR)
            new_vecs, proof = self._embed(tmp / EMBEDDER_DIR, cfg, new_chunks, st_model, proof)
            chunks, vectors, records = self._assemble(new_chunks, new_vecs)
            self.result.n_files, self.result.n_chunks = len(records), len(chunks)
            self.result.onnx_min_cosine = proof[0]
            meta = {"settings": self.settings, "chunk_tokens": self.chunk_tokens, "overlap": self.overlap,
                    "embedder": {k: cfg[k] for k in ("source", "fingerprint", "dim", "max_seq_length", "pooling",
                                                     "normalize")},
                    "onnx_min_cosine": proof[0], "onnx_verified_on": proof[1], "n_files": len(records),
                    "skipped": [{"path": s.path, "reason": s.reason} for s in self.result.skipped],
                    "last_update": self.result.counts()}
            spec = write_store(tmp, chunks, vectors, records, meta, hnsw_threshold=hnsw_threshold)
            self.result.faiss_index = spec["type"]
            manifest = dict(meta, faiss=spec, n_chunks=len(chunks), files={
                DB_FILE: "chunks, files, FTS5, meta", FAISS_FILE: "vectors", EMBEDDER_DIR: "ONNX embedder"})
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            fsync_tree(tmp)
            _swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _embedder(self, emb_dir: Path) -> tuple[dict, Any, tuple]:
        """(embedder config, the sentence-transformers model when exported anew, (min cosine, verified on)):
        the previous build's ONNX embedder when compatible, else a fresh export."""
        prev = self.prev
        if prev is not None and prev.compatible and (self.out / EMBEDDER_DIR / CONFIG_FILE).is_file():
            shutil.copytree(self.out / EMBEDDER_DIR, emb_dir, copy_function=_link_or_copy)
            cfg = json.loads((emb_dir / CONFIG_FILE).read_text())
            proof = (prev.meta.get("onnx_min_cosine"), prev.meta.get("onnx_verified_on", 0))
            st_model = None
        elif self.todo:
            from .export import export_onnx, load_sentence_transformer
            st_model = load_sentence_transformer(self.src)
            cfg, proof = export_onnx(st_model, self.src, emb_dir), (None, 0)
        else:  # pragma: no cover - reused files imply a compatible previous build
            raise RetrieverError("internal: nothing to embed and no previous embedder")
        max_tokens = int(cfg["max_seq_length"]) - 2
        if self.chunk_tokens > max_tokens:
            raise UsageError(f"--chunk-tokens {self.chunk_tokens} is more than the embedder reads ({max_tokens} "
                             f"tokens after special tokens): pass --chunk-tokens "
                             f"{min(DEFAULT_CHUNK_TOKENS, max_tokens)}")
        return cfg, st_model, proof

    def _chunk(self, emb_dir: Path) -> dict[str, list[Chunk]]:
        """Chunks of the new and changed files; what was added, changed, removed."""
        prev, r = self.prev, self.result
        new_chunks: dict[str, list[Chunk]] = {}
        if self.todo:
            from tokenizers import Tokenizer
            tok = plain_tokenizer(Tokenizer.from_file(str(emb_dir / TOKENIZER_FILE)))
            for rel, _, _, doc in self.todo:
                cs = chunk_document(doc, tok, self.chunk_tokens, self.overlap)
                if not cs:
                    r.skipped.append(SkippedFile(rel, "no words to index"))
                    log.warning("skipped %s: no words to index", rel)
                    continue
                new_chunks[rel] = cs
                (r.changed if prev is not None and rel in prev.files else r.added).append(rel)
        if prev is not None:
            r.removed = sorted(set(prev.files) - (set(self.reused) | set(new_chunks)))
        if not new_chunks and not self.reused:
            raise RetrieverError(no_documents_message(self.docs, r.skipped))
        return new_chunks

    def _embed(self, emb_dir: Path, cfg: dict, new_chunks: dict, st_model, proof: tuple) -> tuple[np.ndarray, tuple]:
        """The new chunks' vectors from the ONNX embedder (the one the device uses), proven against
        sentence-transformers on a sample when the embedder was exported anew."""
        flat = [c for rel in sorted(new_chunks) for c in new_chunks[rel]]
        vecs = np.zeros((0, int(cfg["dim"])), dtype=np.float32)
        if flat:
            t1 = time.perf_counter()
            texts = [c.embed_text() for c in flat]
            vecs = OnnxEmbedder(emb_dir, threads=self.threads).embed(texts, batch_size=self.batch_size)
            log.info("embedded %d chunks in %.1fs", len(texts), time.perf_counter() - t1)
            if st_model is not None:
                from .export import verify_onnx
                sample = _sample(len(texts), self.verify_sample)
                proof = (verify_onnx(st_model, vecs[sample], [texts[i] for i in sample], self.batch_size), len(sample))
                log.info("ONNX embedder matches sentence-transformers: min cosine %.6f on %d chunks", *proof)
        self.result.n_embedded = len(flat)
        return vecs, proof

    def _assemble(self, new_chunks: dict, new_vecs: np.ndarray) -> tuple[list, np.ndarray, list]:
        """All chunks in source order: reused (with their stored vectors) and new."""
        chunks: list[StoredChunk] = []
        parts: list[np.ndarray] = []
        records: list[FileRecord] = []
        offsets, pos = {}, 0
        for rel in sorted(new_chunks):
            offsets[rel], pos = pos, pos + len(new_chunks[rel])
        facts = {rel: (digest, size) for rel, digest, size, _ in self.todo}
        for rel in sorted(set(self.reused) | set(new_chunks)):
            if rel in self.reused:
                rows = self.prev.chunks.get(rel, [])
                chunks.extend(c for _, c in rows)
                parts.append(self.prev.vectors[[i for i, _ in rows]])
                records.append(self.reused[rel])
            else:
                cs = new_chunks[rel]
                chunks.extend(StoredChunk(c.source, c.heading, c.text, c.start, c.end, c.n_tokens) for c in cs)
                parts.append(new_vecs[offsets[rel]:offsets[rel] + len(cs)])
                records.append(FileRecord(rel, *facts[rel], len(cs)))
        return chunks, np.concatenate(parts).astype(np.float32, copy=False), records


def _check_settings(chunk_tokens: int, overlap: int, batch_size: int, verify_sample: int) -> None:
    if chunk_tokens < 16:
        raise UsageError(f"--chunk-tokens {chunk_tokens} is too small: pass 16 or more (default "
                         f"{DEFAULT_CHUNK_TOKENS})")
    if overlap < 0 or overlap >= chunk_tokens:
        raise UsageError(f"--overlap {overlap} must be in [0, --chunk-tokens): pass e.g. --overlap {chunk_tokens // 5}")
    if batch_size < 1 or verify_sample < 1:
        raise UsageError("batch size and verify sample must be at least 1")


def _check_chunk_fits(model_dir: Path, chunk_tokens: int) -> None:
    """Fail before any work if chunks would be longer than the embedder reads (when its config says)."""
    cfg = model_dir / "sentence_bert_config.json"
    try:
        max_len = int(json.loads(cfg.read_text()).get("max_seq_length") or 0)
    except (OSError, ValueError, AttributeError):
        return
    if max_len and chunk_tokens > max_len - 2:
        raise UsageError(f"--chunk-tokens {chunk_tokens} is more than the embedder reads ({max_len - 2} tokens "
                         f"after special tokens): pass --chunk-tokens {min(DEFAULT_CHUNK_TOKENS, max_len - 2)}")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _sample(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def _load_previous(out: Path, settings: dict[str, Any]) -> _Previous | None:
    if not (out / DB_FILE).is_file():
        return None
    try:
        con = connect_ro(out)
        try:
            meta = read_meta(con)
            files = read_files(con)
            chunks = read_chunks_by_source(con)
        finally:
            con.close()
        vectors = read_vectors(out)
    except Exception as e:  # a corrupt previous build is rebuilt, not fatal
        log.warning("previous retriever in %s is unreadable (%s): rebuilding everything", out, e)
        return None
    old = meta.get("settings", {})
    diff = [k for k in settings if old.get(k) != settings[k]]
    if not diff and len(vectors) != sum(len(v) for v in chunks.values()):
        diff = ["vector count"]
    if not diff and not (out / EMBEDDER_DIR / CONFIG_FILE).is_file():
        diff = ["embedder folder"]
    reason = f"settings changed ({', '.join(diff)}): re-embedding everything" if diff else None
    if reason:
        log.info("%s: %s", out, reason)
    return _Previous(meta, files, chunks, vectors, not diff, reason)


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _remove_stale(out: Path) -> None:
    """Remove temp folders of earlier builds of `out` that were interrupted (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.building-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        log.info("removing %s left by an interrupted build", p)
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _recover_interrupted_swap(out: Path) -> None:
    """If a build died between its two renames, put the previous retriever back."""
    if out.exists() or not out.parent.is_dir():
        return
    olds = sorted(out.parent.glob(f".{out.name}.old-*"))
    if olds and (olds[-1] / DB_FILE).is_file():
        log.warning("restoring %s from %s (an earlier build was interrupted)", out, olds[-1])
        os.rename(olds[-1], out)


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
