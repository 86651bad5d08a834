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
    """Run ``bus-events`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    A reader that goes away while help or results are written (``| head -1``)
    ends the command quietly with status 0.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(args)
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except SystemExit as exc:
        # rich (cyclopts' help) turns a closed pipe into exit 1 without a word.
        if isinstance(exc.__context__, BrokenPipeError):
            _silence_stdout()
            return 0
        raise


def _main(args: list[str]) -> int:
    if args in (["--version"], ["-V"]):
        from .._version import __version__

        sys.stdout.write(f"bus-events {__version__}\n")
        sys.stdout.flush()
        return 0
    if args in (["--help"], ["-h"]):
        from ._helptext import stored

        sys.stdout.write(stored())
        sys.stdout.flush()
        return 0
    if "send" in args:
        status = _fast_send(args)
        if status is not None:
            global _ended_fast
            _ended_fast = True
            return status
    from ._main import run

    return run(args)


#: The plain ``send`` answered (the process may end without a last garbage collection).
_ended_fast = False


def _fast_send(args: list[str]) -> int | None:
    """The plain one-event ``send`` (``_fastsend``), without cyclopts; None for any other."""
    import gc

    # Its start-up allocates much (the imports) and frees little: hunting reference
    # cycles meanwhile costs about a tenth of its time.  Collection resumes after.
    enabled = gc.isenabled()
    gc.disable()
    try:
        from ._fastsend import fast_send

        return fast_send(args)
    finally:
        if enabled:
            gc.enable()


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit cannot fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def console_main() -> None:
    """Entry point of the ``bus-events`` script."""
    status = main()
    if _ended_fast:
        import gc

        # The process ends now: the collection at exit need not walk every object its
        # start-up made (most of a one-shot send's exit).  What it wrote is closed.
        gc.freeze()
    sys.exit(status)
