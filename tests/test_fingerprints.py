"""Stage fingerprints follow what the code does: a comment or docstring edit anywhere re-runs no stage, an edit to
one exporter re-runs that format's exports only, and an edit to the exporters' shared base re-runs every format's
(fingerprints computed on an edited copy of the package, phiedge.cache.PACKAGE, as a build would). And the device
path stands apart from the build."""
from __future__ import annotations

import ast
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT
from phiedge import build as build_mod
from phiedge import cache, exporters


def roots() -> dict[str, tuple[str, ...]]:
    """Every kind of stage's code roots, as phiedge.build gives them."""
    out = {"merge": build_mod.MERGE_CODE, "retriever": build_mod.RETRIEVER_CODE, "smoke": build_mod.SMOKE_CODE}
    for fmt, cls in exporters.REGISTRY.items():
        exp = cls()
        out[f"export {fmt}"] = (type(exp).__module__, *exp.TOOL_MODULES)
        out[f"check {fmt}"] = (*build_mod.CHECK_CODE, f"phiedge.runtimes.{fmt}")
    assert len(out) == 3 + 2 * len(exporters.REGISTRY) >= 11
    return out


@contextmanager
def package(tmp_path: Path):
    copy = tmp_path / "phiedge"
    shutil.copytree(ROOT / "phiedge", copy, ignore=shutil.ignore_patterns("__pycache__"))
    cache.PACKAGE = copy
    try:
        yield copy
    finally:
        cache.PACKAGE = ROOT / "phiedge"


def fingerprints() -> dict[str, str]:
    return {name: cache.code_fingerprint(r) for name, r in roots().items()}


def _reword_docstrings(path: Path) -> int:
    """Every docstring of `path` reworded and a comment added to every file: what a proofreading commit does."""
    src = path.read_text()
    docs = [n for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                                   ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
            and isinstance(n.body[0].value.value, str)]
    lines = src.splitlines(keepends=True)
    for node in docs:
        first = node.body[0].lineno - 1
        lines[first] = lines[first].replace('"""', '"""Reworded. ', 1)
    path.write_text("# a comment added by a proofreading commit\n" + "".join(lines) + "\n# and one at the end\n")
    return len(docs)


def test_a_comment_or_docstring_edit_anywhere_reruns_no_stage(tmp_path):
    before = fingerprints()
    with package(tmp_path) as copy:
        reworded = sum(_reword_docstrings(f) for f in copy.rglob("*.py"))
        assert reworded > 200
        assert fingerprints() == before


@pytest.mark.parametrize("fmt", sorted(exporters.REGISTRY))
def test_an_exporters_edit_reruns_its_format_only(tmp_path, fmt):
    before = fingerprints()
    module = type(exporters.REGISTRY[fmt]()).__module__.split(".")[-1]
    with package(tmp_path) as copy:
        with open(copy / "exporters" / f"{module}.py", "a") as f:
            f.write("\n_EDITED = True\n")
        after = fingerprints()
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {f"export {fmt}"}, changed


@pytest.mark.parametrize("shared", ["base.py", "grammar.py"])
def test_an_edit_to_the_exporters_shared_code_reruns_every_export(tmp_path, shared):
    before = fingerprints()
    with package(tmp_path) as copy:
        with open(copy / "exporters" / shared, "a") as f:
            f.write("\n_EDITED = True\n")
        after = fingerprints()
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {f"export {fmt}" for fmt in exporters.REGISTRY}, changed


def test_the_device_path_imports_nothing_of_the_build():
    """`phiedge.device`, the session, the server, the chat and every runtime load no exporter, no source resolver
    and no build module: the types they share (phiedge.artifact, phiedge.tensorfile, phiedge.openvino_ir) sit below
    both sides."""
    import subprocess
    import sys
    code = ("import sys, phiedge.device, phiedge.session, phiedge.serve, phiedge.terminal, phiedge.checks\n"
            "import phiedge.runtimes.gguf, phiedge.runtimes.onnx, phiedge.runtimes.openvino, phiedge.runtimes.mlx\n"
            "print(sorted(m for m in sys.modules if m.startswith(('phiedge.exporters', 'phiedge.source', "
            "'phiedge.build', 'phiedge.merge', 'phiedge.sweep'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-1000:])
