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

Nor msgspec, whose import alone cost this path about 14 ms: the payload is
read and written again with the standard library's ``json``, whose result is
byte for byte msgspec's for plain JSON (see :func:`_plain_payload`; anything else
goes through msgspec, as the full command does), and a plain acceptance is read
the same way (``SyncClient._publish_json``).  Failures are reported by
:func:`~._output.report_failure`, in the full command's words, without loading the CLI.
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
    from busevents import ConfigError, parse_duration

    payload = _payload_json(options.get("--payload", "null"))
    try:
        timeout = parse_duration(globals_["--timeout"]) if "--timeout" in globals_ else 30.0
    except ConfigError:
        return None  # the full command says what is wrong, in its own words
    name, correlation_id = options["--name"], options.get("--correlation-id")
    if payload is None or not _utf8(name) or not _utf8(correlation_id or ""):
        return None  # not UTF-8: the full command's to report (msgspec cannot encode it)
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

    from busevents import SyncClient

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
                accepted_name, event_id, raw = client._publish_json(
                    name,
                    payload,
                    correlation_id=correlation_id,
                    retries=int(options.get("--retry", "0")),
                )
            if json_format:
                results.write(raw.strip() + b"\n")
            else:
                text = f"accepted {accepted_name} {event_id}"
                results.write(escape_controls(text).encode() + b"\n")
        finally:
            results.close()
    except BaseException as exc:
        from ._output import report_failure

        status = report_failure(exc, diagnostics)
        if status is None:
            raise
        return status
    return 0


# -- the payload and the body, as msgspec writes them --------------------------------

#: Payloads nesting deeper than this go to the full command: the provider refuses
#: more than 512 levels, and near the recursion limit the two paths' stacks differ.
_PLAIN_DEPTH = 400


class _NotPlain(Exception):
    """A value the stdlib ``json`` might not read or write exactly as msgspec does."""


def _payload_json(text: str) -> bytes | None:
    """The payload as the full ``send`` sends it (msgspec decodes the text, then encodes
    the value), or None when the full command must judge it (invalid JSON: its usage
    error; text that is not UTF-8, or nests very deeply: whatever it does)."""
    try:
        data = text.encode()
    except UnicodeEncodeError:
        return None
    if data.count(b"[") + data.count(b"{") > _PLAIN_DEPTH:
        from busevents import nesting_error

        if nesting_error(data, _PLAIN_DEPTH) is not None:
            return None
    plain = _plain_payload(text)
    if plain is not None:
        return plain
    import msgspec  # what is not plain: msgspec itself, as the full command

    try:
        return msgspec.json.encode(msgspec.json.decode(data))
    except (msgspec.DecodeError, RecursionError):
        return None


def _plain_payload(text: str) -> bytes | None:
    """msgspec's encoding of the value of ``text``, made by the stdlib ``json``; None
    when the two might differ, or ``json`` refuses it.

    They agree on objects (a repeated key: the last value, at the first place),
    arrays, strings (the same escapes, UTF-8 unescaped), true, false, null, integers
    and floats that both write alike.  Not plain: NaN and Infinity (``json`` reads
    them, msgspec does not), integers of more than 18 digits (msgspec's range), floats
    that ``repr`` writes with an exponent (msgspec writes ``1e16``, not ``1e+16``) or
    that overflow, lone surrogates (``json`` reads ``"\\ud800"``, msgspec does not).
    """
    import json

    try:
        value = json.loads(
            text, parse_constant=_not_plain, parse_int=_short_int, parse_float=_plain_float
        )
        out = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return out.encode()
    except (ValueError, RecursionError, _NotPlain):  # UnicodeEncodeError is a ValueError
        return None


def _not_plain(text: str) -> Any:
    raise _NotPlain


def _short_int(text: str) -> int:
    if len(text) > 18:
        raise _NotPlain
    return int(text)


def _plain_float(text: str) -> float:
    value = float(text)
    written = repr(value)
    if "e" in written or "n" in written:  # 1e+16, 1e-05; inf, nan
        raise _NotPlain
    return value


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate (a byte of the command line not UTF-8)
        return False
    return True


# -- failures, in the full command's words ------------------------------------------


def _setup_logging(diagnostics: Diagnostics) -> None:
    import logging

    from ._logging import StderrHandler

    root = logging.getLogger()
    root.handlers[:] = [StderrHandler(diagnostics)]
    root.setLevel(logging.WARNING)
