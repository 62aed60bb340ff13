"""`phiedge build`: resolve → merge (+ proof) → reference → export → parity → retriever → smoke → bundle.

Every stage's output lives in the stage cache (phiedge.cache), keyed by the hashes of its inputs and
settings: the same build again does no work, new documents rebuild only the retriever and the smoke
checks, a new adapter rebuilds the merge and everything downstream of it but not the retriever. The
bundle is assembled in `<out>.partial/` and renamed to `<out>` only when every check passed, so an
interrupted or failed build never looks complete. A failed gate leaves `<out>.partial/report.json`
for inspection and raises ParityError listing every failure.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, bundle, exporters, parity, report, source
from .cache import StageCache, default_root
from .memory import TreeSampler, available_bytes, guarded, isolated
from .errors import (DiskSpaceError, InvalidCheckpointError, MemoryShortError, ParityError, RetrieverError,
                     UsageError)

log = logging.getLogger("phiedge")
SMOKE_TOKENS = 24


@dataclass
class BuildRequest:
    model: str = source.DEFAULT_MODEL
    adapter: str | None = None
    formats: dict[str, list[str]] = field(default_factory=lambda: {"gguf": ["Q4_K_M"]})
    out: Path = Path("dist")
    revision: str | None = None
    adapter_revision: str | None = None
    force: bool = False
    threads: int = os.cpu_count() or 1
    allow_noop_adapter: bool = False
    thresholds: dict | None = None          # precision -> (top1, kl, max_abs); a profile's overrides
    target: dict | None = None              # the profile, recorded in the manifest
    docs: Path | None = None                # documents for the embedded retriever and the smoke RAG query
    smoke_question: str | None = None
    smoke_needle: str | None = None         # text the right chunk contains (default: derived from the question)
    smoke_answer: str | None = None         # a real model: the fact every artifact's answer must contain
    cache_dir: Path | None = None
    verify_cache: bool = False              # re-hash every cached stage before using it (default: sizes + mtimes)
    follow_links: bool = False              # index what symbolic links out of --docs point to
    sign_key: Path | None = None            # Ed25519 private key (PEM): sign the bundle's manifest


def plan_formats(formats: list[str], precisions: dict[str, list[str]]) -> dict[str, list[str]]:
    """--formats plus per-format precision flags -> {format: [precision, ...]}, validated."""
    plan = {}
    for f in formats:
        exp = exporters.get(f)
        plan[f] = exp.check_precisions(precisions.get(f) or [exp.DEFAULT_PRECISION])
    if not plan:
        raise UsageError(f"no formats requested: pass --formats (known: {', '.join(sorted(exporters.REGISTRY))})")
    return plan


class _Clock:
    """Times each stage and prints the checklist line: what it produced, how long it took, or that it was
    cached. On a terminal, a progress bar over the build's stages shows the running stage and its clock."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.peaks_mb: dict[str, float] = {}       # peak RSS of the whole process tree during each stage
        self.bar = None

    def start_bar(self, total: int) -> None:
        if not sys.stderr.isatty():
            return
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit="stage", leave=False, dynamic_ncols=True,
                        bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} stages [{elapsed}]")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def run(self, name: str, fn, *args, staged: bool = False, where: Path | None = None, need: int | None = None,
            **kw):
        """`fn(*args, **kw)` timed and measured. `staged`: fn returns (result, cached) and run returns the result.
        A full disk (ENOSPC here or in a tool) becomes one DiskSpaceError naming this stage, the folder it wrote
        (`where`) and the space it needs (`need` bytes, when known)."""
        ticker = self._tick(name)
        t0 = time.perf_counter()
        try:
            with TreeSampler() as mem:
                out = fn(*args, **kw)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise disk_full(name, Path(e.filename) if e.filename else where, need, str(e.strerror)) from None
        except DiskSpaceError as e:
            raise disk_full(name, where, need, str(e)) from None
        finally:
            ticker.set()
        self.timings[name] = round(time.perf_counter() - t0, 2)
        self.peaks_mb[name] = mem.peak_mb
        cached = False
        if staged:
            out, cached = out
        what = f"  {_size(out)}" if isinstance(out, Path) else ""
        line = (f"✓ {name:<24} {self.timings[name]:7.1f} s  peak {mem.peak_mb / 1024:5.2f} GB"
                f"{'  (cached)' if cached else ''}{what}")
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
            self.bar.update(1)
        else:
            log.info(line)
        return out

    def _tick(self, name: str) -> threading.Event:
        """Refresh the bar every half second while a stage runs, so a long export visibly advances."""
        done = threading.Event()
        if self.bar is None:
            return done
        self.bar.set_description_str(name)

        def loop():
            while not done.wait(0.5):
                self.bar.refresh()
        threading.Thread(target=loop, daemon=True).start()
        return done


