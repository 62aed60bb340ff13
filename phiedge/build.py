"""`phiedge build`: resolve → hash inputs → merge (+ proof, reference) → retriever → smoke reference →
export and check, per format and precision → bundle.

The build is a list of stages (phiedge.stages) handed to an executor. Every cached stage's output lives in
the stage cache (phiedge.cache), keyed by the hashes of its inputs and settings and by the code it runs: the
same build again does no work, new documents rebuild only the retriever and the checks, a new adapter rebuilds
the merge and everything downstream of it but not the retriever. Several adapters (`--adapter NAME=PATH`, repeated)
are several variants of the model: each has its own merge, smoke reference, exports and checks (stage names and
bundle folders end in `@NAME`), and they share the input hashing, the retriever and the bundle; adding an adapter
to a built bundle runs only that adapter's stages. The bundle is assembled in `<out>.partial/`
and renamed to `<out>` only when every check passed, so an interrupted or failed build never looks complete.
A failed gate leaves `<out>.partial/report.json` for inspection and raises ParityError listing every failure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, bundle, calibration, chat, exporters, ollama, report, source, tokenizer_files
from .cache import StageCache, default_root
from .checks import ArtifactResult, Limits, probes
from .errors import (
    InvalidCheckpointError,
    MemoryShortError,
    ParityError,
    RetrieverError,
    UnsupportedAdapterError,
    UsageError,
)
from .exporters.base import TOOL_BYTES
from .memory import available_bytes, isolated
from .stages import Clock, Context, Hit, ParallelExecutor, Stage

log = logging.getLogger("phiedge")
SMOKE_TOKENS = 24
MEMORY_SHARE = 0.8
# Peak memory of the stages that load the model in PyTorch, per parameter, measured on the 3.84 B full-size model
# (bench/results.json): the merge (bf16 load, merge, the reference logits in fp32 arithmetic) 8.8 GB, the smoke
# reference 9.9 GB; the retriever's embedder and index, whatever the model.
MERGE_PEAK_PER_PARAM = 2.3
SMOKE_PEAK_PER_PARAM = 2.6
RETRIEVER_PEAK = 1200 * 2**20
# The code each kind of stage runs (roots of its fingerprint; phiedge.cache.code_fingerprint follows imports).
MERGE_CODE = ("phiedge.merge", "phiedge.checks.reference")
RETRIEVER_CODE = ("phiedge.retriever.build",)
SMOKE_CODE = ("phiedge.checks.smoke",)
CHECK_CODE = ("phiedge.worker", "phiedge.checks.measure", "phiedge.runtimes.base")


ADAPTER_MODES = ("merged", "separate", "both")


@dataclass(frozen=True)
class Variant:
    """One model the build proves: the base with one adapter (`adapter` is its name), or the base alone (None).
    Its merge stage holds its PyTorch reference. `suffix` ends its stage names, merged artifacts' bundle folders
    and golden references: "" when that cannot be ambiguous (one adapter, or none, and no base artifacts beside its
    merged ones), else "@<adapter>"."""
    adapter: str | None
    suffix: str = ""

    def stage(self, name: str) -> str:
        return name + self.suffix


def variants(adapters: dict[str, str], mode: str = "merged") -> list[Variant]:
    if len(adapters) <= 1 and mode != "both":
        return [Variant(next(iter(adapters), None))]
    return [Variant(n, f"@{n}") for n in adapters]


BASE = Variant(None)        # the base artifacts of --adapter-mode separate / both: "export <format> <precision>"


@dataclass(frozen=True)
class Check:
    """One check stage: an artifact (from `export`, a stage name) held to variant `v`'s references, with, in
    separate mode, that adapter's runtime file (from the stage `adapter`) applied by the runtime."""
    fmt: str
    precision: str
    v: Variant
    export: str
    adapter: str | None = None

    @property
    def name(self) -> str:
        return f"check {self.fmt} {self.precision}" + (f"+{self.v.adapter}" if self.adapter else self.v.suffix)


@dataclass
class BuildRequest:
    model: str = source.DEFAULT_MODEL
    adapters: dict[str, str] = field(default_factory=dict)   # name -> local folder or Hub id (source.name_adapters)
    adapter_mode: str = "merged"            # merged | separate (base artifacts + each adapter's runtime file) | both
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
    base_model_id: str | None = None        # the Hub id the bundle's card names (default: phiedge.card.base_model_id)
    max_memory: int | None = None           # bytes the build's stages may hold at once (default: MEMORY_SHARE of
                                            # what is available when it starts)
    jobs: int | None = None                 # stages at most side by side (default: CPUs // threads)
    calibration_tokens: int = calibration.DEFAULT_TOKENS   # --docs tokens data-aware quantization reads
    smoke: bool = True                      # with --docs: the retriever and the smoke RAG query (a sweep: off)
    # A profile's precision "auto": {format: (largest artifact in bytes, candidates)}; every candidate is built and
    # checked, and the bundle ships the lowest-KL one that passed within the size (phiedge.sweep.choose).
    auto: dict[str, tuple[int, tuple[str, ...]]] = field(default_factory=dict)


