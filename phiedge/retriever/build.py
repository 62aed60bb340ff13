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
from .store import (DB_FILE, EMBEDDER_DIR, FAISS_FILE, FORMAT_VERSION, HNSW_THRESHOLD, FileRecord, StoredChunk,
                    connect_ro, fsync_tree, read_chunks_by_source, read_files, read_meta, read_vectors, write_store)
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
    from .export import resolve_embedder

    docs = Path(docs_dir)
    out = Path(out_dir)
    _check_settings(chunk_tokens, overlap, batch_size, verify_sample)
    if not docs.exists():
        raise RetrieverError(f"docs folder {docs} does not exist: pass a folder of .md/.txt/.html/.pdf files")
    if not docs.is_dir():
        raise RetrieverError(f"{docs} is a file, not a folder: pass the folder that holds it")
    _recover_interrupted_swap(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / DB_FILE).is_file())):
        raise OutputExistsError(f"output {out} exists and is not a retriever: choose another --out or remove it")

    src = resolve_embedder(embedder)
    _check_chunk_fits(src.path, chunk_tokens)
    settings = {"chunk_tokens": chunk_tokens, "overlap": overlap, "embedder_fingerprint": src.fingerprint,
                "format_version": FORMAT_VERSION}
    prev = _load_previous(out, settings)

    files, skipped = list_files(docs, follow_links=follow_links)
    out_in_docs = out.resolve() if _inside(out, docs) else None  # never index our own output
    result = IndexResult(out_dir=str(out), n_files=0, n_chunks=0, skipped=list(skipped),
                         rebuilt_reason=prev.reason if prev else None)
    reused: dict[str, FileRecord] = {}
    todo: list[tuple[str, str, int, Any]] = []  # (rel path, sha256, size, Document)
    for p in files:
        rel = p.relative_to(docs).as_posix()
        if out_in_docs is not None and out_in_docs in p.resolve().parents:
            continue
        try:
            data = read_bytes(p)
            digest = sha256(data)
            old = prev.files.get(rel) if prev else None
            if old is not None and prev is not None and prev.compatible and old.sha256 == digest:
                reused[rel] = old
                result.unchanged.append(rel)
                continue
            doc = load_document(p, rel, data)
        except SkipFile as e:
            result.skipped.append(SkippedFile(rel, str(e)))
            continue
        todo.append((rel, digest, len(data), doc))
    for s in result.skipped:
        log.warning("skipped %s: %s", s.path, s.reason)
    if not todo and not reused:
        raise RetrieverError(no_documents_message(docs, result.skipped))

    if prev is not None and prev.compatible and not todo and set(reused) == set(prev.files) and \
            sorted((s.path, s.reason) for s in result.skipped) == \
            sorted((s["path"], s["reason"]) for s in prev.meta.get("skipped", [])):
        # Nothing changed: leave the folder as it is (no rewrite, no FAISS rebuild).
        result.n_files = len(reused)
        result.n_chunks = int(prev.meta.get("n_chunks", len(prev.vectors)))
        result.faiss_index = prev.meta.get("faiss", {}).get("type", "")
        result.onnx_min_cosine = prev.meta.get("onnx_min_cosine")
        result.seconds = time.perf_counter() - t0
        log.info("%s is up to date (%d files, %d chunks)", out, result.n_files, result.n_chunks)
        return result

    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        st_model = None
        emb_dir = tmp / EMBEDDER_DIR
        if prev is not None and prev.compatible and (out / EMBEDDER_DIR / CONFIG_FILE).is_file():
            shutil.copytree(out / EMBEDDER_DIR, emb_dir, copy_function=_link_or_copy)
            embedder_cfg = json.loads((emb_dir / CONFIG_FILE).read_text())
            min_cos = prev.meta.get("onnx_min_cosine")
            verified_on = prev.meta.get("onnx_verified_on", 0)
        elif todo:
            from .export import export_onnx, load_sentence_transformer

            st_model = load_sentence_transformer(src)
            embedder_cfg = export_onnx(st_model, src, emb_dir)
            min_cos, verified_on = None, 0
        else:  # pragma: no cover - reused files imply a compatible previous build
            raise RetrieverError("internal: nothing to embed and no previous embedder")
        max_tokens = int(embedder_cfg["max_seq_length"]) - 2
        if chunk_tokens > max_tokens:
            raise UsageError(f"--chunk-tokens {chunk_tokens} is more than the embedder reads ({max_tokens} tokens "
                             f"after special tokens): pass --chunk-tokens {min(DEFAULT_CHUNK_TOKENS, max_tokens)}")

        # Chunk the new and changed files.
        new_chunks: dict[str, list[Chunk]] = {}
        if todo:
            from tokenizers import Tokenizer

            tok = plain_tokenizer(Tokenizer.from_file(str(emb_dir / TOKENIZER_FILE)))
            for rel, _, _, doc in todo:
                cs = chunk_document(doc, tok, chunk_tokens, overlap)
                if not cs:
                    result.skipped.append(SkippedFile(rel, "no words to index"))
                    log.warning("skipped %s: no words to index", rel)
                    continue
                new_chunks[rel] = cs
                if prev is not None and rel in prev.files:
                    result.changed.append(rel)
                else:
                    result.added.append(rel)
        if prev is not None:
            present = set(reused) | set(new_chunks)
            result.removed = sorted(set(prev.files) - present)
        if not new_chunks and not reused:
            raise RetrieverError(no_documents_message(docs, result.skipped))

        # Embed the new chunks with the ONNX embedder (the one the device uses).
        flat_new = [c for rel in sorted(new_chunks) for c in new_chunks[rel]]
        new_vecs = np.zeros((0, int(embedder_cfg["dim"])), dtype=np.float32)
        if flat_new:
            t1 = time.perf_counter()
            onnx = OnnxEmbedder(emb_dir, threads=threads)
            texts = [c.embed_text() for c in flat_new]
            new_vecs = onnx.embed(texts, batch_size=batch_size)
            log.info("embedded %d chunks in %.1fs", len(texts), time.perf_counter() - t1)
            if st_model is not None:
                from .export import verify_onnx

                sample = _sample(len(texts), verify_sample)
                min_cos = verify_onnx(st_model, new_vecs[sample], [texts[i] for i in sample], batch_size)
                verified_on = len(sample)
                log.info("ONNX embedder matches sentence-transformers: min cosine %.6f on %d chunks",
                         min_cos, verified_on)
        result.n_embedded = len(flat_new)

        # Assemble all chunks in source order: reused (with their stored vectors) and new.
        all_chunks: list[StoredChunk] = []
        vec_parts: list[np.ndarray] = []
        records: list[FileRecord] = []
        new_offsets: dict[str, int] = {}
        pos = 0
        for rel in sorted(new_chunks):
            new_offsets[rel] = pos
            pos += len(new_chunks[rel])
        digests = {rel: digest for rel, digest, _, _ in todo}
        sizes = {rel: size for rel, _, size, _ in todo}
        for rel in sorted(set(reused) | set(new_chunks)):
            if rel in reused:
                assert prev is not None
                rows = prev.chunks.get(rel, [])
                all_chunks.extend(c for _, c in rows)
                vec_parts.append(prev.vectors[[i for i, _ in rows]])
                records.append(reused[rel])
            else:
                cs = new_chunks[rel]
                all_chunks.extend(StoredChunk(c.source, c.heading, c.text, c.start, c.end, c.n_tokens) for c in cs)
                vec_parts.append(new_vecs[new_offsets[rel]:new_offsets[rel] + len(cs)])
                records.append(FileRecord(rel, digests[rel], sizes[rel], len(cs)))
        vectors = np.concatenate(vec_parts).astype(np.float32, copy=False)
        result.n_files = len(records)
        result.n_chunks = len(all_chunks)
        result.onnx_min_cosine = min_cos
        meta = {
            "settings": settings,
            "chunk_tokens": chunk_tokens,
            "overlap": overlap,
            "embedder": {k: embedder_cfg[k] for k in ("source", "fingerprint", "dim", "max_seq_length", "pooling",
                                                      "normalize")},
            "onnx_min_cosine": min_cos,
            "onnx_verified_on": verified_on,
            "n_files": len(records),
            "skipped": [{"path": s.path, "reason": s.reason} for s in result.skipped],
            "last_update": result.counts(),
        }
        spec = write_store(tmp, all_chunks, vectors, records, meta, hnsw_threshold=hnsw_threshold)
        result.faiss_index = spec["type"]
        manifest = dict(meta, faiss=spec, n_chunks=len(all_chunks), files={DB_FILE: "chunks, files, FTS5, meta",
                        FAISS_FILE: "vectors", EMBEDDER_DIR: "ONNX embedder"})
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        fsync_tree(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.seconds = time.perf_counter() - t0
    log.info("indexed %d files into %d chunks in %s (%s): %s", result.n_files, result.n_chunks, out,
             result.faiss_index, result.counts())
    return result


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
