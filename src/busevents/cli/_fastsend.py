"""The fast path of the commonest ``send``: one event, without building the cyclopts app.

``bus-events send`` is run from scripts, often once per event, so its start-up
is most of its cost; cyclopts and the command modules cost about as much again
as trio itself (issue 14).  This module answers the plain form, and only it::

    bus-events [--api-url URL] [--token-file PATH] [--timeout DUR] [-f text|json]
               [-q] [--color MODE | --no-color] [--ca-file PATH]
               send --name NAME [--payload JSON] [--correlation-id ID] [--retry N]

(``--opt value`` or ``--opt=value``, each at most once).  Anything else — another
flag, a payload from a file or stdin, a value that does not parse, ``--help`` —
returns ``None`` and the full cyclopts application runs, so every usage error is
reported by the one parser that owns it.  Results and failures are written by
the same writers and mapped to the same exit statuses as the full ``send``.
It publishes with :class:`SyncClient` (the same HTTP, blocking): no trio, no
event loop to start.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._output import Diagnostics

__all__ = ["fast_send"]

_GLOBAL_VALUES = {
    "--api-url", "--token-file", "--timeout", "--format", "-f", "--color", "--ca-file",
}  # fmt: skip
_GLOBAL_FLAGS = {"--quiet", "-q", "--no-color"}
_SEND_VALUES = {"--name", "--payload", "--correlation-id", "--retry"}
#: Inline payloads up to this many characters (far below the CLI's payload limit).
_SMALL_PAYLOAD = 64 * 1024


def _options(
    tokens: list[str], values: set[str], flags: set[str], payload_ok: bool
) -> dict[str, str] | None:
    """``{option: value}`` (flags map to ""), or None when a token is outside the form."""
    found: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        option, eq, value = tokens[i].partition("=")
        if option in flags and not eq:
            i += 1
        elif option in values:
            if not eq:
                if i + 1 >= len(tokens):
                    return None
                value = tokens[i + 1]
                i += 1
            i += 1
            if value.startswith("-") and not (payload_ok and option == "--payload"):
                return None
        else:
            return None
        if option in found or (option == "-f" and "--format" in found):
            return None
        found["--format" if option == "-f" else "--quiet" if option == "-q" else option] = value
    return found


def _parse(args: list[str]) -> tuple[dict[str, str], dict[str, str]] | None:
    try:
        at = args.index("send")
    except ValueError:
        return None
    globals_ = _options(args[:at], _GLOBAL_VALUES, _GLOBAL_FLAGS, payload_ok=False)
    options = _options(args[at + 1 :], _SEND_VALUES, set(), payload_ok=True)
    if globals_ is None or options is None or "--name" not in options:
        return None
    if globals_.get("--format", "text") not in ("text", "json"):
        return None
    if globals_.get("--color", "auto") not in ("auto", "always", "never"):
        return None
    payload = options.get("--payload", "null")
    if payload == "-" or payload.startswith("@") or len(payload) > _SMALL_PAYLOAD:
        return None  # stdin, files and large payloads: the full command reads and bounds them
    retry = options.get("--retry", "0")
    if not retry.isdigit():
        return None
    return globals_, options


def fast_send(args: list[str]) -> int | None:
    """Run ``args`` when they are the plain form of ``send``; None otherwise."""
    parsed = _parse(args)
    if parsed is None:
        return None
    globals_, options = parsed
    import msgspec

    from busevents import ConfigError, parse_duration

    try:
        payload: Any = msgspec.json.decode(options.get("--payload", "null").encode())
        timeout = parse_duration(globals_["--timeout"]) if "--timeout" in globals_ else 30.0
    except (msgspec.DecodeError, ConfigError):
        return None  # the full command says what is wrong, in its own words
    from ._output import Diagnostics, Results, escape_controls, use_color

    quiet = "--quiet" in globals_
    mode = "never" if "--no-color" in globals_ else globals_.get("--color", "auto")
    color = use_color(
        "always" if mode == "always" else "never" if mode == "never" else "auto", sys.stderr
    )
    diagnostics = Diagnostics(color=color, quiet=quiet)
    _setup_logging(diagnostics)
    results = Results(None, quiet=quiet)
    json_format = globals_.get("--format") == "json"

    from busevents import PublishRequest, SyncClient

    # A one-shot publish needs no event loop: SyncClient speaks the same HTTP, blocking.
    ca: dict[str, Any] = {"ca_file": globals_["--ca-file"]} if "--ca-file" in globals_ else {}
    try:
        results.open()
        try:
            with SyncClient.from_env(
                api_url=globals_.get("--api-url"),
                token_file=globals_.get("--token-file"),
                timeout=timeout,
                **ca,
            ) as client:
                request = PublishRequest(
                    name=options["--name"],
                    payload=msgspec.Raw(msgspec.json.encode(payload)),
                    correlation_id=options.get("--correlation-id"),
                )
                accepted, raw = client.publish(request, retries=int(options.get("--retry", "0")))
            if json_format:
                results.write(raw.strip() + b"\n")
            else:
                text = f"accepted {accepted.name} {accepted.id}"
                results.write(escape_controls(text).encode() + b"\n")
        finally:
            results.close()
    except BaseException as exc:
        return _failure(exc, globals_, color)
    return 0


def _setup_logging(diagnostics: Diagnostics) -> None:
    import logging

    from ._logging import StderrHandler

    root = logging.getLogger()
    root.handlers[:] = [StderrHandler(diagnostics)]
    root.setLevel(logging.WARNING)


def _failure(exc: BaseException, globals_: dict[str, str], color: bool) -> int:
    """Report ``exc`` exactly as the full ``send`` does (loading the CLI only now)."""
    from ._base import Globals
    from ._commands import _status_for

    g = Globals(
        quiet="--quiet" in globals_,
        format="json" if globals_.get("--format") == "json" else "text",
        color=color,
        api_url=globals_.get("--api-url"),
        token_file=globals_.get("--token-file"),
    )
    status = _status_for(exc, g)
    if status is None:
        raise exc
    return status
