"""The `phiedge` command: thin click wrappers over the library; `main()` turns known errors into one line."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from . import logs
from .calibration import DEFAULT_TOKENS as DEFAULT_CALIBRATION_TOKENS
from .errors import ParityError, PhiedgeError, ToolCallError, UsageError

log = logging.getLogger("phiedge")


def _split(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log every step (library and converters).")
def cli(verbose: bool) -> None:
    """Merge a LoRA into Phi-4-mini, export edge artifacts, and prove each one behaves like the source."""
    logs.configure(verbose)


def precision_options(f):
    """One precision flag per registered exporter (and its modifiers), from the exporter's own declaration:
    adding a format adds no lines here."""
    from . import exporters
    for name, cls in sorted(exporters.REGISTRY.items(), reverse=True):
        for flag, mod in cls.CLI_MODIFIERS.items():
            f = click.option(flag, f"{name}__{mod.group}", type=click.Choice(list(mod.choices)), default=None,
                             help=mod.help)(f)
        f = click.option(cls.CLI_FLAG, f"{name}__precisions", multiple=True,
                         help=f"{cls.CLI_HELP} (default {cls.DEFAULT_PRECISION}); comma-separated or repeated.")(f)
    return f


class MemorySize(click.ParamType):
    """A byte count: 10G, 512M, 12GB, 1.5T, or a share of the memory available now: 60%."""
    name = "size"
    UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        import re
        text = str(value).strip().upper()
        if m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text):
            from .memory import available_bytes
            return int(float(m.group(1)) / 100 * available_bytes())
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", text)
        if not m or float(m.group(1)) <= 0:
            self.fail(f"{value!r} is not a memory size: give e.g. 10G, 512M or 60%", param, ctx)
        return int(float(m.group(1)) * self.UNITS[m.group(2)])


def _options(*opts):
    """Apply several click options, in the order listed (shared by `build` and `sweep`)."""
    def apply(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return apply


MODEL_OPTIONS = _options(
    click.option("--model", default="microsoft/Phi-4-mini-instruct", show_default=True,
                 help="Base model: a local Hugging Face directory or a Hub repo id."),
    click.option("--revision", default=None, help="Hub commit, branch or tag of --model."),
    click.option("--adapter", "adapters", multiple=True,
                 help="PEFT LoRA adapter: a local directory or a Hub repo id, as NAME=PATH or PATH (named after its "
                      "folder); repeat for several, each merged into its own artifacts (none: export the base)."),
    click.option("--adapter-revision", default=None, help="Hub commit, branch or tag of --adapter (one adapter)."))
RUN_OPTIONS = _options(
    click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                 help="Stage cache (default $PHIEDGE_CACHE/stages or ~/.cache/phiedge/stages)."),
    click.option("--threads", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True,
                 help="CPU threads for runtimes."),
    click.option("--max-memory", type=MemorySize(), default=None,
                 help="Memory the build's stages may hold at once, e.g. 10G or 60% (default: 80% of what is "
                      "available); a stage estimated to need more is refused up front, stages run side by side "
                      "within it."),
    click.option("--jobs", type=click.IntRange(min=1), default=None,
                 help="Stages at most side by side, each with --threads (default: CPUs // threads)."),
    click.option("--follow-links", is_flag=True,
                 help="Also read what symbolic links out of --docs point to (skipped and reported by default)."),
    click.option("--calibration-tokens", type=click.IntRange(min=256), default=DEFAULT_CALIBRATION_TOKENS,
                 show_default=True,
                 help="Tokens of --docs that data-aware quantization reads (GGUF '-imat'), drawn across the "
                      "documents (at Phi-4-mini size about 10 minutes of PyTorch on 2 cores for the default)."))


@cli.command()
@MODEL_OPTIONS
@click.option("--adapter-mode", type=click.Choice(["merged", "separate", "both"]), default="merged", show_default=True,
              help="merged: each adapter merged into its own artifacts; separate: the base's artifacts once plus each "
                   "adapter as its runtime applies it (adapters/<name>/<format>/, on every format); both: both.")
@click.option("--target", default=None,
              help="Device profile from targets/ (`phiedge targets`) or a .toml file; chooses formats and precisions "
                   "(a precision flag replaces the profile's precisions of that format).")
@click.option("--formats", "formats", multiple=True,
              help="Artifacts to build, comma-separated or repeated (default gguf); with --target, keep only these.")
@precision_options
@click.option("--docs", type=click.Path(path_type=Path), default=None,
              help="Documents for the embedded retriever; enables the smoke RAG query on every runtime.")
@click.option("--smoke-question", default=None, help="Question whose answer is in --docs (default: derived from them).")
@click.option("--smoke-needle", default=None, help="Text the chunk answering --smoke-question contains.")
@click.option("--smoke-answer", default=None,
              help="A fact every artifact's answer must contain (a real model); without it, answers are held "
                   "to PyTorch's tokens.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output bundle directory.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out that is not a phiedge bundle.")
@RUN_OPTIONS
@click.option("--allow-noop-adapter", is_flag=True, help="Ship even if the adapter does not change the model's outputs.")
@click.option("--verify-cache", is_flag=True,
              help="Re-hash every cached stage before using it (default: sizes and mtimes, re-hashing changed files).")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path), default=None,
              help="Ed25519 private key (`phiedge keygen`): sign the bundle's manifest.")
@click.option("--base-model-id", default=None,
              help="The Hub id the bundle's model card names as base_model (default: --model's Hub id, its config's "
                   "recorded name, or the adapter's base_model_name_or_path).")
def build(model, revision, adapters, adapter_revision, adapter_mode, target, formats, docs, smoke_question, smoke_needle,
          smoke_answer, out, force, cache_dir, threads, max_memory, jobs, allow_noop_adapter, verify_cache,
          follow_links, calibration_tokens, sign_key, base_model_id, **precision_flags):
    """Merge, export, check parity in both LongRoPE regimes, smoke-test RAG, and write the bundle."""
    from .build import BuildRequest
    from .build import build as run_build
    from .report import table
    from .source import name_adapters
    from .targets import resolve_plan
    plan, profile = resolve_plan(target, _split(formats), _precision_flags(precision_flags))
    rep = run_build(BuildRequest(model=model, adapters=name_adapters(adapters), adapter_mode=adapter_mode,
                                 formats=plan, out=out, revision=revision, adapter_revision=adapter_revision,
                                 force=force, threads=threads, allow_noop_adapter=allow_noop_adapter, docs=docs,
                                 smoke_question=smoke_question, smoke_needle=smoke_needle,
                                 smoke_answer=smoke_answer, cache_dir=cache_dir, verify_cache=verify_cache,
                                 follow_links=follow_links, sign_key=sign_key, max_memory=max_memory, jobs=jobs,
                                 calibration_tokens=calibration_tokens, base_model_id=base_model_id,
                                 **(profile.request_fields(plan) if profile else {})))
    click.echo(table(rep))
    click.echo(f"built {out} (report: {out / 'report.html'})")


@cli.command()
@MODEL_OPTIONS
@click.option("--docs", type=click.Path(path_type=Path), required=True,
              help="Documents the data-aware candidates calibrate on (the bundle's own).")
@click.option("--formats", "formats", multiple=True, required=True,
              help="Formats to sweep, comma-separated or repeated.")
@click.option("--candidates", "given", multiple=True,
              help="FORMAT=P1,P2,... to sweep instead of the format's default candidates (repeat per format); the "
                   "tool's own default 4-bit is always measured too.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for sweep.json and sweep.html.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out that holds no sweep.")
@RUN_OPTIONS
def sweep(model, revision, adapters, adapter_revision, docs, formats, given, out, force, cache_dir, threads,
          max_memory, jobs, follow_links, calibration_tokens):
    """Build and check each format's 4/5/8-bit candidates, measure KL, top-1 and size (also at Phi-4-mini's
    proportions) against the tool's own default 4-bit, and write sweep.json and sweep.html with the Pareto front."""
    from . import sweep as sweep_mod
    from .build import BuildRequest
    from .errors import UsageError
    from .source import name_adapters
    named = name_adapters(adapters)
    if len(named) > 1:
        raise UsageError("phiedge sweep measures one fine-tune at a time: pass one --adapter")
    wanted: dict[str, list[str]] = {}
    for g in given:
        fmt, sep, precs = g.partition("=")
        if not sep or not _split((precs,)):
            raise UsageError(f"--candidates {g!r}: write FORMAT=P1,P2,... (e.g. gguf=Q4_K_M-imat,Q5_K_S-imat)")
        wanted.setdefault(fmt.strip(), []).extend(_split((precs,)))
    fmts = _split(formats)
    stray = sorted(set(wanted) - set(fmts))
    if stray:
        raise UsageError(f"--candidates names {stray[0]}, which is not in --formats: add it to --formats")
    sweep_mod.prepare(out, force)
    req = BuildRequest(model=model, adapters=named, revision=revision, adapter_revision=adapter_revision,
                       formats=sweep_mod.candidates(fmts, wanted), out=out, docs=docs, cache_dir=cache_dir,
                       threads=threads, max_memory=max_memory, jobs=jobs, follow_links=follow_links,
                       calibration_tokens=calibration_tokens)
    result = sweep_mod.run(req, out)
    click.echo(sweep_mod.table(result))
    click.echo(f"wrote {out / 'sweep.json'} and {out / 'sweep.html'}")