def disk_full(stage: str, where: Path | None, need: int | None, detail: str) -> DiskSpaceError:
    probe = Path(where) if where else Path.cwd()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    needs = f"it needs about {_mb(need)}, " if need else ""
    return DiskSpaceError(f"the {stage} stage ran out of disk space in {probe} ({detail}; {needs}{_mb(free)} free): "
                          f"free space there or choose another --cache-dir/--out, then run the build again "
                          f"(it resumes; nothing partial was kept)")


def _mb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def build(req: BuildRequest) -> dict:
    if req.docs is None and (req.smoke_question or req.smoke_needle or req.smoke_answer):
        raise UsageError("--smoke-question/--smoke-needle/--smoke-answer ask about documents: pass them with --docs")
    clock = _Clock()
    clock.start_bar(4 + (2 if req.docs is not None else 0) + sum(1 + len(p) for p in req.formats.values()))
    try:
        if clock.bar is None:
            return _build(req, clock)
        from tqdm.contrib.logging import logging_redirect_tqdm
        with logging_redirect_tqdm():           # log lines print above the bar, not through it
            return _build(req, clock)
    finally:
        clock.close()


def _build(req: BuildRequest, clock: _Clock) -> dict:
    out = Path(req.out)
    model, adapter, config = clock.run("resolve", _cheap_checks, req, out)
    cache = StageCache(req.cache_dir, verify="full" if req.verify_cache else "fast")
    digests = clock.run("hash inputs", _hash_inputs, cache, model, adapter, staged=True)
    merge_key = {"v": __version__, "model": digests["model"], "adapter": digests["adapter"],
                 "allow_noop": req.allow_noop_adapter}

    def do_merge(d: Path) -> None:
        from . import merge
        # Each in its own process: the merge's model copy is gone before the reference loads the merged one.
        proof = isolated(merge.merge, model, adapter, config, d / "merged", allow_noop=req.allow_noop_adapter)
        (d / "proof.json").write_text(json.dumps(merge.proof_dict(proof), indent=2))
        isolated(merge.reference, d / "merged", config, d / "reference.npz")

    weights = sum(v for k, v in model.files.items() if k.endswith(".safetensors"))
    merged_stage = clock.run("merge", cache.stage, "merge", merge_key, do_merge, staged=True, where=cache.root,
                             need=weights)
    merged, reference = merged_stage / "merged", merged_stage / "reference.npz"
    proof = json.loads((merged_stage / "proof.json").read_text())

    retriever_dir, smoke_ref = None, None
    if req.docs is not None:
        retriever_dir = clock.run("retriever", _retriever_stage, cache, Path(req.docs), req, staged=True,
                                  where=cache.root)
        smoke_ref = clock.run("smoke reference", _smoke_reference_stage, cache, merged_stage, retriever_dir, req,
                              staged=True, where=cache.root)

    n_params = source.param_count(model)
    rows, failures = [], []
    for fmt, precs in req.formats.items():
        export_key = {"merge": merged_stage.name, "format": fmt, "precisions": precs, "v": __version__}
        calibration = req.docs if req.docs is not None and exporters.get(fmt).USES_CALIBRATION \
            else None           # data-aware quantization (OpenVINO int4) calibrates on the build's own documents
        if calibration is not None:
            export_key["calibration"] = docs_digest(cache, Path(calibration), req.follow_links)
        fstage = clock.run(f"export {fmt}", cache.stage, f"export-{fmt}", export_key,
                           lambda d, fmt=fmt, precs=precs, cal=calibration: _export(fmt, precs, merged, d,
                                                                                    req.threads, cal,
                                                                                    req.follow_links),
                           staged=True, where=cache.root, need=exporters.get(fmt).estimate_bytes(n_params, precs))
        for a in _artifacts_in(fstage):
            row = clock.run(f"check {fmt} {a.precision}", _check_stage, cache, a, fstage, reference, smoke_ref,
                            retriever_dir, req, staged=True, where=cache.root)
            rows.append(row)
            failures += [f"{a.format} {a.precision}: {f}" for f in row["failures"]]
            _log_row(row)
    work = out.with_name(out.name + ".partial")
    rep = report.build_report(model=model, adapter=adapter, proof=proof, rows=rows, timings=clock.timings,
                              peaks_mb=clock.peaks_mb,
                              config=config, target=req.target, smoke_question=_question(req, smoke_ref),
                              cache={"hits": cache.hits, "ran": cache.ran, "rebuilt": cache.rebuilt})
    source_info = {"model": {"ref": model.ref, "revision": model.revision, "files": digests["model"]},
                   "adapter": None if adapter is None else
                   {"ref": adapter.ref, "revision": adapter.revision, "files": digests["adapter"]}}
    clock.run("bundle", _assemble, work, rows, reference, retriever_dir, rep, source_info, req, merged,
              where=work.parent, need=sum(r["size_bytes"] for r in rows))
    if failures:
        raise ParityError(f"parity failed for {len(failures)} check(s): {'; '.join(failures)} "
                          f"(report: {work / 'report.json'})")
    bundle.swap_into_place(work, out)
    return rep


