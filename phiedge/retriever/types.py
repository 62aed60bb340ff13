"""Plain data types of the retriever. No heavy imports here: the device path imports this module."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MODES = ("dense", "keyword", "hybrid")


@dataclass(frozen=True)
class Hit:
    """One search result.

    `score` depends on the mode: cosine similarity (dense), negated BM25 (keyword, higher is better),
    reciprocal-rank-fusion score (hybrid).
    """

    chunk_id: int
    text: str
    source: str
    heading: str | None
    score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SkippedFile:
    """A file under the docs folder that was not indexed, and why."""

    path: str
    reason: str


@dataclass
class IndexResult:
    """What `build_index` did."""

    out_dir: str
    n_files: int
    n_chunks: int
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    n_embedded: int = 0
    faiss_index: str = ""
    onnx_min_cosine: float | None = None
    rebuilt_reason: str | None = None
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        return {
            "added": len(self.added),
            "changed": len(self.changed),
            "unchanged": len(self.unchanged),
            "removed": len(self.removed),
            "skipped": len(self.skipped),
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["counts"] = self.counts()
        return d