@cli.command()
@click.argument("matrix_file", type=click.Path(path_type=Path))
@click.option("--ray-address", default=None,
              help="Ray cluster to run on: auto, HOST:PORT or ray://HOST:10001 (default: a local Ray started in this "
                   "process, bound to 127.0.0.1).")
@click.option("--max-parallel", type=click.IntRange(min=1), default=None,
              help="Tasks at most at once (default: as many as Ray can place by their memory and CPUs).")
@click.option("--dry-run", is_flag=True, help="Print the stage graph: what is cached, what runs, what each task reserves.")
def matrix(matrix_file, ray_address, max_parallel, dry_run):
    """Build one bundle per (adapter, target) of MATRIX_FILE on Ray, every shared stage once: matrix.toml names the
    model, [adapters], targets, docs and out (bundles in out/<adapter>/<target>/, plus matrix.json and
    matrix.html). A failed cell fails alone; running the same command again resumes from the cache."""
    from . import cluster
    from . import matrix as matrix_mod
    spec = matrix_mod.load(matrix_file)
    try:
        summary = matrix_mod.run(spec, address=ray_address, max_parallel=max_parallel, dry_run=dry_run)
    finally:
        cluster.shutdown()
    if dry_run:
        for t in summary["tasks"]:
            click.echo(f"{t['state']:9} {t['stage']:34} {t['memory_gb']:6.2f} GB {t['cpus']} CPU  "
                       f"{', '.join(t['cells'])}")
        return
    click.echo(matrix_mod.table(summary))
    click.echo(f"wrote {spec.out / 'matrix.json'} and {spec.out / 'matrix.html'}")
    if not summary["passed"]:
        failed = [c for c in summary["cells"] if not c["passed"]]
        raise ParityError(f"{len(failed)} of {len(summary['cells'])} matrix cells failed: "
                          + "; ".join(f"{c['adapter']}/{c['target']}: {c['error']}" for c in failed))


