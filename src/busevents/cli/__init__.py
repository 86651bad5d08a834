"""The ``bus-events`` command line.

This module stays import-light: ``--version`` and the top-level ``--help``
(pre-rendered, see ``_helptext``) are answered before anything heavy is
imported, and the cyclopts application (``_app``) imports trio and httpx only
inside the commands that talk to a provider.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run ``bus-events`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args in (["--version"], ["-V"]):
        from .._version import __version__

        sys.stdout.write(f"bus-events {__version__}\n")
        return 0
    if args in (["--help"], ["-h"]):
        from ._helptext import stored

        sys.stdout.write(stored())
        return 0
    from ._app import run

    return run(args)


def console_main() -> None:
    """Entry point of the ``bus-events`` script."""
    sys.exit(main())
