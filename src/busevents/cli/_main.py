"""The command line's entry: load every command, run one, map failures to exit statuses.

The one place that imports the command modules (each registers itself on
``app`` from ``_base``); add a new command's module to :func:`load_commands`.
"""

from __future__ import annotations

import cyclopts

from ._app import report_usage_error
from ._base import UsageError, app

__all__ = ["load_commands", "run"]


def load_commands() -> None:
    """Import the command modules, which register themselves on ``app``."""
    from . import (  # noqa: F401
        _bench,
        _completion,
        _demo,
        _devtoken,
        _export,
        _listen,
        _relay,
        _request,
        _script,
        _send,
        _serve,
        _worker,
    )


def run(args: list[str]) -> int:
    """Parse ``args``, run the command, map failures to exit statuses."""
    load_commands()
    try:
        status: int = app.meta(args)
        return status
    except (cyclopts.CycloptsError, UsageError) as exc:
        return report_usage_error(exc)
    except KeyboardInterrupt:
        return 130