def _precision_flags(flags: dict) -> dict[str, tuple[list[str], dict[str, str]]]:
    """{format: (precisions given, {option group: token to add where none is named})} from the generated
    options, for the formats whose flags were given."""
    from . import exporters
    out = {}
    for name, cls in exporters.REGISTRY.items():
        precs = _split(flags.get(f"{name}__precisions") or ())
        mods = {m.group: m.token.format(flags[f"{name}__{m.group}"]) for m in cls.CLI_MODIFIERS.values()
                if flags.get(f"{name}__{m.group}")}
        if precs or mods:
            out[name] = (precs, mods)
    return out


@cli.command()
def formats():
    """List the export formats and their precisions."""
    from . import exporters
    for name, cls in sorted(exporters.REGISTRY.items()):
        exp = cls()
        click.echo(f"{name:10} {', '.join(exp.PRECISIONS)} (default {exp.DEFAULT_PRECISION}; {exp.CLI_FLAG})")


@cli.command("targets")
def targets_cmd():
    """List the device target profiles."""
    from . import exporters
    from . import targets as targets_mod
    for name in targets_mod.available():
        t = targets_mod.load(name)
        arts = ", ".join(f"{a.format} {a.precision}" + ("" if a.format in exporters.REGISTRY else " (not available)")
                         for a in t.artifacts)
        click.echo(f"{name:14} {arts}  [{t.runtime.device}, {t.runtime.threads} threads, ctx {t.runtime.n_ctx}]")


KEY_OPTION = click.option("--key", type=click.Path(path_type=Path), default=None,
                          help="Ed25519 public key: refuse the bundle unless its manifest is signed by it.")


@cli.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@KEY_OPTION
def verify(bundle_dir, key):
    """Re-hash every file of a bundle against its manifest (and check its signature with --key)."""
    from . import bundle
    m = bundle.verify(bundle_dir, key)
    click.echo(f"ok: {len(m['files'])} files match {bundle_dir / bundle.MANIFEST}; "
               f"{bundle.signature_state(bundle_dir, key)}")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
def keygen(path):
    """Write an Ed25519 key pair: PATH (private, mode 0600) and PATH.pub (public), both PEM."""
    from . import bundle
    private, public = bundle.keygen(path)
    click.echo(f"private key {private} (keep it secret), public key {public} (give it to devices)")


