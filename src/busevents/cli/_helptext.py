"""The top-level help, pre-rendered so that ``bus-events --help`` starts fast.

Rendering help with cyclopts imports cyclopts, rich and their dependencies
(hundreds of milliseconds); the top-level ``--help`` prints this stored text
instead.  ``tests/test_package.py`` fails when the stored text differs from
what cyclopts renders; regenerate it with::

    python -m busevents.cli._helptext --write
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

HELP_FILE = Path(__file__).with_name("help.txt")
WIDTH = 80


def render() -> str:
    """The top-level help exactly as cyclopts prints it to a pipe, 80 columns wide."""
    from rich.console import Console

    from ._app import app, load_commands

    load_commands()
    buffer = io.StringIO()
    console = Console(file=buffer, width=WIDTH, force_terminal=False, color_system=None)
    with contextlib.suppress(SystemExit):  # cyclopts exits after printing help
        app.meta(["--help"], console=console)
    return buffer.getvalue()


def stored() -> str:
    """The pre-rendered help shipped with the package."""
    return HELP_FILE.read_text(encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        HELP_FILE.write_text(render(), encoding="utf-8")
    else:
        sys.stdout.write(render())
