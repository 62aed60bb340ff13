"""The `phiedge` command: thin click wrappers over the library; `main()` turns known errors into one line."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from .errors import PhiedgeError

log = logging.getLogger("phiedge")


def _split(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log every step (library and converters).")
def cli(verbose: bool) -> None:
    """Merge a LoRA into Phi-4-mini, export edge artifacts, and prove each one behaves like the source."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


@cli.command()
@click.option("--model", default="microsoft/Phi-4-mini-instruct", show_default=True,
              help="Base model: a local Hugging Face directory or a Hub repo id.")
@click.option("--revision", default=None, help="Hub commit, branch or tag of --model.")
@click.option("--adapter", default=None, help="PEFT LoRA adapter: a local directory or a Hub repo id (none: export the base).")
@click.option("--adapter-revision", default=None, help="Hub commit, branch or tag of --adapter.")
@click.option("--formats", "formats", multiple=True, default=("gguf",), show_default=True,
              help="Artifacts to build, comma-separated or repeated.")
@click.option("--gguf-quant", multiple=True, help="GGUF levels, e.g. F16,Q8_0,Q4_K_M (default Q4_K_M).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out (only once the new build has passed).")
@click.option("--threads", type=int, default=os.cpu_count() or 1, show_default=True, help="CPU threads for runtimes.")
@click.option("--allow-noop-adapter", is_flag=True, help="Ship even if the adapter does not change the model's outputs.")
def build(model, revision, adapter, adapter_revision, formats, gguf_quant, out, force, threads, allow_noop_adapter):
    """Merge, export, check parity in both LongRoPE regimes, and write report.json."""
    from .build import BuildRequest, build as run_build, plan_formats
    from .report import table
    plan = plan_formats(_split(formats), {"gguf": _split(gguf_quant)})
    rep = run_build(BuildRequest(model=model, adapter=adapter, formats=plan, out=out, revision=revision,
                                 adapter_revision=adapter_revision, force=force, threads=threads,
                                 allow_noop_adapter=allow_noop_adapter))
    click.echo(table(rep))
    click.echo(f"built {out} (report: {out / 'report.json'})")


@cli.command()
def formats():
    """List the export formats and their precisions."""
    from . import exporters
    for name, cls in sorted(exporters.REGISTRY.items()):
        click.echo(f"{name:10} {', '.join(cls.PRECISIONS)} (default {cls.DEFAULT_PRECISION})")


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
