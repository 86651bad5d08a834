"""What every command module imports: the application, the global flags' values,
exit statuses and usage errors.  Nothing here imports a command, so commands and
the application that runs them form no import circle (``_main`` loads the commands)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cyclopts import App, Group, Parameter, Token

from busevents import ExitStatus

from .._version import __version__
from ._output import Diagnostics, Results

__all__ = [
    "CHECKABLE",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "Duration",
    "Globals",
    "UsageError",
    "app",
    "check_mode",
    "checking",
    "current",
]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = ExitStatus.OK, ExitStatus.FAILURE, ExitStatus.USAGE

GLOBAL = Group("Global options", sort_key=0)


def _duration_from_tokens(type_: Any, tokens: Sequence[Token]) -> Duration:
    from busevents import ConfigError, parse_duration

    try:
        return Duration(parse_duration(tokens[0].value))
    except ConfigError as exc:
        raise ValueError(str(exc)) from None  # cyclopts reports it as a usage error


@Parameter(converter=_duration_from_tokens)
class Duration(float):
    """Seconds, given on the command line in Go syntax (``300ms``, ``10s``, ``1m30s``).

    The one option type for every duration: a bad value is a usage error
    (exit 2) found while parsing, so a ``.bus`` preflight catches it too.  Shown
    (e.g. as a default in ``--help``) in Go syntax.
    """

    def __str__(self) -> str:
        seconds = float(self)
        if seconds and seconds < 1:
            return f"{seconds * 1000:g}ms"
        if seconds < 60 or seconds != int(seconds):
            return f"{seconds:g}s"
        hours, rest = divmod(int(seconds), 3600)
        parts = ((hours, "h"), *zip(divmod(rest, 60), ("m", "s"), strict=True))
        return "".join(f"{n}{unit}" for n, unit in parts if n)

    __repr__ = __str__


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
    ca_file: str | None = None
    perf: bool = False
    command: str | None = None
    #: The global flags as given (parameter name → value), for ``run`` to hand on.
    given: dict[str, Any] = field(default_factory=dict)

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


#: Commands whose every side effect starts in ``run_client_command``: a ``.bus``
#: preflight runs them in check mode, so their own checks (payload JSON,
#: option combinations, the token) run before anything is sent.
CHECKABLE = frozenset({"send", "listen", "request"})

_checking = False


def checking() -> bool:
    """True while a ``.bus`` preflight checks a command: do everything but the I/O."""
    return _checking


@contextlib.contextmanager
def check_mode() -> Iterator[None]:
    """Within: :func:`run_with` checks the command instead of running it."""
    global _checking
    _checking = True
    try:
        yield
    finally:
        _checking = False
