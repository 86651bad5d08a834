"""What every client command shares: running under trio, exit statuses, payloads."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ._base import EXIT_FAILURE, EXIT_OK, Globals, UsageError, checking, current

#: Largest payload read from ``--payload`` (inline, ``@FILE`` or ``-``): local input is bounded.
MAX_PAYLOAD = 16 * 1024 * 1024

if TYPE_CHECKING:
    from busevents import EventsClient


def run_client_command(body: Callable[[Globals], Awaitable[int]]) -> int:
    """Run ``body`` under trio; turn failures into one-line messages and exit statuses.

    SIGINT and SIGTERM cancel ``body`` (whose ``finally`` blocks write out what
    was received), then the status is 130 or 143.  A reader that went away
    (``| head``) ends the command quietly.
    """
    import trio

    from busevents import single_error

    g = current()
    if checking():  # a .bus preflight: the configuration is checked, nothing is sent
        from busevents import find_token, resolve_url

        resolve_url(g.api_url)
        find_token(g.token_file)
        return EXIT_OK
    received: list[int] = []
    try:
        with single_error():
            status = trio.run(_until_signalled, body, g, received)
    except BaseException as exc:
        mapped = _status_for(exc, g)
        if mapped is None:
            raise
        return mapped
    return 128 + received[0] if received else status


async def _until_signalled(
    body: Callable[[Globals], Awaitable[int]], g: Globals, received: list[int]
) -> int:
    import signal

    import trio

    watching = trio.CancelScope()
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        trio.CancelScope() as scope,
    ):

        async def watch() -> None:
            with watching:
                if watching.cancel_called:
                    return  # the command ended before this task started
                async for signum in signals:
                    received.append(signum)
                    scope.cancel()
                    return

        trio.lowlevel.spawn_system_task(watch)
        try:
            return await body(g)
        finally:
            watching.cancel()
    return EXIT_FAILURE  # cancelled by a signal; the caller reports 128 + signum


def _status_for(exc: BaseException, g: Globals) -> int | None:
    """Report ``exc`` on stderr and give its exit status; None for a bug (re-raised)."""
    from ._output import report_failure

    return report_failure(exc, g.diagnostics(), g.output)


def _client(g: Globals) -> EventsClient:
    from busevents import EventsClient

    ca: dict[str, Any] = {"ca_file": g.ca_file} if g.ca_file else {}  # else BUS_EVENTS_CA_FILE
    return EventsClient.from_env(
        api_url=g.api_url, token_file=g.token_file, timeout=g.timeout, **ca
    )


def _parse_payload(text: str, option: str = "--payload") -> Any:
    """The JSON value of a payload option: inline JSON, ``@FILE`` or ``-`` (stdin).

    Raises :class:`UsageError` naming the option and the source, so that an
    invalid payload sends nothing.
    """
    import sys

    import msgspec

    from busevents import MAX_DEPTH, nesting_error

    source = "stdin" if text == "-" else text[1:] if text.startswith("@") else None
    if text == "-":
        if checking():
            return None  # a .bus preflight must not consume stdin: checked when it runs
        data = _read_bounded(sys.stdin.buffer, option, "stdin")
    elif text.startswith("@"):
        data = _read_file(text[1:], option)
    else:
        try:
            data = text.encode()
        except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 text
            raise UsageError(
                f"{option} is not UTF-8 text: JSON must be; pass the payload from a "
                f"file (--payload @FILE) to check its bytes"
            ) from None
        if len(data) > MAX_PAYLOAD:
            raise UsageError(f"{option} is larger than {_mib(MAX_PAYLOAD)}")
    where = f" ({source})" if source else ""
    # The payload sits one level inside the publish body, which the provider bounds.
    too_deep = nesting_error(data, MAX_DEPTH - 1, what=f"{option}{where}")
    if too_deep is not None:
        raise UsageError(too_deep)
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise UsageError(
            f"{option}{where} is not valid JSON: {exc}; e.g. --payload '{{\"ok\": true}}'"
        ) from None


def _read_file(path: str, option: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return _read_bounded(fh, option, path)
    except OSError as exc:
        raise UsageError(f"{option}: cannot read {path}: {exc.strerror}") from None


def _read_bounded(fh: Any, option: str, source: str) -> bytes:
    data: bytes = fh.read(MAX_PAYLOAD + 1)
    if len(data) > MAX_PAYLOAD:
        raise UsageError(f"{option} ({source}) is larger than {_mib(MAX_PAYLOAD)}")
    return data


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):g} MiB"
