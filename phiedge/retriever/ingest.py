"""Find and read documents: .md, .txt, .html/.htm, .pdf (text layer), recursively.

Every file is either read into a `Document` (its text plus the headings that start its sections) or
reported as a `SkippedFile` with a reason. Build time only (uses beautifulsoup4 and pypdf, imported lazily).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .types import SkippedFile

log = logging.getLogger(__name__)

SUPPORTED = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".html": "html", ".htm": "html", ".pdf": "pdf"}


@dataclass
class Document:
    """Text of one file. `sections` are (start offset in `text`, heading or None), sorted, first at 0."""

    path: str  # relative to the docs folder, with "/" separators
    text: str
    sections: list[tuple[int, str | None]] = field(default_factory=list)


class SkipFile(Exception):
    """Raised by a reader: the file is not indexed, the message says why."""


def list_files(docs_dir: Path, follow_links: bool = False) -> tuple[list[Path], list[SkippedFile]]:
    """All candidate files under docs_dir (sorted), and files skipped for their extension or because they are
    symbolic links out of the folder.

    Hidden files and folders (name starting with ".") are ignored silently. A link (to a file or a folder) whose
    target lies outside `docs_dir` is never read unless `follow_links`: its text would ship in the bundle to every
    device (a link to /etc/passwd, say). Links that stay inside the folder are read; a folder link that stays
    inside is skipped (its files are indexed under their own path).
    """
    root_real = Path(os.path.realpath(docs_dir))
    found: list[Path] = []
    skipped: list[SkippedFile] = []
    seen_dirs = {str(root_real)}
    for root, dirs, files in os.walk(docs_dir, followlinks=follow_links):
        kept = []
        for d in sorted(dirs):
            p = Path(root) / d
            if d.startswith("."):
                continue
            if p.is_symlink():
                real = os.path.realpath(p)
                if not follow_links or real in seen_dirs:
                    why = _link_reason(p, root_real, folder=True)
                    if why:
                        skipped.append(SkippedFile(p.relative_to(docs_dir).as_posix(), why))
                    continue
                seen_dirs.add(real)        # a link cycle is walked once
            kept.append(d)
        dirs[:] = kept
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = Path(root) / name
            rel = p.relative_to(docs_dir).as_posix()
            if p.is_symlink() and not follow_links:
                why = _link_reason(p, root_real, folder=False)
                if why:
                    skipped.append(SkippedFile(rel, why))
                    continue
            if p.suffix.lower() not in SUPPORTED:
                skipped.append(SkippedFile(rel, f"unsupported extension '{p.suffix or '(none)'}': "
                                                f"indexed types are {', '.join(sorted(set(SUPPORTED)))}"))
                continue
            found.append(p)
    return found, skipped


def _link_reason(link: Path, root_real: Path, *, folder: bool) -> str | None:
    """Why a symbolic link is not read (None: it is). Outside links need --follow-links."""
    target = Path(os.path.realpath(link))
    if root_real not in target.parents and target != root_real:
        return (f"symbolic link to {'a folder' if folder else 'a file'} outside the documents folder ({target}): "
                f"not read; pass --follow-links to index what it points to")
    if folder:
        return "symbolic link to a folder inside the documents folder: its files are indexed under their own path"
    return None


def no_documents_message(docs: Path, skipped: list[SkippedFile]) -> str:
    """Why a documents folder gives the retriever nothing, and what to add."""
    if not skipped:
        return f"no chunks: {docs} has no files: add .md/.txt/.html/.pdf files"
    reasons: dict[str, int] = {}
    for s in skipped:
        key = s.reason.split(" (")[0].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    summary = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return f"no chunks: every file in {docs} was skipped ({summary}): add .md/.txt/.html/.pdf files with text"


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SkipFile(f"unreadable ({e.strerror or e.__class__.__name__}): check the file exists and is readable") from e


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_document(path: Path, rel: str, data: bytes) -> Document:
    """Parse one file's bytes. Raises SkipFile with the reason when it cannot be indexed."""
    kind = SUPPORTED[path.suffix.lower()]
    if not data.strip():
        raise SkipFile("empty file")
    if kind == "pdf":
        doc = _read_pdf(rel, data)
    else:
        text = _decode_text(data)
        if kind == "markdown":
            doc = _read_markdown(rel, text)
        elif kind == "html":
            doc = _read_html(rel, text)
        else:
            doc = Document(rel, text, [(0, None)])
    if not doc.text.strip():
        raise SkipFile("no text after parsing")
    return doc


