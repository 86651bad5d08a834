"""Help text kept in files: the fast top-level ``--help`` and the README reference.

Rendering help with cyclopts imports cyclopts, rich and their dependencies
(hundreds of milliseconds); the top-level ``--help`` prints the stored text
instead.  The README's command reference is every command's real ``--help``.
``tests/test_package.py`` fails when either differs from what cyclopts
renders; regenerate both with::

    python -m busevents.cli._helptext --write
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

HELP_FILE = Path(__file__).with_name("help.txt")
WIDTH = 80


def render(command: str | None = None) -> str:
    """The help of ``command`` (top level when None) exactly as cyclopts prints it to a
    pipe, 80 columns wide."""
    from rich.console import Console

    from ._app import app, load_commands

    load_commands()
    buffer = io.StringIO()
    console = Console(file=buffer, width=WIDTH, force_terminal=False, color_system=None)
    with contextlib.suppress(SystemExit):  # cyclopts exits after printing help
        app.meta([*([command] if command else []), "--help"], console=console)
    return buffer.getvalue()


def commands() -> list[str]:
    """The command names, in help order."""
    from ._app import app, load_commands

    load_commands()
    return sorted(name for name in app if not name.startswith("-"))


REFERENCE_START = "<!-- reference:start (generated: python -m busevents.cli._helptext --write) -->"
REFERENCE_END = "<!-- reference:end -->"


def reference() -> str:
    """The README's command reference: every command's real ``--help``, man-page style."""
    parts = [REFERENCE_START, "", "### bus-events", "", "```text", render().rstrip(), "```"]
    for command in commands():
        parts += ["", f"### bus-events {command}", "", "```text", render(command).rstrip(), "```"]
    parts += ["", REFERENCE_END]
    return "\n".join(parts)


def readme_with_reference(readme: str) -> str:
    """``readme`` with its generated reference section replaced by the current one."""
    start = readme.index(REFERENCE_START)
    end = readme.index(REFERENCE_END) + len(REFERENCE_END)
    return readme[:start] + reference() + readme[end:]


def stored() -> str:
    """The pre-rendered help shipped with the package."""
    return HELP_FILE.read_text(encoding="utf-8")


README = Path(__file__).resolve().parents[3] / "README.md"

if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        HELP_FILE.write_text(render(), encoding="utf-8")
        if README.exists():  # a source checkout: refresh the README's reference too
            README.write_text(readme_with_reference(README.read_text("utf-8")), "utf-8")
    else:
        sys.stdout.write(render())