@cli.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--key", type=click.Path(path_type=Path), required=True, help="Ed25519 private key (`phiedge keygen`).")
def sign(bundle_dir, key):
    """Sign a verified bundle's manifest: writes BUNDLE_DIR/manifest.json.sig."""
    from . import bundle
    bundle.verify(bundle_dir)
    click.echo(f"signed: {bundle.sign(bundle_dir, key)}")


# The options every device-side answer takes (ask, chat).
ANSWER_OPTIONS = _options(
    click.option("--runtime", default=None,
                 help="Which artifact answers: gguf, onnx, openvino, mlx (default: first installed)."),
    click.option("--adapter", default=None,
                 help="Whose artifact answers, in a bundle built with several adapters (their --adapter names)."),
    click.option("-k", "k", type=click.IntRange(min=0), default=3, show_default=True,
                 help="Chunks to retrieve (0: none, the question alone)."),
    click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
                 help="Longest answer in tokens."),
    click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
                 help="0: greedy (the answer the gate proved); above it, sampled."),
    click.option("--top-p", type=click.FloatRange(min=0, min_open=True, max=1), default=1.0, show_default=True,
                 help="Sample within the smallest set of tokens this likely."),
    click.option("--seed", type=int, default=None, help="Seed for sampling: the same seed, the same answer."),
    click.option("--threads", type=click.IntRange(min=1), default=None,
                 help="CPU threads (default: the target profile's)."),
    KEY_OPTION)


@cli.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.argument("question")
@ANSWER_OPTIONS
@click.option("--tools", "tools_file", type=click.Path(path_type=Path), default=None,
              help="JSON list of tools the model may call (Phi-4-mini's format or OpenAI's): calls are parsed and "
                   "checked against each tool's schema.")
@click.option("--json-schema", "schema_file", type=click.Path(path_type=Path), default=None,
              help="JSON schema the answer must follow: generation constrained by the runtime's own mechanism.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, calls, problems, sources, timings.")
def ask(bundle_dir, question, runtime, adapter, k, max_tokens, temperature, top_p, seed, threads, key, tools_file,
        schema_file, as_json):
    """Answer a question from the bundle's documents on the device (verifies the bundle first). The answer streams
    as it is generated, except with --tools, --json-schema or --json: those are checked whole before printing."""
    import json

    from . import tools as tools_mod
    from .device import ask as run_ask
    if tools_file and schema_file:
        raise UsageError("--tools and --json-schema are two kinds of answer: pass one of them")
    tools = tools_mod.load(tools_file) if tools_file else None
    schema = tools_mod.load_schema(schema_file) if schema_file else None
    stream = not (tools or schema or as_json)
    out = run_ask(bundle_dir, question, runtime=runtime, adapter=adapter, k=k, max_new_tokens=max_tokens,
                  threads=threads, key=key, tools=tools, json_schema=schema, stream=stream, temperature=temperature,
                  top_p=top_p, seed=seed)
    if stream:
        for chunk in out:
            click.echo(chunk.text, nl=False)
        a = chunk.answer
        click.echo()
    else:
        a = out
    if as_json:
        click.echo(json.dumps(a.to_json(), indent=1))
    elif a.problems:
        pass                                # never passed on as text: the error below says what is wrong
    elif a.calls:
        for c in a.calls:
            click.echo(f"call {c.name}({json.dumps(c.arguments)})")
    elif not stream:
        click.echo(a.text)
    if a.sources and not as_json and not a.problems:
        click.echo("\nsources:\n  " + "\n  ".join(a.sources))
    click.echo(f"({a.runtime}: first token {a.ttft_s:.2f} s, {a.decode_tps:.1f} tok/s)", err=True)
    if a.problems:
        what = "the answer does not follow the JSON schema" if schema else "the answer's tool call is rejected"
        raise ToolCallError(f"{what}: {'; '.join(a.problems)}")


@cli.command("chat")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@ANSWER_OPTIONS
@click.option("--system", default=None, help="Your own system message (the retrieved context is added after it).")
def chat_cmd(bundle_dir, runtime, adapter, k, max_tokens, temperature, top_p, seed, threads, key, system):
    """Hold a conversation with the bundle in the terminal: streamed answers, their sources after each; /reset,
    /adapter NAME, /sources, /quit. Reads one turn per line from a pipe too."""
    from . import session, terminal
    interactive = sys.stdin.isatty()
    with session.open(bundle_dir, runtime=runtime, adapter=adapter, key=key, threads=threads) as s:
        if interactive:
            click.echo(f"{s.label} · {terminal.HELP}", err=True)
        failed = terminal.converse(
            s, sys.stdin, lambda text, nl=True, err=False: click.echo(text, nl=nl, err=err),
            prompt=(lambda: click.echo("> ", nl=False, err=True)) if interactive else None, system=system,
            k=k, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if failed:
        raise UsageError(f"{failed} turn(s) of the conversation failed (their errors are above)")


@cli.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--runtime", default=None, help="The default model's artifact: gguf, onnx, openvino, mlx, or a folder "
                                               "(default: the first installed). Every servable model stays reachable.")