def _decode_text(data: bytes) -> str:
    head = data[:8192]
    if b"\x00" in head:
        raise SkipFile("binary file (contains NUL bytes): only text, HTML and PDF files are indexed")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SkipFile(f"not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}): re-save the file as UTF-8") from e
    # Mostly control characters: some binary format without NUL bytes.
    ctrl = sum(1 for c in text[:4096] if ord(c) < 32 and c not in "\t\n\r\f")
    if ctrl > 0.1 * min(len(text), 4096):
        raise SkipFile("binary file (mostly control characters): only text, HTML and PDF files are indexed")
    return text.replace("\r\n", "\n").replace("\r", "\n")


_MD_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
_MD_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _read_markdown(rel: str, text: str) -> Document:
    sections: list[tuple[int, str | None]] = [(0, None)]
    pos = 0
    fence: str | None = None
    for line in text.splitlines(keepends=True):
        m = _MD_FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
        elif fence is None:
            h = _MD_HEADING.match(line.rstrip("\n"))
            if h:
                heading = h.group(2).strip()
                if sections[-1][0] == pos:
                    sections[-1] = (pos, heading)
                else:
                    sections.append((pos, heading))
        pos += len(line)
    return Document(rel, text, sections)


_HTML_BLOCK = {
    "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption", "figure", "footer",
    "form", "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "tr", "ul", "td", "th",
    "h1", "h2", "h3", "h4", "h5", "h6", "title", "body",
}
_HTML_DROP = {"script", "style", "noscript", "template", "head", "svg"}
_HTML_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}


def _read_html(rel: str, text: str) -> Document:
    from bs4 import BeautifulSoup, NavigableString, Tag
    from bs4.element import PreformattedString  # comments, doctype, CDATA, processing instructions

    soup = BeautifulSoup(text, "html.parser")
    parts: list[str] = []
    size = 0
    sections: list[tuple[int, str | None]] = [(0, None)]

    def emit(s: str) -> None:
        nonlocal size
        parts.append(s)
        size += len(s)

    def newline() -> None:
        if parts and not parts[-1].endswith("\n"):
            emit("\n")

    def walk(node: Tag) -> None:
        for child in node.children:
            if isinstance(child, PreformattedString):
                continue
            if isinstance(child, NavigableString):
                s = re.sub(r"\s+", " ", str(child)) if node.name != "pre" else str(child)
                if s.strip() or (s == " " and parts and not parts[-1].endswith((" ", "\n"))):
                    emit(s.lstrip() if (not parts or parts[-1].endswith("\n")) else s)
                continue
            if not isinstance(child, Tag) or child.name in _HTML_DROP:
                continue
            block = child.name in _HTML_BLOCK
            if block:
                newline()
            if child.name in _HTML_HEADINGS:
                heading = " ".join(child.get_text(" ").split())
                if heading:
                    if sections[-1][0] == size:
                        sections[-1] = (size, heading)
                    else:
                        sections.append((size, heading))
            walk(child)
            if block:
                newline()

    walk(soup)
    out = "".join(parts)
    # Trailing spaces before newlines are noise; offsets of sections stay valid because we only strip at the end.
    return Document(rel, out.rstrip(), [s for s in sections if s[0] < len(out.rstrip()) or s[0] == 0])


def _read_pdf(rel: str, data: bytes) -> Document:
    import io

    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SkipFile("PDF support needs pypdf: pip install 'phiedge[retriever-build]'") from e
    # pypdf logs warnings for slightly broken PDFs; they are not ours to show.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                reader.decrypt("")
            except Exception as e:
                raise SkipFile("encrypted PDF: decrypt it first (qpdf --decrypt)") from e
        pages = [(p.extract_text() or "") for p in reader.pages]
    except SkipFile:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as e:
        raise SkipFile(f"unreadable PDF ({e.__class__.__name__}: {str(e)[:80]}): check the file is a valid PDF") from e
    parts: list[str] = []
    sections: list[tuple[int, str | None]] = []
    size = 0
    for i, page in enumerate(pages, 1):
        page = page.replace("\r\n", "\n").replace("\r", "\n").strip()
        if not page:
            continue
        if parts:
            parts.append("\n\n")
            size += 2
        sections.append((size, f"page {i}"))
        parts.append(page)
        size += len(page)
    if not parts:
        raise SkipFile(f"PDF has no text layer ({len(pages)} page(s), scanned images?): run OCR on it first (ocrmypdf)")
    sections[0] = (0, sections[0][1])
    return Document(rel, "".join(parts), sections)
