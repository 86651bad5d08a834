"""The global flags (spec §5), running a command with them, and usage errors.

Global flags are parsed by the meta application, then the remaining tokens
run the command (the application, ``Globals`` and exit statuses live in
``_base``; ``_main`` loads the commands and runs one).  Commands are thin:
they resolve configuration, call the SDK (or the provider), and format results.
Every argument error exits 2 with one line on stderr; every other failure exits 1.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import cyclopts
from cyclopts import Parameter

from ._base import (
    CHECKABLE,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    Duration,
    Globals,
    UsageError,
    app,
    check_mode,
    checking,
    current,
)
from ._output import use_color

# The global flags' own names; commands import what they share from ``_base`` (also
# re-exported here, for a command module written against the older layout).
__all__ = [
    "CHECKABLE",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "Duration",
    "Globals",
    "UsageError",
    "app",
    "apply_globals",
    "check_mode",
    "checking",
    "current",
    "meta_options",
    "report_usage_error",
    "run_parsed",
    "run_with",
    "suggest",
    "usage_message",
]


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
        Duration | None,
        Parameter(
            help="Limit on connecting and on each HTTP exchange, Go syntax (300ms, 10s, "
            "1m30s) [default: 30s]. A following listen runs until stopped unless "
            "--timeout is given: then it is also the listen's overall deadline."
        ),
    ] = None,
    ca_file: Annotated[
        str | None,
        Parameter(
            help="Trust the CAs in this PEM file for https:// URLs [env: BUS_EVENTS_CA_FILE] "
            "(proxies: HTTP_PROXY, HTTPS_PROXY, NO_PROXY; see the README)."
        ),
    ] = None,
    perf: Annotated[
        bool,
        Parameter(
            show_default=False,
            help="Print the command's duration on stderr: INFO perf bus-events COMMAND SECONDS.",
        ),
    ] = False,
) -> int:
    given = {
        "verbose": verbose, "quiet": quiet, "chdir": chdir, "output": output, "format": format,
        "color": color, "no_color": no_color, "api_url": api_url, "token_file": token_file,
        "timeout": timeout, "perf": perf, "ca_file": ca_file,
    }  # fmt: skip
    return run_with({k: v for k, v in given.items() if v != _FLAG_DEFAULTS[k]}, tokens)


#: The value of every global flag when it is not given.
_FLAG_DEFAULTS: dict[str, Any] = {
    "verbose": 0, "quiet": False, "chdir": None, "output": None, "format": None,
    "color": "auto", "no_color": False, "api_url": None, "token_file": None,
    "timeout": None, "perf": False, "ca_file": None,
}  # fmt: skip


def apply_globals(flags: Mapping[str, Any]) -> Globals:
    """Set this run's :class:`Globals` from the given flags (parameter name → value).

    Every field is set on every call: ``bus-events run`` calls this once per
    script line.  ``--chdir`` is left to the caller.
    """
    f = {**_FLAG_DEFAULTS, **flags}
    if f["verbose"] and f["quiet"]:
        raise UsageError("--quiet and --verbose cannot be used together")
    g = current()
    g.given = dict(flags)
    g.verbose, g.quiet, g.output, g.format = f["verbose"], f["quiet"], f["output"], f["format"]
    g.color = use_color("never" if f["no_color"] else f["color"], sys.stderr)
    g.api_url, g.token_file, g.perf = f["api_url"], f["token_file"], f["perf"]
    g.ca_file = f["ca_file"]
    g.timeout_given = f["timeout"] is not None
    g.timeout = float(f["timeout"]) if g.timeout_given else Globals.timeout
    _setup_logging(g.verbose)
    return g


def run_with(flags: Mapping[str, Any], tokens: Sequence[str]) -> int:
    """Apply the global ``flags`` (see :func:`apply_globals`) and run the command ``tokens``.

    In :func:`check_mode` the command is only checked: parsed, and for
    :data:`CHECKABLE` commands run up to the point where it would do I/O.
    """
    g = apply_globals(flags)
    tokens = list(tokens)
    if tokens[:1] == ["--"]:  # a lone -- ends the global flags (upstream's global-flags page)
        tokens = tokens[1:]
    chdir = flags.get("chdir")
    if chdir is not None:
        try:
            os.chdir(chdir)
        except OSError as exc:
            if checking():
                raise UsageError(f"cannot change directory to {chdir}: {exc.strerror}") from None
            g.diagnostics().error(f"cannot change directory to {chdir}: {exc.strerror}")
            return EXIT_FAILURE
    g.command = tokens[0] if tokens else None
    if not tokens:
        if checking():
            raise UsageError("no command")
        app.help_print([])
        return EXIT_USAGE
    if checking():
        if tokens[0] == "run":
            raise UsageError("run cannot be used inside a script: include the file instead")
        if tokens[0] not in CHECKABLE:
            app.parse_args(tokens, exit_on_error=False, print_error=False)
            return EXIT_OK
    # Read now: a command of `run` sets the globals again for itself.
    perf = g.perf and not g.quiet and not checking()
    start = time.perf_counter()
    result = app(tokens)
    if perf:
        _write_stderr(f"INFO perf bus-events {tokens[0]} {time.perf_counter() - start:.3f}\n")
    return result if isinstance(result, int) else EXIT_OK


def _write_stderr(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(text)
        sys.stderr.flush()


def _setup_logging(verbose: int) -> None:
    from ._logging import StderrHandler, quiet_http_loggers

    handler = StderrHandler(current().diagnostics())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)
    quiet_http_loggers(verbose)


def _lower_first(text: str) -> str:
    """Lower-case a capitalised first word (``Unknown`` → ``unknown``), not a name
    (``BUS_API_JWT_SECRET``, ``--name``, ``HTTP``)."""
    word = text.split(" ", 1)[0]
    if len(word) > 1 and word[0].isupper() and not any(c.isupper() for c in word[1:]):
        return text[0].lower() + text[1:]
    return text


def suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


#: What a missing required option means, by (command, option).
_MISSING = {
    ("run", "FILES"): "run needs at least one .bus file, e.g. bus-events run checks.bus",
    ("listen", "--name"): "listen needs --name, e.g. bus-events listen --name example.ping",
    ("request", "--name"): (
        "request needs --name and --response-name, e.g. bus-events request "
        "--name example.echo --response-name example.echo.reply"
    ),
    ("bench", "--name"): "bench needs --name, e.g. bus-events bench --name bench.my-team",
}


def command_names() -> list[str]:
    """The commands, for messages and suggestions."""
    return [name for name in app if not name.startswith("-")]


def usage_message(exc: BaseException) -> str:
    """The one-line message of a usage error, worded the same way for every command."""
    if isinstance(exc, cyclopts.UnknownCommandError) and exc.unused_tokens:
        token = str(exc.unused_tokens[0])
        if token.startswith("-"):
            return _unknown_option(token, meta_options())
        commands = command_names()
        return (
            f"unknown command {token!r}{suggest(token, commands)} (commands: {', '.join(commands)})"
        )
    if isinstance(exc, cyclopts.UnknownOptionError) and exc.token is not None:
        command = exc.command_chain[-1] if exc.command_chain else None
        return _unknown_option(exc.token.keyword or exc.token.value, _options_of(command))
    if isinstance(exc, cyclopts.MissingArgumentError) and exc.argument is not None:
        command = exc.command_chain[-1] if exc.command_chain else "bus-events"
        option = exc.argument.name
        return _MISSING.get((command, option), f"{command} needs {option}")
    if (
        isinstance(exc, cyclopts.CoercionError)
        and isinstance(exc.__cause__, ValueError)
        and exc.token is not None
        and exc.token.keyword
    ):  # our own converter's message (e.g. a duration) says what is wrong
        return f"{exc.token.keyword}: {exc.__cause__}"
    if isinstance(exc, cyclopts.UnusedCliTokensError) and exc.unused_tokens:
        return (
            f"unexpected {str(exc.unused_tokens[0])!r}: an option takes one value "
            "(repeat the option for more)"
        )
    text = " ".join(str(exc).split()).rstrip(".")
    return _lower_first(text) if text else type(exc).__name__


def _unknown_option(token: str, options: list[str]) -> str:
    flag = token.split("=", 1)[0]  # never echo a value: it may be a secret
    if flag in ("--token", "--api-token", "--bearer"):
        return (
            f"unknown option {flag!r}: a token is never given on the command line; "
            "use --token-file PATH or set BUS_API_TOKEN"
        )
    return f"unknown option {flag!r}{suggest(flag, options)}"


def meta_options() -> list[str]:
    return [name for argument in app.meta.assemble_argument_collection() for name in argument.names]


def _options_of(command: str | None) -> list[str]:
    try:
        sub = app[command] if command else app
        return [name for argument in sub.assemble_argument_collection() for name in argument.names]
    except Exception:  # suggestions are a courtesy: never fail the error message
        return []


def run_parsed(flags: Mapping[str, Any], tokens: Sequence[str]) -> int:
    """:func:`run_with`, failures mapped to exit statuses as :func:`run` does."""
    try:
        return run_with(flags, tokens)
    except (cyclopts.CycloptsError, UsageError) as exc:
        return report_usage_error(exc)
    except KeyboardInterrupt:
        return 130


def report_usage_error(exc: BaseException) -> int:
    """Report a usage error in the one voice of every command: exit 2."""
    chain = getattr(exc, "command_chain", None)
    command = chain[-1] if chain else current().command
    where = f"bus-events {command} --help" if command in command_names() else "bus-events --help"
    current().diagnostics().error(f"{usage_message(exc)} (see: {where})")
    return EXIT_USAGE