@click.option("--adapter", default=None, help="The default model's adapter, in a bundle built with several.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; other than loopback needs --api-key (or --insecure-no-auth).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="PHIEDGE_API_KEY",
              help="Require `Authorization: Bearer KEY` on every /v1 route and /metrics (or PHIEDGE_API_KEY).")
@click.option("--queue", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests that may wait for their model; past it, 429.")
@click.option("--max-loaded", type=click.IntRange(min=1), default=2, show_default=True,
              help="Models kept loaded; the least recently used idle one is unloaded first.")
@click.option("--insecure-no-auth", is_flag=True, help="Serve a non-loopback --host without an API key.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: the target profile's).")
@KEY_OPTION
def serve(bundle_dir, runtime, adapter, host, port, api_key, queue, max_loaded, insecure_no_auth, threads, key):
    """Serve the bundle as an OpenAI-compatible API (chat completions streamed or whole, tools, JSON schemas,
    embeddings, retrieval), verified before the first request."""
    from .serve import run
    run(bundle_dir, host=host, port=port, runtime=runtime, adapter=adapter, api_key=api_key, key=key, queue=queue,
        max_loaded=max_loaded, insecure_no_auth=insecure_no_auth, threads=threads)


@cli.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: the target profile's).")
@click.option("--artifact", "artifacts", multiple=True,
              help="Validate only this artifact folder (e.g. gguf-Q4_K_M; repeat for several; default: all).")
@click.option("--adapter", default=None, help="Validate only this adapter's artifacts (default: every adapter's).")
@KEY_OPTION
def validate(bundle_dir, threads, artifacts, adapter, key):
    """On the device: check every artifact whose runtime is installed against the golden references."""
    from .device import validate as run_validate
    rep = run_validate(bundle_dir, threads=threads, key=key, only=list(artifacts) or None, adapter=adapter)
    for r in rep["artifacts"]:
        name = r["path"] + (f" + {r['adapter_path']}" if r.get("adapter_path") else "")
        if r["status"] == "not validated":
            click.echo(f"{name:16} not validated: {r['reason']}")
        else:
            click.echo(f"{name:16} {r['status']}: short top1 {r['parity']['short']['top1']:.3f}"
                       + (f", long top1 {r['parity']['long']['top1']:.3f}" if r["parity"].get("long") else "")
                       + f"; {r['decode_tps']:.1f} tok/s, first token {r['ttft_s']:.2f} s"
                       + ("" if not r["failures"] else "; " + "; ".join(r["failures"])))
    click.echo(f"device report: {rep['path']}")
    if not rep["passed"]:
        raise ParityError("validation failed on this device: see " + rep["path"])


@cli.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--repo", required=True, help="Hub repository ORG/NAME (created if missing).")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", default=None, help="Branch to commit to (created if missing; default: main).")
@click.option("--per-artifact", is_flag=True,
              help="One repository per format (ORG/NAME-GGUF, -ONNX, -OpenVINO, -MLX), each with its own card.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`'s).")
@click.option("--dry-run", is_flag=True, help="Print what would go where (JSON) and upload nothing.")
@KEY_OPTION
def push(bundle_dir, repo, private, revision, per_artifact, token, dry_run, key):
    """Publish a verified, passing bundle to the Hugging Face Hub (its README.md is the model card)."""
    import json

    from .publish import plan_push
    from .publish import push as run_push
    plan = plan_push(bundle_dir, repo, per_artifact=per_artifact, key=key)
    if dry_run:
        click.echo(json.dumps({"repos": [r.as_dict() for r in plan.repos]}, indent=1))
        return
    for url in run_push(plan, private=private, revision=revision, token=token):
        click.echo(url)


def _register_optional() -> None:
    try:
        from .retriever import commands as rc
    except ImportError:
        return
    for name in ("index", "search", "eval_retrieval"):
        cmd = getattr(rc, name, None)
        if cmd is not None:
            cli.add_command(cmd)


_register_optional()


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, standalone_mode=False)
    except PhiedgeError as e:
        if os.environ.get("PHIEDGE_DEBUG"):
            raise
        click.echo(f"error: {e} (set PHIEDGE_DEBUG=1 for the traceback)", err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