def _hash_inputs(cache: StageCache, model: source.Source, adapter: source.Source | None) -> tuple[dict, bool]:
    """sha256 of every input file (7.7 GB at full size), remembered across builds by path, size and mtime; the
    same read checks every safetensors tensor for NaN/inf. (digests, whether all came from the memo)."""
    before = cache.files_hashed
    found = {}
    for kind, src in (("model", model), ("adapter", adapter)):
        if src is None:
            found[kind] = None
            continue
        facts = {n: cache.file_facts(src.path / n) for n in sorted(src.files)}
        bad = next(((n, f["nonfinite"]) for n, f in facts.items() if f["nonfinite"]), None)
        if bad:
            raise InvalidCheckpointError(f"{kind} {src.ref}: tensor '{bad[1]}' in {bad[0]} holds NaN or inf "
                                         f"values: the checkpoint is damaged or diverged in training; download or "
                                         f"save it again (or pass the last good checkpoint)")
        found[kind] = {n: f["sha256"] for n, f in facts.items()}
    return found, cache.files_hashed == before


def docs_digest(cache: StageCache, docs: Path, follow_links: bool) -> dict[str, str]:
    """What the documents stage reads, by content: the same listing the retriever indexes (symbolic links out of
    the folder are skipped and count by their reason, never read)."""
    from .retriever.ingest import list_files
    found, skipped = list_files(docs, follow_links=follow_links)
    out = {p.relative_to(docs).as_posix(): cache.digest(p) for p in found}
    out.update({s.path: f"skipped: {s.reason}" for s in skipped})
    return out


def _assemble(work: Path, rows: list[dict], reference: Path, retriever_dir: Path | None, rep: dict,
              source_info: dict, req: BuildRequest, merged: Path) -> None:
    try:
        bundle.assemble(work, rows=rows, reference=reference, retriever=retriever_dir, report=rep,
                        source_info=source_info, target=req.target, chat_dir=merged)
        if req.sign_key is not None:
            bundle.sign(work, req.sign_key)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            shutil.rmtree(work, ignore_errors=True)        # nothing half-written stays behind
        raise


# ----------------------------------------------------------------------------------------------- stages

def _cheap_checks(req: BuildRequest, out: Path):
    """Nothing heavy runs before all of these pass."""
    if not bundle.is_bundle(out):          # rebuilding our own bundle in place is allowed
        source.prepare_out(out, force=req.force)
    if req.docs is not None:
        _check_docs(Path(req.docs), req.follow_links)
    if req.sign_key is not None:
        bundle.load_key(req.sign_key, private=True)
    model = source.resolve(req.model, revision=req.revision, kind="model")
    config = source.check_model(model)
    adapter = None
    if req.adapter:
        adapter = source.resolve(req.adapter, revision=req.adapter_revision, kind="adapter")
        source.check_adapter(adapter, model, config)
    n_params = source.param_count(model)
    shortfalls = memory_shortfalls(req.formats, n_params, available_bytes())
    if shortfalls:
        raise MemoryShortError(next(iter(shortfalls.values())))
    weight_bytes = sum(v for k, v in model.files.items() if k.endswith(".safetensors"))
    exports = sum(exporters.get(f).estimate_bytes(n_params, p) for f, p in req.formats.items())
    cache_root = Path(req.cache_dir) if req.cache_dir else default_root()
    # The cache holds the merged checkpoint and the exporters' intermediates (a 16-bit GGUF, OpenVINO's IR) beside
    # the artifacts; the bundle copies the artifacts.
    source.check_disk([(cache_root, 2 * weight_bytes + exports), (out.parent if not out.exists() else out,
                                                                  int(exports * 1.05))])
    return model, adapter, config


