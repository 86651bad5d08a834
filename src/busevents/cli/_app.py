"""The cyclopts application: global flags (spec §5) and the commands.

Global flags are parsed by the meta application, then the remaining tokens
run the command.  Commands are thin: they resolve configuration, call the
SDK (or the provider), and format results.  Every argument error exits 2 with
one line on stderr; every other failure exits 1.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Annotated, Literal

import cyclopts
from cyclopts import App, Group, Parameter

from busevents import ExitStatus

from .._version import __version__
from ._output import Diagnostics, Results, use_color

__all__ = ["Globals", "app", "run"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = ExitStatus.OK, ExitStatus.FAILURE, ExitStatus.USAGE

GLOBAL = Group("Global options", sort_key=0)


@dataclass
class Globals:
    """The global flags, resolved."""

    verbose: int = 0
    quiet: bool = False
    output: str | None = None
    format: Literal["text", "json"] | None = None  # None: the command's own default
    color: bool = False
    api_url: str | None = None
    token_file: str | None = None
    timeout: float = 30.0
    timeout_given: bool = False

    def diagnostics(self) -> Diagnostics:
        return Diagnostics(color=self.color, verbose=self.verbose, quiet=self.quiet)

    def results(self) -> Results:
        return Results(self.output, quiet=self.quiet)


class UsageError(Exception):
    """Invalid usage detected after parsing (exit 2)."""


app = App(
    name="bus-events",
    help="Publish events and listen for matching events on the Bus Events API.",
    version=f"bus-events {__version__}",
    help_flags=["--help", "-h"],
    version_flags=["--version", "-V"],
    exit_on_error=False,
    print_error=False,
    help_on_error=False,
    usage="Usage: bus-events [GLOBAL OPTIONS] COMMAND [OPTIONS]",
)
app.meta.group_parameters = GLOBAL


_globals = Globals()


def current() -> Globals:
    """The global flags of this run."""
    return _globals


@app.meta.default
def _meta(
    *tokens: Annotated[str, Parameter(show=False, allow_leading_hyphen=True)],
    verbose: Annotated[
        int,
        Parameter(
            name=["--verbose", "-v"],
            count=True,
            show_default=False,
            help="More diagnostics on stderr (repeatable).",
        ),
    ] = 0,
    quiet: Annotated[
        bool,
        Parameter(
            name=["--quiet", "-q"], negative="", help="No normal output; errors still on stderr."
        ),
    ] = False,
    chdir: Annotated[
        str | None, Parameter(name=["--chdir", "-C"], help="Run as if started in this directory.")
    ] = None,
    output: Annotated[
        str | None,
        Parameter(
            name=["--output", "-o"], help="Write results to this file (created or truncated)."
        ),
    ] = None,
    format: Annotated[
        Literal["text", "json"] | None,
        Parameter(
            name=["--format", "-f"], help="Result format. [default: json for listen, else text]"
        ),
    ] = None,
    color: Annotated[
        Literal["auto", "always", "never"], Parameter(help="Color diagnostics on stderr.")
    ] = "auto",
    no_color: Annotated[
        bool, Parameter(negative="", show_default=False, help="Same as --color never.")
    ] = False,
    api_url: Annotated[
        str | None,
        Parameter(
            help="Events API base URL [env: BUS_EVENTS_API_URL], e.g. http://127.0.0.1:8081/api/v1/events."
        ),
    ] = None,
    token_file: Annotated[
        str | None,
        Parameter(
            help="Read the bearer token from this file (default: BUS_API_TOKEN, "
            "BUS_EVENTS_TOKEN_FILE, then the Bus auth config)."
        ),
    ] = None,
    timeout: Annotated[
        str | None,
        Parameter(
            help="HTTP timeout, Go syntax (300ms, 10s, 1m30s); for listen also the "
            "overall deadline. [default: 30s]"
        ),
    ] = None,
) -> int:
    from busevents import ConfigError, parse_duration

    if verbose and quiet:
        raise UsageError("--quiet and --verbose cannot be used together")
    g = _globals
    g.verbose, g.quiet, g.output, g.format = verbose, quiet, output, format
    g.color = use_color("never" if no_color else color, sys.stderr)
    g.api_url, g.token_file = api_url, token_file
    # Every field is set on every run: `bus-events run` calls this once per script line.
    g.timeout, g.timeout_given = Globals.timeout, False
    if timeout is not None:
        try:
            g.timeout = parse_duration(timeout)
        except ConfigError as exc:
            raise UsageError(f"--timeout: {exc}") from None
        g.timeout_given = True
    _setup_logging(verbose)
    if chdir is not None:
        try:
            os.chdir(chdir)
        except OSError as exc:
            g.diagnostics().error(f"cannot change directory to {chdir}: {exc.strerror}")
            return EXIT_FAILURE
    if not tokens:
        app.help_print([])
        return EXIT_USAGE
    result = app(tokens)
    return result if isinstance(result, int) else EXIT_OK


def _setup_logging(verbose: int) -> None:
    from ._logging import StderrHandler

    handler = StderrHandler(_globals.diagnostics())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)
    if verbose < 3:
        for noisy in ("httpcore", "hpack", "hypercorn.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _usage_line(exc: BaseException) -> str:
    if isinstance(exc, cyclopts.UnknownCommandError) and exc.unused_tokens:
        token = exc.unused_tokens[0]
        if token.startswith("-"):
            return f"unknown option {token!r}"
        commands = ", ".join(name for name in app if not name.startswith("-"))
        return f"unknown command {token!r} (commands: {commands})"
    text = " ".join(str(exc).split())
    return text[:1].lower() + text[1:] if text else type(exc).__name__


def load_commands() -> None:
    """Import the command modules, which register themselves on ``app``."""
    from . import (  # noqa: F401
        _bench,
        _completion,
        _demo,
        _devtoken,
        _listen,
        _request,
        _script,
        _send,
        _serve,
    )


def run(args: list[str]) -> int:
    """Parse ``args``, run the command, map failures to exit statuses."""
    load_commands()
    try:
        status: int = app.meta(args)
        return status
    except (cyclopts.CycloptsError, UsageError) as exc:
        diag = _globals.diagnostics()
        diag.error(f"{_usage_line(exc)} (see: bus-events --help)")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