def plan_formats(formats: list[str], precisions: dict[str, list[str]]) -> dict[str, list[str]]:
    """--formats plus per-format precision flags -> {format: [canonical precision, ...]}, validated."""
    plan = {}
    for f in formats:
        exp = exporters.get(f)
        plan[f] = exp.check_precisions(precisions.get(f) or [exp.DEFAULT_PRECISION])
    if not plan:
        raise UsageError(f"no formats requested: pass --formats (known: {', '.join(sorted(exporters.REGISTRY))})")
    return plan


def build(req: BuildRequest) -> dict:
    if req.docs is None and (req.smoke_question or req.smoke_needle or req.smoke_answer):
        raise UsageError("--smoke-question/--smoke-needle/--smoke-answer ask about documents: pass them with --docs")
    out = Path(req.out)
    clock = Clock()
    try:
        with _above_the_bar(clock):
            ctx, stages = _plan(req, out, clock)
            executor(req, ctx.inputs["budget"]).run(stages, ctx, clock)
    finally:
        clock.close()
    work = out.with_name(out.name + ".partial")
    failures = [f"{r.label}: {f}" for r in _results(ctx) for f in r.verdict.failures]
    if failures:
        raise ParityError(f"parity failed for {len(failures)} check(s): {'; '.join(failures)} "
                          f"(report: {work / 'report.json'})")
    bundle.swap_into_place(work, out)
    return ctx["bundle"]


def _above_the_bar(clock: Clock):
    """On a terminal, log lines print above the progress bar, not through it."""
    if clock.bar is None:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm
    return logging_redirect_tqdm()


def memory_budget(req: BuildRequest) -> int:
    return req.max_memory or int(MEMORY_SHARE * available_bytes())