def _check_docs(docs: Path, follow_links: bool) -> None:
    """A documents folder that gives the retriever nothing is refused before the merge, not after it."""
    if not docs.is_dir():
        raise UsageError(f"--docs {docs} is not a folder: pass the folder of documents for the retriever")
    from .retriever.ingest import list_files
    found, skipped = list_files(docs, follow_links=follow_links)
    if not found:
        from .retriever.build import _no_chunks_message
        raise RetrieverError(_no_chunks_message(docs, skipped))


def memory_shortfalls(formats: dict[str, list[str]], n_params: int, available: int) -> dict[str, str]:
    """Format -> why its export cannot run here, for exports known to need more memory than `available`:
    refused up front, not OOM-killed half an hour into a build."""
    out = {}
    for fmt, precs in formats.items():
        exp = exporters.get(fmt)
        for p in precs:
            need = exp.peak_bytes(n_params, p)
            if need and need > available and fmt not in out:
                out[fmt] = (f"the {fmt} {p} export of this {n_params / 1e9:.1f}B-parameter model needs about "
                            f"{need / 1e9:.1f} GB of memory ({exp.PEAK_WHY}), this machine has "
                            f"{available / 1e9:.1f} GB available (RAM + free swap): export {fmt} on a machine "
                            f"with more memory or swap, or leave {fmt} out of --formats")
    return out


def _export(fmt: str, precs: list[str], merged: Path, d: Path, threads: int, calibration: Path | None = None,
            follow_links: bool = False) -> None:
    settings: dict = {"threads": threads}
    if calibration is not None:
        settings["calibration_text"] = _calibration_text(Path(calibration), follow_links)
    arts = exporters.get(fmt).export(merged, d, precs, settings)
    (d / "artifacts.json").write_text(json.dumps(
        [{"format": a.format, "precision": a.precision, "path": str(a.path.relative_to(d)), "files": list(a.files),
          "meta": a.meta} for a in arts], indent=2))


def _calibration_text(docs: Path, follow_links: bool = False) -> list[str]:
    """The text of every document the retriever indexes (same reader, same link policy), for data-aware
    quantization."""
    from .retriever.ingest import SkipFile, list_files, load_document, read_bytes
    out = []
    for p in list_files(docs, follow_links=follow_links)[0]:
        try:
            out.append(load_document(p, p.relative_to(docs).as_posix(), read_bytes(p)).text)
        except SkipFile as e:           # the retriever reports unreadable files; calibration skips them
            log.debug("calibration: skipped %s (%s)", p, e)
    return out


def _artifacts_in(stage_dir: Path) -> list[exporters.Artifact]:
    return [exporters.Artifact(format=a["format"], precision=a["precision"], path=stage_dir / a["path"],
                               files=tuple(a["files"]), meta=a["meta"])
            for a in json.loads((stage_dir / "artifacts.json").read_text())]


def _retriever_stage(cache: StageCache, docs: Path, req: BuildRequest) -> tuple[Path, bool]:
    from .retriever.build import build_index
    key = {"docs": docs_digest(cache, docs, req.follow_links), "v": __version__}
    stage, hit = cache.stage("retriever", key, lambda d: build_index(docs, d / "retriever", threads=req.threads,
                                                                      follow_links=req.follow_links))
    return stage / "retriever", hit


def _question(req: BuildRequest, smoke_ref: Path | None) -> dict | None:
    if smoke_ref is None:
        return None
    return json.loads((smoke_ref / "smoke.json").read_text())


