"""The documentation is true: every `phiedge …` line in README.md and docs/ parses with the CLI's own parser, the
cheap ones run for real, and docs/cli.md is what `make docs` generates from the code."""
from __future__ import annotations

import re
import shlex
import sys

import click
import pytest

from conftest import ROOT, run_cli
from phiedge.cli import cli

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:^|\||\$ |`)\s*(?:\.venv/bin/)?phiedge ((?:[a-z-]+)(?: [^`#\n]*)?)")


def documented() -> list[tuple[str, str]]:
    """(page, command line) for every `phiedge NAME …` in a code block or inline code, continuations joined."""
    found = []
    for page in PAGES:
        if page.name == "cli.md":
            continue
        text = re.sub(r"\\\n\s*", " ", page.read_text())
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]*phiedge [^`\n]*)`", text):
            for line in (part for row in block.splitlines() for part in row.split("&&")):
                m = COMMAND.search(line)
                if m and not line.lstrip().startswith(("import", "from", "with", "#")):
                    found.append((page.name, m.group(1).split(" # ")[0].split("  #")[0].strip()))
    return found


def _args(line: str) -> list[str]:
    """A synopsis as arguments: optional groups opened, the first of `a|b` alternatives, `…` dropped."""
    line = line.replace("[", " ").replace("]", " ").replace("…", " ")
    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    return [w.split("|")[0] for w in words if w not in ("...", "|")]


def test_every_documented_command_parses():
    lines = documented()
    assert len(lines) > 40 and {line.split()[0] for _, line in lines} >= {"build", "ask", "chat", "serve", "validate"}
    bad = []
    for page, line in lines:
        name, *args = _args(line)
        cmd = cli.commands.get(name)
        if cmd is None:
            bad.append(f"{page}: unknown command `phiedge {name}`")
            continue
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
        for a in args:
            flag = a.split("=")[0]
            if flag.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", flag) and flag not in known:
                bad.append(f"{page}: `phiedge {name}` has no option {flag} ({line})")
        try:
            cmd.make_context(name, list(args), resilient_parsing=False)
        except click.exceptions.MissingParameter:
            pass                        # a synopsis may leave a required value to the reader
        except (click.exceptions.NoSuchOption, click.exceptions.BadOptionUsage) as e:
            bad.append(f"{page}: `phiedge {line}`: {e.format_message()}")
        except click.exceptions.UsageError:
            pass                        # placeholders (NAME, bundle/) fail value checks, not the grammar
    assert not bad, "\n".join(bad)


def test_the_cheap_documented_commands_run(session):
    for args in (["formats"], ["targets"], ["--help"], *([name, "--help"] for name in sorted(cli.commands)),
                 ["verify", str(session.bundle)], ["search", str(session.bundle / "retriever"), "with statement",
                                                  "-k", "2"]):
        r = run_cli(*args)
        assert r.returncode == 0 and r.stdout.strip(), (args, r.stderr[-500:])


def test_the_cli_reference_is_generated_from_the_code():
    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_cli_docs import OUT, render
    assert OUT.read_text() == render(), "docs/cli.md is stale: run `make docs`"


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "cli.md"], ids=lambda p: p.name)
def test_no_page_is_dated_or_cites_notes_outside_the_repository(page):
    text = page.read_text()
    assert "FIELD" + "-NOTES" not in text and not re.search(r"\b20\d\d-\d\d-\d\d\b", text), page
    assert not re.search(r"\b[0-9a-f]{7,40}\b(?= \()", text), page          # commit hashes