def executor(req: BuildRequest, budget: int) -> ParallelExecutor:
    """Stages side by side where the memory budget and the CPUs allow (each stage's tools use `threads`; one
    job runs them one at a time)."""
    return ParallelExecutor(req.jobs or max(1, (os.cpu_count() or 1) // max(1, req.threads)), budget)


def measure(req: BuildRequest) -> tuple[list[ArtifactResult], dict, int]:
    """Every export and check of `req`, no bundle (phiedge.sweep): each artifact's result, passed or not, with
    the model's config and parameter count as the build resolved them."""
    clock = Clock()
    try:
        with _above_the_bar(clock):
            ctx, stages = _plan(req, Path(req.out), clock, bundle=False)
            executor(req, ctx.inputs["budget"]).run(stages, ctx, clock)
    finally:
        clock.close()
    return _results(ctx), ctx.inputs["config"], ctx.inputs["n_params"]


def _plan(req: BuildRequest, out: Path, clock: Clock, bundle: bool = True) -> tuple[Context, list[Stage]]:
    """Resolve and check the inputs (the checklist's first line), then lay out the stage graph."""
    facts = clock.run(Stage("resolve"), lambda: (_cheap_checks(req, out), False), None)
    ctx = Context(req=req, cache=StageCache(req.cache_dir, verify="full" if req.verify_cache else "fast"),
                  inputs={**facts, "out": out, "clock": clock})
    stages = graph(ctx)
    if not bundle:
        stages = [s for s in stages if s.name != "bundle"]
    ctx.inputs["order"] = [s.name for s in stages]
    clock.expect(1 + len(stages))
    return ctx, stages


def _results(ctx: Context) -> list[ArtifactResult]:
    """Every check's result in the graph's order, whatever order they finished in (an executor running stages
    side by side); of a format whose profile precision is "auto", the chosen candidate only."""
    auto, order = ctx.req.auto, {n: i for i, n in enumerate(ctx.inputs.get("order", ()))}
    out = [v for k, v in sorted(ctx.outputs.items(), key=lambda kv: order.get(kv[0], len(order)))
           if k.startswith("check ")
           and not (v.artifact.format in auto and v.artifact.precision in auto[v.artifact.format][1])]
    return out + [r for k, picks in ctx.outputs.items() if k.startswith("choose ") for r in picks]


def _choose(ctx: Context, fmt: str) -> list[ArtifactResult]:
    """Precision "auto": per variant, the candidate with the lowest mean KL that passed its gate within the size
    (phiedge.sweep), recorded in its meta with the measurements that chose it."""
    from . import sweep
    limit, cands = ctx.req.auto[fmt]
    emb, other = sweep.params_split(ctx.inputs["config"], ctx.inputs["n_params"])
    picks = []
    for v in ctx.inputs["variants"]:
        results = [ctx[Check(fmt, p, v, v.stage(f"export {fmt} {p}")).name] for p in cands]
        rows = sweep.rank([sweep.row_of(r, emb, other) for r in results])
        best = sweep.choose(rows, fmt, limit)
        if best is None:
            passing = sorted((r for r in rows if r.passed), key=lambda r: r.size_bytes)
            raise ParityError(f"{fmt} precision auto{v.suffix}: no candidate passed its gate within max_size_gb "
                              f"{limit / 1e9:g}" + (f" (the smallest that passed: {passing[0].precision}, "
                                                    f"{passing[0].size_bytes / 1e9:.3g} GB)" if passing else
                                                    " (none passed)") +
                              ": raise max_size_gb in the target, or name a precision")
        log.info("%s auto%s: %s, %.3g GB within %.3g, mean KL %.4g (the tool's 4-bit: %s)", fmt, v.suffix,
                 best.precision, best.size_bytes / 1e9, limit / 1e9, best.kl,
                 next((f"{r.kl:.4g}" for r in rows if r.anchor), "not measured"))
        r = next(r for r in results if r.artifact.precision == best.precision)
        meta = {**r.artifact.meta, "chosen_by": {"max_size_bytes": limit, "sweep": [dataclasses.asdict(x)
                                                                                      for x in rows]}}
        picks.append(dataclasses.replace(r, artifact=dataclasses.replace(r.artifact, meta=meta)))
    return picks


# ------------------------------------------------------------------------------------------------ the graph

def stage_peaks(formats: dict[str, list[str]], n_params: int, config: dict, *, docs: bool) -> dict[str, int]:
    """Stage name -> its estimated peak memory in bytes, from the per-parameter figures measured at full size
    (merge and smoke reference here, each exporter's PEAK_BYTES_PER_PARAM, each runtime's check_peak_bytes)."""
    from . import runtimes
    switch = probes.switch_point(config)
    probe_tokens = switch + probes.LONG_MARGIN if switch else 512
    vocab = int(config.get("vocab_size") or 0)
    peaks = {"merge": int(MERGE_PEAK_PER_PARAM * n_params) + TOOL_BYTES}
    if docs:
        peaks["retriever"] = RETRIEVER_PEAK
        peaks["smoke reference"] = int(SMOKE_PEAK_PER_PARAM * n_params) + TOOL_BYTES
    for fmt, precs in formats.items():
        exp = exporters.get(fmt)
        if exp.PREPARES:
            peaks[f"prepare {fmt}"] = exp.prepare_peak_bytes(n_params)
        for p in precs:
            peaks[f"export {fmt} {p}"] = exp.peak_bytes(n_params, p)
            peaks[f"check {fmt} {p}"] = runtimes.get(fmt).check_peak_bytes(exp.estimate_bytes(n_params, [p]),
                                                                            vocab, probe_tokens)
    return peaks


def graph(ctx: Context) -> list[Stage]:
    """Every stage of this build, as data: the input hashing, each variant's stages (the retriever after the first
    merge), the separate-mode stages, the bundle."""
    req, n_params = ctx.req, ctx.inputs["n_params"]
    stages = [Stage("hash inputs", run=_hash_inputs)]
    merged, separate = req.adapter_mode != "separate", req.adapter_mode != "merged"
    for v in ctx.inputs["variants"]:
        stages += variant_graph(ctx, v, merged=merged)
    if _smokes(req):                    # listed after the first merge: the order a build has always run in
        stages.insert(2, Stage("retriever", cache_name="retriever", key=_retriever_key, make=_retriever,
                               result=lambda c, d: d / "retriever", modules=RETRIEVER_CODE,
                               peak_bytes=ctx.inputs["peaks"]["retriever"]))
    if separate:
        stages += separate_graph(ctx)
    for fmt in req.auto:
        stages.append(Stage(f"choose {fmt}", run=lambda c, fmt=fmt: _choose(c, fmt),
                            needs=tuple(s.name for s in stages if s.name.startswith(f"check {fmt} "))))
    per_set = sum(exporters.get(f).estimate_bytes(n_params, p) for f, p in req.formats.items())
    sets = (len(ctx.inputs["variants"]) if merged else 0) + separate
    stages.append(Stage("bundle", run=_bundle, needs=tuple(s.name for s in stages),
                        where=ctx.inputs["out"].parent, disk_bytes=per_set * sets))
    return stages


def _smokes(req: BuildRequest) -> bool:
    """Whether the build indexes its documents and smoke-tests RAG (with --docs, unless only measuring)."""
    return req.docs is not None and req.smoke


def variant_graph(ctx: Context, v: Variant, *, merged: bool = True) -> list[Stage]:
    """One variant's merge (its reference), smoke reference and, when its artifacts are merged, exports and
    checks (phiedge.stages: the functions read the stages they need by `v.stage(name)`)."""
    req, peaks = ctx.req, ctx.inputs["peaks"]
    weights = sum(n for k, n in ctx.inputs["model"].files.items() if k.endswith(".safetensors"))
    merge = v.stage("merge")
    stages = [Stage(merge, needs=("hash inputs",), cache_name="merge", key=lambda c: _merge_key(c, v),
                    make=lambda c, d: _merge(c, d, v), modules=MERGE_CODE, disk_bytes=weights,
                    peak_bytes=peaks["merge"])]
    if _smokes(req):
        stages.append(Stage(v.stage("smoke reference"), needs=(merge, "retriever"), cache_name="smoke-ref",
                            key=lambda c: _smoke_key(c, v), make=lambda c, d: _smoke_reference(c, d, v),
                            result=lambda c, d: d / "smoke.json", modules=SMOKE_CODE,
                            peak_bytes=peaks["smoke reference"]))
    if not merged:
        return stages
    for fmt, precs in req.formats.items():
        needs = _prepare_stages(ctx, fmt, v, stages, needs=(merge,))
        for p in precs:
            stages += [_export_stage(ctx, fmt, p, v, needs=needs),
                       _check_stage(ctx, Check(fmt, p, v, v.stage(f"export {fmt} {p}")))]
    return stages


def _prepare_stages(ctx: Context, fmt: str, v: Variant, stages: list[Stage], needs: tuple[str, ...]
                    ) -> tuple[str, ...]:
    """The format's shared starting point for `v` (Exporter.PREPARES: OpenVINO's trace), appended to `stages`;
    what its export stages need."""
    exp = exporters.get(fmt)
    if not exp.PREPARES:
        return needs
    name = v.stage(f"prepare {fmt}")
    stages.append(Stage(name, needs=needs, cache_name=f"prepare-{fmt}",
                        key=lambda c: {**_source_key(c, fmt, v), "format": fmt, "v": __version__},
                        make=lambda c, d: exp.prepare(_checkpoint(c, v), d, {"threads": c.req.threads}),
                        modules=(type(exp).__module__, *exp.TOOL_MODULES),
                        peak_bytes=ctx.inputs["peaks"][f"prepare {fmt}"]))
    return (*needs, name)


def separate_graph(ctx: Context) -> list[Stage]:
    """--adapter-mode separate / both: each format's base artifacts exported once from the base model, each
    adapter's runtime file per format, and a check of every (base artifact, adapter) pair against that adapter's
    merged PyTorch model."""
    stages = []
    for fmt, precs in ctx.req.formats.items():
        exp = exporters.get(fmt)
        needs = _prepare_stages(ctx, fmt, BASE, stages, needs=("hash inputs",))
        stages += [_export_stage(ctx, fmt, p, BASE, needs=needs) for p in precs]
        for v in ctx.inputs["variants"]:
            name = v.stage(f"adapter {fmt}")
            stages.append(Stage(name, needs=("hash inputs",), cache_name=f"adapter-{fmt}",
                                key=lambda c, fmt=fmt, v=v: _adapter_key(c, fmt, v),
                                make=lambda c, d, fmt=fmt, v=v: _export_adapter(c, d, fmt, v),
                                modules=(type(exp).__module__, *exp.TOOL_MODULES, "phiedge.tokenizer_files"),
                                peak_bytes=TOOL_BYTES))
            stages += [_check_stage(ctx, Check(fmt, p, v, BASE.stage(f"export {fmt} {p}"), name)) for p in precs]
    return stages


def _export_stage(ctx: Context, fmt: str, precision: str, v: Variant, needs: tuple[str, ...]) -> Stage:
    """One precision's export: a stage per (variant, format, precision), so builds that want the same artifact
    share it whatever else they build (phiedge matrix), and one failing precision fails its own artifact."""
    exp, n_params = exporters.get(fmt), ctx.inputs["n_params"]
    name = f"export {fmt} {precision}"
    return Stage(v.stage(name), needs=needs, cache_name=f"export-{fmt}",
                 key=lambda c: _export_key(c, fmt, [precision], v),
                 make=lambda c, d: _export(c, d, fmt, [precision], v),
                 modules=(type(exp).__module__, *exp.TOOL_MODULES), peak_bytes=ctx.inputs["peaks"][name],
                 disk_bytes=exp.estimate_bytes(n_params, [precision]))


def _check_stage(ctx: Context, c: Check) -> Stage:
    needs = (c.v.stage("merge"), c.export, *([c.adapter] if c.adapter else []),
             *([c.v.stage("smoke reference")] if _smokes(ctx.req) else []))
    return Stage(c.name, needs=needs, cache_name=f"check-{c.fmt}-{c.precision}", key=lambda x: _check_key(x, c),
                 make=lambda x, d: _measure(x, d, c), result=lambda x, d: _result(x, d, c),
                 modules=(*CHECK_CODE, f"phiedge.runtimes.{c.fmt}"),
                 peak_bytes=ctx.inputs["peaks"][f"check {c.fmt} {c.precision}"])


def _hash_inputs(ctx: Context) -> Hit:
    """sha256 of every input file (7.7 GB at full size), remembered across builds by path, size and mtime; the
    same read checks every safetensors tensor for NaN/inf. Cached when every digest came from that memo."""
    cache = ctx.cache
    before = cache.files_hashed

    def digests(kind: str, src: source.Source) -> dict[str, str]:
        facts = {n: cache.file_facts(src.path / n) for n in sorted(src.files)}
        bad = next(((n, f["nonfinite"]) for n, f in facts.items() if f["nonfinite"]), None)
        if bad:
            raise InvalidCheckpointError(f"{kind} {src.ref}: tensor '{bad[1]}' in {bad[0]} holds NaN or inf "
                                         f"values: the checkpoint is damaged or diverged in training; download or "
                                         f"save it again (or pass the last good checkpoint)")
        return {n: f["sha256"] for n, f in facts.items()}
    found = {"model": digests("model", ctx.inputs["model"]),
             "adapters": {n: digests("adapter", a) for n, a in ctx.inputs["adapters"].items()}}
    return Hit(found, cache.files_hashed == before)


def _merge_key(ctx: Context, v: Variant) -> dict:
    d = ctx["hash inputs"]
    return {"v": __version__, "model": d["model"], "adapter": d["adapters"].get(v.adapter),
            "allow_noop": ctx.req.allow_noop_adapter}


def _merge(ctx: Context, d: Path, v: Variant) -> None:
    from . import merge
    from .checks import reference
    model, adapter, config = ctx.inputs["model"], ctx.inputs["adapters"].get(v.adapter), ctx.inputs["config"]
    # Each in its own process: the merge's model copy is gone before the reference loads the merged one.
    proof = isolated(merge.merge, model, adapter, config, d / "merged", allow_noop=ctx.req.allow_noop_adapter)
    (d / "proof.json").write_text(json.dumps(merge.proof_dict(proof), indent=2))
    isolated(reference.reference, d / "merged", config, d / "reference.npz")


def docs_digest(cache: StageCache, docs: Path, follow_links: bool) -> dict[str, str]:
    """What the documents stage reads, by content: the same listing the retriever indexes (symbolic links out of
    the folder are skipped and count by their reason, never read)."""
    from .retriever.ingest import list_files
    found, skipped = list_files(docs, follow_links=follow_links)
    out = {p.relative_to(docs).as_posix(): cache.digest(p) for p in found}
    out.update({s.path: f"skipped: {s.reason}" for s in skipped})
    return out


def _retriever_key(ctx: Context) -> dict:
    return {"docs": docs_digest(ctx.cache, Path(ctx.req.docs), ctx.req.follow_links), "v": __version__}


def _retriever(ctx: Context, d: Path) -> None:
    from .retriever.build import build_index
    build_index(Path(ctx.req.docs), d / "retriever", threads=ctx.req.threads, follow_links=ctx.req.follow_links)


def _smoke_key(ctx: Context, v: Variant) -> dict:
    r = ctx.req
    return {"merge": ctx[v.stage("merge")].name, "retriever": ctx["retriever"].parent.name, "q": r.smoke_question,
            "needle": r.smoke_needle, "answer": r.smoke_answer, "n": SMOKE_TOKENS}


def _smoke_reference(ctx: Context, d: Path, v: Variant) -> None:
    from .checks.smoke import smoke_reference
    r = ctx.req
    smoke_reference(ctx[v.stage("merge")] / "merged", ctx["retriever"], d / "smoke.json", question=r.smoke_question,
                    needle=r.smoke_needle, fact=r.smoke_answer, n_tokens=SMOKE_TOKENS)


def _checkpoint(ctx: Context, v: Variant) -> Path:
    """What a variant's artifacts are exported from: its merged checkpoint; the base artifacts, from the model."""
    return ctx.inputs["model"].path if v is BASE else ctx[v.stage("merge")] / "merged"


def _source_key(ctx: Context, fmt: str, v: Variant) -> dict:
    """What an export of `v` is made from: the base model (with the format's base settings) or its merge."""
    return {"model": ctx["hash inputs"]["model"], "settings": exporters.get(fmt).BASE_SETTINGS} if v is BASE \
        else {"merge": ctx[v.stage("merge")].name}


def _export_key(ctx: Context, fmt: str, precs: list[str], v: Variant) -> dict:
    key = {**_source_key(ctx, fmt, v), "format": fmt, "precisions": precs, "v": __version__}
    if _calibration(ctx, fmt, precs) is not None:
        key["calibration"] = docs_digest(ctx.cache, Path(ctx.req.docs), ctx.req.follow_links)
        key["calibration_tokens"] = ctx.req.calibration_tokens
    return key


def _calibration(ctx: Context, fmt: str, precs: list[str]) -> Path | None:
    """Data-aware quantization (OpenVINO int4-awq / -se) calibrates on the build's own documents."""
    return ctx.req.docs if ctx.req.docs is not None and exporters.get(fmt).calibrates(precs) else None


def _export(ctx: Context, d: Path, fmt: str, precs: list[str], v: Variant) -> None:
    settings: dict = {"threads": ctx.req.threads, **(exporters.get(fmt).BASE_SETTINGS if v is BASE else {})}
    if exporters.get(fmt).PREPARES:
        settings["prepared"] = ctx[v.stage(f"prepare {fmt}")]
    if _calibration(ctx, fmt, precs) is not None:
        settings["calibration_text"] = calibration_text(Path(ctx.req.docs), ctx.req.follow_links)
        settings["calibration_tokens"] = ctx.req.calibration_tokens
    arts = exporters.get(fmt).export(_checkpoint(ctx, v), d, precs, settings)
    (d / "artifacts.json").write_text(json.dumps(
        [{"format": a.format, "precision": a.precision, "path": str(a.path.relative_to(d)), "files": list(a.files),
          "meta": a.meta} for a in arts], indent=2))


def _adapter_key(ctx: Context, fmt: str, v: Variant) -> dict:
    d = ctx["hash inputs"]
    return {"model": d["model"], "adapter": d["adapters"][v.adapter], "format": fmt, "v": __version__}


def _export_adapter(ctx: Context, d: Path, fmt: str, v: Variant) -> None:
    """The adapter as its runtime loads it beside a base artifact of this format (Exporter.export_adapter)."""
    base, adapter = ctx.inputs["model"].path, ctx.inputs["adapters"][v.adapter].path
    files = exporters.get(fmt).export_adapter(base, adapter, d)
    # Its own chat template travels with it: a runtime applying it renders prompts with it (Runtime.use_adapter).
    files = [*files, *(f for f in tokenizer_files.apply(adapter, base, d) if f not in files)]
    (d / "files.json").write_text(json.dumps(list(files)))


def adapter_artifact(ctx: Context, c: Check) -> exporters.Artifact | None:
    if c.adapter is None:
        return None
    folder = ctx[c.adapter]
    return exporters.Artifact(format=c.fmt, precision="adapter", path=folder,
                              files=tuple(json.loads((folder / "files.json").read_text())))


def calibration_text(docs: Path, follow_links: bool = False) -> list[str]:
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


def artifact(ctx: Context, fmt: str, precision: str, export: str) -> exporters.Artifact:
    """One precision's artifact of the export stage `export`."""
    folder = ctx[export]
    for a in json.loads((folder / "artifacts.json").read_text()):
        if a["precision"] == precision:
            return exporters.Artifact(format=a["format"], precision=a["precision"], path=folder / a["path"],
                                      files=tuple(a["files"]), meta=a["meta"])
    raise RuntimeError(f"export {fmt} wrote no {precision} artifact")


def long_span(req: BuildRequest, c: Check) -> bool:
    """Whether a check measures the long regime on the long probe's span (phiedge.checks.probes), on runtimes
    that take position spans: every check of an export but its first, i.e. every precision of a format but its
    first and, on a base kept separate, every adapter but the first. The first keeps the real long prefill: the
    one measurement that catches a chunked or split prefill or a rope error growing with token distance, once per
    export's rope (its precisions share it, and an adapter changes no rope)."""
    from . import runtimes
    later = c.precision != req.formats[c.fmt][0] or (c.adapter is not None and c.v.adapter != next(iter(req.adapters)))
    return later and runtimes.get(c.fmt).POSITION_SPANS


def _check_key(ctx: Context, c: Check) -> dict:
    from .worker import exact_retry
    smoke = ctx.outputs.get(c.v.stage("smoke reference"))
    retry = exact_retry(artifact(ctx, c.fmt, c.precision, c.export))  # re-measured or not depends on the limits
    key = {"export": ctx[c.export].name, "precision": c.precision,
           "smoke": smoke.parent.name if smoke else None, "reference": ctx[c.v.stage("merge")].name,
           "long_span": long_span(ctx.req, c),
           "retry_limits": _limits(ctx, c.precision).as_dict() if retry else None}
    if c.adapter:
        key["adapter"] = ctx[c.adapter].name
    return key


def _limits(ctx: Context, precision: str) -> Limits:
    return Limits.for_precision(precision, ctx.req.thresholds)


def _measure(ctx: Context, d: Path, c: Check) -> None:
    from .worker import measure_files
    adapter = adapter_artifact(ctx, c)
    measure_files(artifact(ctx, c.fmt, c.precision, c.export), ctx[c.v.stage("merge")] / "reference.npz",
                  ctx.outputs.get(c.v.stage("smoke reference")), ctx.req.threads, d, _limits(ctx, c.precision),
                  long_span=long_span(ctx.req, c),
                  settings={"adapter": str(adapter.path)} if adapter else None)


def _result(ctx: Context, d: Path, c: Check) -> ArtifactResult:
    from .worker import result_of
    r = dataclasses.replace(result_of(artifact(ctx, c.fmt, c.precision, c.export), _limits(ctx, c.precision), d),
                            adapter=c.v.adapter, suffix=c.v.suffix, adapter_files=adapter_artifact(ctx, c))
    _log_result(r)
    return r


def _bundle(ctx: Context) -> dict:
    """Assemble `<out>.partial/`: artifacts, retriever, golden references, reports, manifest (signed when the
    gate passed and a key was given). Returns the report."""
    req, model, adapters = ctx.req, ctx.inputs["model"], ctx.inputs["adapters"]
    out, clock, variants_ = ctx.inputs["out"], ctx.inputs["clock"], ctx.inputs["variants"]
    work = out.with_name(out.name + ".partial")
    results, digests = _results(ctx), ctx["hash inputs"]
    smoke = ctx.outputs.get(variants_[0].stage("smoke reference"))
    question = json.loads(smoke.read_text()) if smoke else None       # the same question and chunks for every variant
    if question and len(variants_) > 1:
        question.pop("reference_answer", None)                             # each artifact's row holds its own reference
    proofs = {v.adapter: json.loads((ctx[v.stage("merge")] / "proof.json").read_text()) for v in variants_}
    rep = report.build_report(model=model, adapters=adapters, proofs=proofs, results=results,
                              timings=clock.timings, peaks_mb=clock.peaks_mb,
                              config=ctx.inputs["config"], target=req.target,
                              smoke_question=question, hub_id=_hub_id(ctx),
                              cache={"hits": ctx.cache.hits, "ran": ctx.cache.ran, "rebuilt": ctx.cache.rebuilt})
    named = {n: {"ref": a.ref, "revision": a.revision, "files": digests["adapters"][n]} for n, a in adapters.items()}
    sources = {"model": {"ref": model.ref, "revision": model.revision, "files": digests["model"]},
               "adapter": next(iter(named.values())) if len(named) == 1 else None, "adapters": named}
    try:
        bundle.assemble(work, results=results,
                        references={v.suffix: ctx[v.stage("merge")] / "reference.npz" for v in variants_},
                        retriever=ctx.outputs.get("retriever"), report=rep, source_info=sources, target=req.target,
                        sign_key=req.sign_key if rep["passed"] else None,
                        phi_templates={v.adapter: ollama.is_phi(*chat.load_template(ctx[v.stage("merge")] / "merged"))
                                       for v in variants_},
                        own_templates=frozenset(n for n, p in proofs.items()
                                                if (p.get("tokenizer") or {}).get("source") == "adapter"),
                        longrope_switch=probes.switch_point(ctx.inputs["config"]))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            shutil.rmtree(work, ignore_errors=True)        # nothing half-written stays behind
        raise
    return rep


def _hub_id(ctx: Context) -> str | None:
    """The base model's Hub id for the bundle's card (phiedge.card.base_model_id)."""
    from .card import base_model_id
    model, adapters = ctx.inputs["model"], ctx.inputs["adapters"].values()
    configs = [json.loads((a.path / "adapter_config.json").read_text()) for a in adapters]
    return base_model_id(model.ref, model.path, configs, ctx.req.base_model_id)


# ------------------------------------------------------------------------------------------ cheap checks

def _cheap_checks(req: BuildRequest, out: Path) -> dict:
    """Nothing heavy runs before all of these pass; every shortfall of the exports is listed at once. What they
    found, for the build's context: model, adapters (name -> Source), variants, config, n_params, each stage's peak
    estimate, the budget."""
    if not bundle.is_bundle(out):          # rebuilding our own bundle in place is allowed
        source.prepare_out(out, force=req.force)
    if req.docs is not None:
        _check_docs(Path(req.docs), req.follow_links)
    if req.sign_key is not None:
        bundle.load_key(req.sign_key, private=True)
    model = source.resolve(req.model, revision=req.revision, kind="model")
    config = source.check_model(model)
    _check_adapter_mode(req)
    if req.adapter_revision and len(req.adapters) != 1:
        raise UsageError(f"--adapter-revision names the revision of one adapter, and this build has "
                         f"{len(req.adapters)}: pass it with a single --adapter")
    adapters = {}
    for name, ref in req.adapters.items():
        adapters[name] = source.resolve(ref, revision=req.adapter_revision, kind="adapter")
        acfg = source.check_adapter(adapters[name], model, config)
        tokenizer_files.check_vocabulary(adapters[name].path, model.path, name)
        if req.adapter_mode != "merged":
            _check_separable(adapters[name], acfg, name, req.formats)
    n_params = source.param_count(model)
    peaks, budget = stage_peaks(req.formats, n_params, config, docs=_smokes(req)), memory_budget(req)
    preflight(req.formats, peaks, budget, calibration=req.docs is not None)
    weight_bytes = sum(v for k, v in model.files.items() if k.endswith(".safetensors"))
    copies = max(1, len(req.adapters))    # a merged checkpoint and an artifact set per adapter
    exports = copies * sum(exporters.get(f).estimate_bytes(n_params, p) for f, p in req.formats.items())
    cache_root = Path(req.cache_dir) if req.cache_dir else default_root()
    # The cache holds the merged checkpoint and the exporters' intermediates (a 16-bit GGUF while it quantizes;
    # OpenVINO's traced IR, kept as its prepare stage) beside the artifacts; the bundle copies the artifacts.
    kept = sum(copies * weight_bytes for f in req.formats if exporters.get(f).PREPARES)
    source.check_disk([(cache_root, (1 + copies) * weight_bytes + kept + exports),
                       (out.parent if not out.exists() else out, int(exports * 1.05))])
    return {"model": model, "adapters": adapters, "variants": variants(req.adapters, req.adapter_mode),
            "config": config,
            "n_params": n_params, "peaks": peaks, "budget": budget}


def _check_adapter_mode(req: BuildRequest) -> None:
    if req.adapter_mode not in ADAPTER_MODES:
        raise UsageError(f"--adapter-mode {req.adapter_mode!r} is not one of {', '.join(ADAPTER_MODES)}")
    if req.adapter_mode == "merged":
        return
    if req.auto:
        raise UsageError(f"precision \"auto\" ({', '.join(req.auto)}) chooses per merged model, and --adapter-mode "
                         f"{req.adapter_mode} shares one base artifact between adapters: name a precision for "
                         f"{', '.join(req.auto)} with its precision flag, or build with --adapter-mode merged")
    if not req.adapters:
        raise UsageError(f"--adapter-mode {req.adapter_mode} keeps adapters separate from the base, and no --adapter "
                         f"was given: pass --adapter NAME=PATH")
    cannot = [f for f in req.formats if exporters.get(f).ADAPTER_RUNTIME is None]
    if cannot:
        can = [n for n, cls in sorted(exporters.REGISTRY.items()) if cls.ADAPTER_RUNTIME]
        raise UsageError(f"--adapter-mode {req.adapter_mode}: {', '.join(cannot)} cannot keep an adapter separate from "
                         f"its base yet (only {', '.join(can)} can): leave {', '.join(cannot)} out of --formats, or "
                         f"build with --adapter-mode merged")


def _check_separable(adapter: source.Source, acfg: dict, name: str, formats: dict) -> None:
    """What a runtime's LoRA file cannot hold (DoRA, LoRA biases, saved modules), refused from the headers and
    `acfg` (its adapter_config.json, as source.check_adapter read it)."""
    from .adapters import refuse_unfoldable
    names = list(source.safetensors_header(adapter.path / "adapter_model.safetensors"))
    for fmt in formats:
        try:
            cls = exporters.get(fmt)
            refuse_unfoldable(acfg, names, cls.ADAPTER_RUNTIME, dora=cls.ADAPTER_DORA)
        except UnsupportedAdapterError as e:
            raise UnsupportedAdapterError(f"adapter {name} ({adapter.ref}): {e}") from None


def stage_format(stage: str) -> str | None:
    """The format a prepare, export or check stage is of ("export gguf Q4_K_M", "check gguf Q4_K_M"), else None."""
    kind, *rest = stage.split()
    return rest[0] if kind in ("prepare", "export", "check") and rest else None


def memory_shortfalls(peaks: dict[str, int], budget: int) -> dict[str, str]:
    """Stage -> why it cannot run within `budget` bytes, for every stage estimated to need more on its own."""
    def leave_out(stage: str) -> str:
        fmt = stage_format(stage)
        return f", or leave {fmt} out of --formats" if fmt else ""
    return {s: (f"the {s} stage of this model needs about {need / 1e9:.1f} GB of memory at its peak, more than the "
                f"build's --max-memory {budget / 1e9:.1f} GB (default: {MEMORY_SHARE:.0%} of the memory available): "
                f"raise --max-memory, free memory, or build on a machine with more{leave_out(s)}")
            for s, need in peaks.items() if need > budget}


def preflight(formats: dict[str, list[str]], peaks: dict[str, int], budget: int, *, calibration: bool) -> None:
    """Every reason the build cannot run here (a missing toolchain, an option that needs --docs, a stage that
    needs more memory than --max-memory), all named in one line before any work; memory alone is a
    MemoryShortError."""
    lines = [p for fmt, precs in formats.items()
             for p in exporters.get(fmt).preflight(precs, calibration=calibration)]
    short = list(memory_shortfalls(peaks, budget).values())
    lines += short
    if not lines:
        return
    msg = lines[0] if len(lines) == 1 else f"{len(lines)} problems: " + "; ".join(
        f"({i}) {p}" for i, p in enumerate(lines, 1))
    raise (MemoryShortError if len(short) == len(lines) else UsageError)(msg)


def _check_docs(docs: Path, follow_links: bool) -> None:
    """A documents folder that gives the retriever nothing is refused before the merge, not after it."""
    if not docs.is_dir():
        raise UsageError(f"--docs {docs} is not a folder: pass the folder of documents for the retriever")
    from .retriever.ingest import list_files, no_documents_message
    found, skipped = list_files(docs, follow_links=follow_links)
    if not found:
        raise RetrieverError(no_documents_message(docs, skipped))


def check_artifact(a: exporters.Artifact, reference: Path, threads: int, overrides: dict | None,
                   workdir: Path, *, long_span: bool = False) -> ArtifactResult:
    """Parity of one artifact outside a build (no cache): measure in a child process (again with its runtime's
    exact settings if it fails with its own), judge."""
    from .worker import measure_files, result_of
    folder, limits = workdir / f"check-{a.format}-{a.precision}", Limits.for_precision(a.precision, overrides)
    measure_files(a, reference, None, threads, folder, limits, long_span=long_span)
    return result_of(a, limits, folder)


def _log_result(r: ArtifactResult) -> None:
    def fmt(m):
        return "n/a" if m is None else f"top1 {m.top1:.3f} kl {m.kl:.2g} max|Δ| " + \
            ("-" if m.max_abs is None else f"{m.max_abs:.3g}")
    m = r.measurement
    log.info("  %-16s short: %s | long: %s  %s", r.label, fmt(m.regime("short")),
             fmt(m.regime("long")), "PASS" if r.passed else "FAIL: " + "; ".join(r.verdict.failures))
    if r.own_settings_failures:
        log.warning("  %s %s failed with the settings it was exported with (%s) and passed with its runtime's "
                    "exact ones %s: it ships with those", r.artifact.format, r.artifact.precision,
                    "; ".join(r.own_settings_failures), json.dumps(r.settings))

