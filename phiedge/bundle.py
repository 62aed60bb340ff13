"""The bundle a user ships: one folder per artifact, the retriever, golden references, manifest, report.

Layout:
    <format>-<precision>/   the artifact's files, as its runtime loads them
    retriever/              SQLite + FAISS + ONNX embedder (when built with --docs)
    golden.npz              probe ids, top-k reference log-probs and greedy tokens, for `phiedge validate`
    manifest.json           every file's sha256 and size, sources, versions, target, results
    report.json, report.html, README.md

The writer walks an explicit state order (artifacts → retriever → golden → reports → manifest) and
refuses an out-of-order call, so a manifest can never describe a half-written bundle. Device-path
module for `verify`: hashlib, json, numpy.
"""
from __future__ import annotations

import enum
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from .errors import BundleError

MANIFEST = "manifest.json"
GOLDEN = "golden.npz"
TOPK = 32
SCHEMA = 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def is_bundle(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


class _State(enum.IntEnum):
    EMPTY = 0
    ARTIFACTS = 1
    RETRIEVER = 2
    GOLDEN = 3
    REPORTS = 4
    MANIFEST = 5


class BundleWriter:
    def __init__(self, folder: Path):
        self.folder = folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.state = _State.EMPTY

    def _advance(self, to: _State) -> None:
        if to <= self.state:
            raise RuntimeError(f"bundle writer: cannot write {to.name.lower()} after {self.state.name.lower()}")
        self.state = to

    def add_artifacts(self, rows: list[dict]) -> None:
        self._advance(_State.ARTIFACTS)
        for row in rows:
            name = f"{row['format']}-{row['precision']}"
            src = Path(row.pop("stage_path"))
            for f in row.pop("files"):
                (self.folder / name / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / f, self.folder / name / f)
            row["path"] = name

    def add_retriever(self, retriever: Path | None) -> None:
        self._advance(_State.RETRIEVER)
        if retriever is not None:
            shutil.copytree(retriever, self.folder / "retriever")

    def add_golden(self, reference: Path) -> None:
        self._advance(_State.GOLDEN)
        write_golden(reference, self.folder / GOLDEN)

    def add_reports(self, rep: dict, readme: str) -> None:
        from . import report
        self._advance(_State.REPORTS)
        report.write(rep, self.folder)
        report.write_html(rep, self.folder)
        (self.folder / "README.md").write_text(readme)

    def add_manifest(self, info: dict) -> None:
        self._advance(_State.MANIFEST)
        files = {}
        for p in sorted(self.folder.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                files[str(p.relative_to(self.folder))] = {"sha256": sha256(p), "size": p.stat().st_size}
        (self.folder / MANIFEST).write_text(json.dumps({"schema": SCHEMA, **info, "files": files}, indent=2) + "\n")


def write_golden(reference: Path, out: Path) -> None:
    """Top-k log-probs (not full-vocabulary logits: 200k x 64 floats per regime would dwarf a small bundle)."""
    ref = np.load(reference)
    arrays = {}
    for name in ("short", "long"):
        if f"{name}_ids" not in ref:
            continue
        logits = ref[f"{name}_logits"].astype(np.float64)
        lp = logits - logits.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        idx = np.argsort(-lp, axis=-1)[:, :TOPK]
        arrays[f"{name}_ids"] = ref[f"{name}_ids"]
        arrays[f"{name}_topk_idx"] = idx.astype(np.int32)
        arrays[f"{name}_topk_logprob"] = np.take_along_axis(lp, idx, -1).astype(np.float32)
    if "short_greedy" in ref:
        arrays["short_greedy"] = ref["short_greedy"]
    np.savez(out, **arrays)


def assemble(work: Path, *, rows: list[dict], reference: Path, retriever: Path | None, report: dict,
             source_info: dict, target: dict | None, chat_dir: Path) -> None:
    from . import report as report_mod
    w = BundleWriter(work)
    w.add_artifacts(rows)                 # rows get their bundle-relative "path"
    report["artifacts"] = rows
    w.add_retriever(retriever)
    w.add_golden(reference)
    w.add_reports(report, report_mod.readme(report))
    w.add_manifest({"created": report["created"], "source": source_info, "target": target,
                    "versions": report["versions"], "passed": report["passed"],
                    "artifacts": [{k: r.get(k) for k in ("format", "precision", "path", "size_bytes", "passed",
                                                         "parity", "smoke", "failures")} for r in rows],
                    "retriever": "retriever" if retriever is not None else None})


def swap_into_place(work: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def load_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder} has no {MANIFEST}: it is not a phiedge bundle (build one with `phiedge build`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise BundleError(f"{path} is not valid JSON: the bundle is damaged; rebuild or copy it again") from None


def verify(folder: Path) -> dict:
    """Re-hash every file; a changed, missing or extra file fails with every such file named."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    want = manifest["files"]
    have = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    problems = [f"missing {f}" for f in sorted(set(want) - have)]
    problems += [f"extra {f}" for f in sorted(have - set(want))]
    for f in sorted(set(want) & have):
        p = folder / f
        if p.stat().st_size != want[f]["size"] or sha256(p) != want[f]["sha256"]:
            problems.append(f"changed {f}")
    if problems:
        raise BundleError(f"bundle {folder} failed verification: {'; '.join(problems)}: rebuild it or copy it again")
    return manifest
