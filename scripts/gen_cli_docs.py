#!/usr/bin/env python3
"""docs/cli.md from the click commands themselves (`make docs`; tests/test_docs.py fails when it is stale).

    python scripts/gen_cli_docs.py            # rewrite docs/cli.md
    python scripts/gen_cli_docs.py --check    # exit 1 when docs/cli.md differs
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "cli.md"


def render() -> str:
    import click

    from phiedge.cli import cli
    lines = ["# Command reference", "",
             "Generated from the commands' own definitions by `make docs` (`scripts/gen_cli_docs.py`): "
             "`phiedge COMMAND --help` prints the same.", ""]
    top = click.Context(cli, info_name="phiedge")
    lines += ["```", cli.get_usage(top), "```", ""]
    for opt in cli.get_params(top):
        record = opt.get_help_record(top)
        if record:
            lines.append(f"- `{record[0]}`: {record[1]}")
    lines.append("")
    for name in sorted(cli.list_commands(top)):
        cmd = cli.get_command(top, name)
        ctx = click.Context(cmd, info_name=name, parent=top)
        lines += [f"## `phiedge {name}`", "", " ".join((cmd.help or "").split()), "", "```",
                  cmd.get_usage(ctx), "```", ""]
        args = [p for p in cmd.get_params(ctx) if isinstance(p, click.Argument)]
        opts = [p.get_help_record(ctx) for p in cmd.get_params(ctx) if isinstance(p, click.Option)]
        if args:
            lines.append("Arguments: " + ", ".join(f"`{a.human_readable_name}`" for a in args) + ".")
            lines.append("")
        for record in opts:
            if record:
                flags, text = record
                lines.append(f"- `{flags}`: {' '.join(text.split())}".rstrip())
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