def _smoke_reference_stage(cache: StageCache, merged_stage: Path, retriever_dir: Path,
                           req: BuildRequest) -> tuple[Path, bool]:
    """Retrieve for the smoke question, build the RAG prompt, and record PyTorch's greedy answer to it."""
    key = {"merge": merged_stage.name, "retriever": retriever_dir.parent.name, "q": req.smoke_question,
           "needle": req.smoke_needle, "answer": req.smoke_answer, "n": SMOKE_TOKENS}

    def run(d: Path) -> None:
        from . import merge, rag
        from .retriever import Retriever
        with Retriever.open(retriever_dir) as r:
            question, needle = req.smoke_question, req.smoke_needle
            if not question:
                question, needle = _default_question(r)
            hits = r.search(question, k=3)
        ids = rag.prompt_ids(merged_stage / "merged", rag.messages(question, hits))
        greedy, margins = isolated(merge.greedy, merged_stage / "merged", ids, SMOKE_TOKENS)
        needle = needle or question
        fact, answer = req.smoke_answer, rag.detokenize(merged_stage / "merged", greedy)
        if fact and not states(answer, fact):
            raise UsageError(f"the fine-tuned model's own answer to the smoke question does not contain "
                             f"{fact!r}: pass a --smoke-answer it gives, or a --smoke-question it answers")
        (d / "smoke.json").write_text(json.dumps({
            "question": question, "needle": needle, "fact": fact, "prompt_ids": ids, "reference_tokens": greedy,
            "reference_margins": [round(m, 5) for m in margins], "reference_answer": answer,
            "retrieved": [{"source": h.source, "chunk_id": h.chunk_id} for h in hits],
            "retrieved_has_needle": any(needle.lower() in h.text.lower() for h in hits)}, indent=1))

    return cache.stage("smoke-ref", key, run)


def _default_question(r) -> tuple[str, str]:
    """No --smoke-question: ask for the opening sentence of the corpus's first chunk; that chunk must come back."""
    first = r.fetch([0]).get(0)                    # (source, heading, text)
    text = first[2] if first else ""
    sentence = text.strip().split("\n")[0].split(". ")[0][:160]
    return f"What does the documentation say about: {sentence}?", sentence


def _check_stage(cache: StageCache, a: exporters.Artifact, fstage: Path, reference: Path, smoke_ref: Path | None,
                 retriever_dir: Path | None, req: BuildRequest) -> tuple[dict, bool]:
    """Parity (both regimes) and the smoke RAG answer of one artifact, measured in a child process."""
    key = {"export": fstage.name, "precision": a.precision, "smoke": smoke_ref.name if smoke_ref else None,
           "reference": reference.parent.name}
    stage, hit = cache.stage(f"check-{a.format}-{a.precision}", key,
                             lambda d: _measure(a, reference, smoke_ref, req.threads, d))
    measured = json.loads((stage / "measured.json").read_text())
    return _judge(a, measured, req.thresholds, smoke_ref), hit


def _measure(a: exporters.Artifact, reference: Path, smoke_ref: Path | None, threads: int, d: Path) -> None:
    cmd = [sys.executable, "-m", "phiedge.worker", a.format, str(a.path), str(reference), str(threads)]
    if smoke_ref is not None:
        cmd.append(str(smoke_ref / "smoke.json"))
    from .cache import writer_fds
    r = subprocess.run(guarded(cmd), capture_output=True, text=True, pass_fds=writer_fds())
    if r.returncode != 0:
        why = f"signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        measured = {"error": f"runtime failed ({why}): {last}"}
    else:
        measured = json.loads(r.stdout.strip().splitlines()[-1])
    (d / "measured.json").write_text(json.dumps(measured, indent=1))


def _judge(a: exporters.Artifact, measured: dict, overrides: dict | None, smoke_ref: Path | None) -> dict:
    limits = parity.thresholds_for(a.precision, overrides)
    row = {"format": a.format, "precision": a.precision, "stage_path": str(a.path),
           "files": list(a.files), "size_bytes": a.size_bytes, "meta": a.meta,
           "thresholds": {"top1_min": limits[0], "kl_max": limits[1], "max_abs_max": limits[2]}}
    if "error" in measured:
        row.update(parity={"short": None, "long": None}, failures=[measured["error"]], passed=False, smoke=None)
        return row
    row["parity"] = {"short": measured["parity"].get("short"), "long": measured["parity"].get("long")}
    row["greedy"] = measured.get("greedy")
    if row["greedy"]:                     # the probe's greedy tokens: reported, not held
        g = row["greedy"]
        g["token_agreement"] = parity.token_agreement(g["reference"], g["reference_margins"], g["forced_tokens"],
                                                      limits).as_dict()
    fails = []
    for regime, m in row["parity"].items():
        if m is not None:
            fails += parity.failures(regime, parity.Metrics(**m), limits)
    smoke = measured.get("smoke")
    if smoke is not None:
        ref = json.loads((smoke_ref / "smoke.json").read_text())
        smoke["retrieved_has_needle"] = ref["retrieved_has_needle"]
        fails += _smoke_failures(a.precision, smoke, ref, limits)
    row["smoke"] = smoke
    row["failures"] = fails
    row["passed"] = not fails
    return row


