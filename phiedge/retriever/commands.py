"""Click commands of the retriever: `index`, `search`, `eval-retrieval`.

They are registered on the main `phiedge` group in phiedge/cli.py. Importing this module is light (click
and the device-side search path only): `index` imports the build-time modules when it runs.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from ..errors import UsageError
from .chunk import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP
from .types import MODES

log = logging.getLogger(__name__)


def _one_line(text: str, width: int | None = None) -> str:
    s = " ".join(text.split())
    return s if width is None or len(s) <= width else s[: width - 1] + "…"


@click.command("index")
@click.argument("docs", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("dist/retriever"), show_default=True,
              help="Retriever folder to create or update (updates are incremental).")
@click.option("--embedder", default=None,
              help="sentence-transformers model folder or Hub id [default: packaged all-MiniLM-L6-v2].")
@click.option("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS, show_default=True,
              help="Chunk size in embedder tokens.")
@click.option("--overlap", type=int, default=DEFAULT_OVERLAP, show_default=True,
              help="Tokens shared by consecutive chunks.")
@click.option("--follow-links", is_flag=True,
              help="Also index what symbolic links out of DOCS point to (skipped and listed by default).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def index(docs: Path, out: Path, embedder: str | None, chunk_tokens: int, overlap: int, follow_links: bool,
          as_json: bool) -> None:
    """Index DOCS (.md, .txt, .html, .pdf, recursively) into a retriever folder."""
    from .build import build_index

    result = build_index(docs, out, embedder=embedder, chunk_tokens=chunk_tokens, overlap=overlap,
                         follow_links=follow_links)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    c = result.counts()
    click.echo(f"indexed {result.n_files} files, {result.n_chunks} chunks into {result.out_dir} "
               f"({result.faiss_index}, {result.seconds:.1f}s)")
    click.echo(f"  added {c['added']}, changed {c['changed']}, unchanged {c['unchanged']}, removed {c['removed']}, "
               f"skipped {c['skipped']}; embedded {result.n_embedded} chunks")
    if result.onnx_min_cosine is not None:
        click.echo(f"  ONNX embedder vs sentence-transformers: min cosine {result.onnx_min_cosine:.6f}")
    if result.rebuilt_reason:
        click.echo(f"  {result.rebuilt_reason}")
    if result.skipped:  # each one was also logged as a warning, with its reason
        click.echo(f"  skipped: {', '.join(s.path for s in result.skipped)} (reasons in the warnings above, "
                   f"and with --json)")


@click.command("search")
@click.argument("retriever", type=click.Path(path_type=Path))
@click.argument("query")
@click.option("-k", "k", type=int, default=3, show_default=True, help="Number of chunks to return.")
@click.option("--mode", type=click.Choice(MODES), default="hybrid", show_default=True,
              help="dense (embeddings), keyword (BM25) or hybrid (both, fused by reciprocal rank).")
@click.option("--json", "as_json", is_flag=True, help="Print hits as a JSON list.")
def search(retriever: Path, query: str, k: int, mode: str, as_json: bool) -> None:
    """Search a RETRIEVER folder for QUERY."""
    from .search import Retriever

    if k < 1:
        raise UsageError(f"-k {k}: pass 1 or more")
    with Retriever.open(retriever) as r:
        hits = r.search(query, k=k, mode=mode)
    if as_json:
        click.echo(json.dumps([h.to_dict() for h in hits], indent=2, ensure_ascii=False))
        return
    if not hits:
        click.echo("no results")
    for i, h in enumerate(hits, 1):
        where = h.source + (f" › {h.heading}" if h.heading else "")
        click.echo(f"{i}. [{h.score:.4f}] {where}")
        click.echo(f"   {_one_line(h.text)}")


@click.command("eval-retrieval")
@click.argument("retriever", type=click.Path(path_type=Path))
@click.option("--qa", "qa", type=click.Path(path_type=Path), required=True,
              help='JSONL file of {"question": ..., "needle": ...} lines (needle: a string the right chunk contains).')
@click.option("--json", "as_json", is_flag=True, help="Print metrics as one JSON object keyed by mode.")
def eval_retrieval(retriever: Path, qa: Path, as_json: bool) -> None:
    """Recall@1/3/5 and MRR of dense, keyword and hybrid retrieval on a QA file."""
    from .evaluation import evaluate, load_qa
    from .search import Retriever

    questions = load_qa(qa)
    with Retriever.open(retriever) as r:
        report = evaluate(r, questions)
    metrics = {m: {k: report[m][k] for k in ("recall@1", "recall@3", "recall@5", "mrr")} for m in MODES}
    if as_json:
        click.echo(json.dumps(metrics))
        return
    click.echo(f"{len(questions)} questions")
    click.echo(f"{'mode':<8} {'R@1':>6} {'R@3':>6} {'R@5':>6} {'MRR':>6}")
    for m in MODES:
        row = metrics[m]
        click.echo(f"{m:<8} {row['recall@1']:>6.3f} {row['recall@3']:>6.3f} {row['recall@5']:>6.3f} "
                   f"{row['mrr']:>6.3f}")
    for q in report["unanswerable"]:
        click.echo(f"warning: no chunk contains the needle of {q!r}", err=True)
