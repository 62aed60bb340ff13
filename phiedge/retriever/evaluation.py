"""Retrieval evaluation: recall@1/3/5 and MRR for each mode over questions with a known answer string.

QA file: JSON lines `{"question": "...", "needle": "..."}`; a hit is a chunk whose text contains the needle
(case-insensitive, whitespace-normalized). Device-safe imports only.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .search import Retriever
from .types import MODES

CUTOFFS = (1, 3, 5)
MRR_DEPTH = 10


@dataclass(frozen=True)
class QA:
    question: str
    needle: str


def load_qa(path: str | Path) -> list[QA]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"QA file {p} does not exist: pass a JSONL file of {{\"question\": ..., \"needle\": ...}} "
                         f"lines to --qa")
    out: list[QA] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{p}:{n}: not JSON ({e.msg}): each line must be "
                             f"{{\"question\": ..., \"needle\": ...}}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or \
                not isinstance(obj.get("needle"), str) or not obj["question"].strip() or not obj["needle"].strip():
            raise UsageError(f"{p}:{n}: needs non-empty string fields \"question\" and \"needle\"")
        out.append(QA(obj["question"], obj["needle"]))
    if not out:
        raise UsageError(f"QA file {p} has no questions: add JSONL lines {{\"question\": ..., \"needle\": ...}}")
    return out


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().casefold()


def evaluate(retriever: Retriever, qa: list[QA], modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """{mode: {"recall@1", "recall@3", "recall@5", "mrr", "n"}} plus "unanswerable": questions whose needle
    is in no chunk at all (they count as misses). MRR is computed over the top 10."""
    needles = [_norm(q.needle) for q in qa]
    texts = [_norm(t) for (t,) in retriever.con.execute("SELECT text FROM chunks")]
    answerable = [any(nd in t for t in texts) for nd in needles]
    report: dict[str, Any] = {}
    for mode in modes:
        ranks: list[int | None] = []
        for q, nd in zip(qa, needles):
            hits = retriever.search(q.question, k=MRR_DEPTH, mode=mode)
            rank = next((i + 1 for i, h in enumerate(hits) if nd in _norm(h.text)), None)
            ranks.append(rank)
        n = len(ranks)
        row: dict[str, Any] = {f"recall@{c}": sum(1 for r in ranks if r is not None and r <= c) / n for c in CUTOFFS}
        row["mrr"] = sum(1.0 / r for r in ranks if r is not None) / n
        row["n"] = n
        row["ranks"] = ranks
        report[mode] = row
    report["unanswerable"] = [q.question for q, ok in zip(qa, answerable) if not ok]
    return report