def states(answer: str, fact: str) -> bool:
    """Whether `answer` states `fact` as a whole number or word, case-insensitively: "3.8" is in "3.8B-parameter"
    and "3.8 billion", "32" is not in "232 layers" nor "320" (a 4-bit SmolLM2 answered "232 Transformer layers")."""
    before = r"(?<![0-9.])" if fact[:1].isdigit() else r"(?<![0-9A-Za-z])"
    after = r"(?![0-9])" if fact[-1:].isdigit() else r"(?![0-9A-Za-z])"
    return re.search(before + re.escape(fact) + after, answer, re.IGNORECASE) is not None


def _smoke_failures(precision: str, smoke: dict, ref: dict, limits: tuple) -> list[str]:
    """The smoke rule. With a fact (a real model): every artifact's answer contains it; token agreement with
    PyTorch is reported, not held (an fp16-activation runtime such as MLX fp16 flips real near-ties: 23/24
    teacher-forced on SmolLM2, 24/24 in fp32). Without one (tiny random models, whose answers carry no facts),
    PyTorch's answer is replayed token by token (teacher-forced): a full-precision artifact picks PyTorch's token
    at every position that is not a near-tie for its precision (parity.token_agreement), and its greedy answer
    equals PyTorch's at least up to the first near-tie (after a tie broken the other way, greedy decoding follows
    another path, which says nothing about the artifact). A quantized artifact agrees teacher-forced at its
    precision's top-1 threshold."""
    tokens = parity.token_agreement(ref["reference_tokens"], ref["reference_margins"], smoke["forced_tokens"], limits)
    smoke["token_agreement"] = tokens.as_dict()
    smoke["agreement"] = tokens.rate
    fails = [] if ref["retrieved_has_needle"] else ["smoke: the retrieved chunks do not contain the answer's source"]
    fact = ref.get("fact")
    if fact:
        smoke["agreement_min"] = None
        smoke["has_fact"] = states(smoke["answer"], fact)
        if not smoke["has_fact"]:
            fails.append(f"smoke: the answer does not contain {fact!r}")
        return fails
    if parity.is_full_precision(precision):
        smoke["agreement_min"] = None
        if tokens.misses:
            fails.append(f"smoke: the answer takes another token than PyTorch at position(s) "
                         f"{', '.join(map(str, tokens.misses))} of {tokens.of}, none of them a near-tie")
        if smoke["prefix_match"] < tokens.first_tie:
            fails.append(f"smoke: the greedy answer leaves PyTorch's at token {smoke['prefix_match']} of {tokens.of}, "
                         f"before any near-tie")
        return fails
    smoke["agreement_min"] = limits[0]
    if tokens.rate < limits[0]:
        fails.append(f"smoke: teacher-forced answer tokens agree with PyTorch at {tokens.rate:.2f} (< {limits[0]:.2f})")
    return fails


def check_artifact(a: exporters.Artifact, reference: Path, threads: int, overrides: dict | None,
                   workdir: Path) -> dict:
    """Parity of one artifact outside a build (no cache): measure in a child process, judge."""
    d = workdir / f"check-{a.format}-{a.precision}"
    d.mkdir(parents=True, exist_ok=True)
    _measure(a, reference, None, threads, d)
    return _judge(a, json.loads((d / "measured.json").read_text()), overrides, None)


def _log_row(row: dict) -> None:
    def fmt(m):
        return "n/a" if m is None else f"top1 {m['top1']:.3f} kl {m['kl']:.2g} max|Δ| {m['max_abs']:.3g}"
    log.info("  %s %-7s short: %s | long: %s  %s", row["format"], row["precision"], fmt(row["parity"]["short"]),
             fmt(row["parity"]["long"]), "PASS" if row["passed"] else "FAIL: " + "; ".join(row["failures"]))


def _size(path: Path) -> str:
    n = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
    return f"{n / 1e6:.1f} MB"


