"""``send``: publish one event, or one per NDJSON line (``--ndjson``)."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO

from cyclopts import Parameter

from ._base import EXIT_FAILURE, EXIT_OK, Globals, UsageError, app
from ._commands import _client, _mib, _parse_payload, run_client_command
from ._output import escape_controls

if TYPE_CHECKING:
    import trio

    from busevents import EventsClient, PublishRequest

    from ._output import Diagnostics


def _metadata(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--metadata {pair!r}: expected KEY=VALUE, e.g. --metadata team=ops")
        out[key] = value
    return out


@app.command
def send(
    *,
    name: Annotated[
        str | None, Parameter(help="Event name, e.g. example.ping (with --ndjson: the default).")
    ] = None,
    payload: Annotated[
        str | None,
        Parameter(
            help="Payload: JSON, @FILE, or - for stdin. [default: null]",
            allow_leading_hyphen=True,
        ),
    ] = None,
    payload_file: Annotated[
        str | None, Parameter(help="Read the payload JSON from this file.")
    ] = None,
    correlation_id: Annotated[
        str | None, Parameter(help="Correlation id, the key of request/reply.")
    ] = None,
    metadata: Annotated[
        list[str] | None,
        Parameter(
            help="KEY=VALUE metadata: --metadata a=1 b=2, or repeated.",
            negative_iterable="",
            consume_multiple=True,
        ),
    ] = None,
    retry: Annotated[
        int,
        Parameter(
            help="Retry a 5xx, 429 or network failure up to this many times "
            "(the event then always carries a correlation id, generated if not given, "
            "so that a duplicate can be recognised)."
        ),
    ] = 0,
    ndjson: Annotated[
        str | None,
        Parameter(
            help="Publish one event per line of FILE (or - for stdin): envelopes with "
            "name, payload, correlationId, metadata, as `listen` writes them.",
            allow_leading_hyphen=True,
        ),
    ] = None,
    concurrency: Annotated[
        int, Parameter(help="With --ndjson: events in flight at once (1 keeps the order).")
    ] = 16,
    fail_fast: Annotated[
        bool,
        Parameter(
            negative="",
            show_default=False,
            help="With --ndjson: stop at the first failure. No line after it is read; lines "
            "read before it (at most --concurrency, already queued or in flight) are still "
            "published, and every event the provider accepted is counted in the summary.",
        ),
    ] = False,
) -> int:
    """Publish one event, or one event per NDJSON line.

    Prints the acceptance: ``accepted <name> <id>`` (text) or the provider's
    JSON (json).  With --ndjson, prints the counts (``accepted N failed M``) and
    reports each bad line with its number on stderr; exit 1 if any failed.

    Example: bus-events send --name example.ping --payload '{"ok":true}'

    Copy history: bus-events listen --name x --replay --no-follow | bus-events send --ndjson -
    """
    if retry < 0:
        raise UsageError("--retry must be 0 or more")
    meta = _metadata(metadata)
    if ndjson is not None:
        if payload is not None or payload_file is not None or correlation_id is not None:
            raise UsageError("--ndjson takes payloads and correlation ids from its lines")
        if concurrency < 1:
            raise UsageError("--concurrency must be at least 1")
        return _send_ndjson(ndjson, name, meta, retry, concurrency, fail_fast)
    if name is None:
        raise UsageError(
            "send needs --name (or --ndjson FILE), e.g. bus-events send --name example.ping"
        )
    if payload is not None and payload_file is not None:
        raise UsageError("give --payload or --payload-file, not both")
    # Parsed before anything is sent: an invalid payload sends nothing.
    if payload_file is not None:
        value = _parse_payload("@" + payload_file, "--payload-file")
    else:
        value = _parse_payload(payload if payload is not None else "null")

    async def body(g: Globals) -> int:
        import msgspec

        from busevents import PublishRequest

        results = g.results()
        results.open()
        try:
            async with _client(g) as client:
                request = PublishRequest(
                    name=name,
                    payload=msgspec.Raw(msgspec.json.encode(value)),
                    correlation_id=correlation_id,
                    metadata=meta,
                )
                accepted, raw = await client.publish(request, retries=retry)
            if g.format == "json":
                results.write(raw.strip() + b"\n")
            else:
                text = f"accepted {accepted.name} {accepted.id}"
                results.write(escape_controls(text).encode() + b"\n")
        finally:
            results.close()
        return EXIT_OK

    return run_client_command(body)


def _send_ndjson(
    source: str,
    name: str | None,
    metadata: dict[str, str] | None,
    retry: int,
    concurrency: int,
    fail_fast: bool,
) -> int:
    raw: BinaryIO
    if source == "-":
        raw = sys.stdin.buffer
    else:
        try:
            raw = open(source, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise UsageError(f"--ndjson: cannot read {source}: {exc.strerror}") from None

    async def body(g: Globals) -> int:
        batch = _Batch(g.diagnostics(), name, metadata, retry, fail_fast)
        results = g.results()
        results.open()
        try:
            async with _client(g) as client:
                await batch.run(client, raw, concurrency)
        finally:
            batch.progress(final=True)
            if g.format == "json":
                results.write(b'{"accepted":%d,"failed":%d}\n' % (batch.accepted, batch.failed))
            else:
                results.write(b"accepted %d failed %d\n" % (batch.accepted, batch.failed))
            results.close()
        return EXIT_FAILURE if batch.failed else EXIT_OK

    try:
        return run_client_command(body)
    finally:
        if raw is not sys.stdin.buffer:
            raw.close()


class _Batch:
    """Publishes NDJSON lines with a bounded number in flight; counts what happened."""

    def __init__(
        self,
        diag: Diagnostics,
        name: str | None,
        metadata: dict[str, str] | None,
        retry: int,
        fail_fast: bool,
    ) -> None:
        self.diag = diag
        self.name = name
        self.metadata = metadata
        self.retry = retry
        self.fail_fast = fail_fast
        self.accepted = 0
        self.failed = 0
        self.abandoned = False  # a failure every later line would share: send nothing more
        self.live = sys.stderr.isatty() and not diag.quiet
        self._shown = 0.0

    def fail(self, line: int, message: str, reading: trio.CancelScope) -> None:
        """Report a failed line; with --fail-fast, stop reading (``reading`` is the
        reader's scope: publishes already started are never cancelled, so that an
        event the provider stored is always counted)."""
        self.failed += 1
        self.diag.error(f"line {line}: {message}")
        if self.fail_fast:
            reading.cancel()

    def progress(self, final: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if final:
            sys.stderr.write("\r\x1b[K")
        elif now - self._shown > 0.2:
            self._shown = now
            sys.stderr.write(f"\r\x1b[Kbus-events: accepted {self.accepted}, failed {self.failed}")
        sys.stderr.flush()

    async def run(self, client: EventsClient, source: BinaryIO, concurrency: int) -> None:
        import trio

        from busevents import BusEventsError, TransportError, Unauthorized

        send_channel, receive_channel = trio.open_memory_channel[tuple[int, Any]](concurrency)
        # Cancelling this stops reading input; publishes in flight always finish.
        reading = trio.CancelScope()
        unsent: list[int] = []

        async def publisher(requests: trio.MemoryReceiveChannel[tuple[int, Any]]) -> None:
            async with requests:
                async for number, request in requests:
                    if self.abandoned:
                        unsent.append(number)
                        continue
                    try:
                        await client.publish(request, retries=self.retry)
                    except (Unauthorized, TransportError) as exc:
                        # Every later line would fail the same way: send no more.
                        self.abandoned = True
                        reading.cancel()
                        self.fail(number, str(exc), reading)
                    except BusEventsError as exc:
                        self.fail(number, str(exc), reading)
                    else:
                        self.accepted += 1
                        self.progress()

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(publisher, receive_channel.clone())
            receive_channel.close()
            async with send_channel:
                with reading:
                    async for number, line in _lines(source):
                        if line is None:
                            self.fail(
                                number, f"longer than {_mib(MAX_LINE)}: not an event", reading
                            )
                            continue
                        request = self._parse(number, line, reading)
                        if request is not None:
                            await send_channel.send((number, request))
        if unsent:
            self.diag.note(
                f"{len(unsent)} line(s) read but not sent after that failure: "
                f"{', '.join(map(str, sorted(unsent)[:10]))}{' …' if len(unsent) > 10 else ''}"
            )

    def _parse(self, number: int, line: bytes, scope: trio.CancelScope) -> PublishRequest | None:
        import msgspec

        from busevents import PublishRequest

        try:
            item = _line_decoder()(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.fail(number, f"not an event envelope: {exc}", scope)
            return None
        name = item.name or self.name
        if not name:
            self.fail(number, "no name: the line has none and --name was not given", scope)
            return None
        metadata = {**(self.metadata or {}), **(item.metadata or {})} or None
        return PublishRequest(
            name=name,
            payload=item.payload,
            correlation_id=item.correlation_id,
            metadata=metadata,
        )


@functools.cache
def _line_decoder() -> Callable[[bytes], Any]:
    import msgspec

    # defstruct: this module's annotations are strings that msgspec could not resolve.
    Line = msgspec.defstruct(
        "Line",
        [
            ("name", str | None, None),
            ("payload", msgspec.Raw, msgspec.Raw(b"null")),
            ("correlation_id", str | None, None),
            ("metadata", dict[str, str] | None, None),
        ],
        rename={"correlation_id": "correlationId"},
    )
    return msgspec.json.Decoder(Line).decode


#: Longest ``--ndjson`` line: longer ones are reported (by number) and skipped unread.
MAX_LINE = 16 * 1024 * 1024


async def _lines(
    source: BinaryIO, max_line: int = MAX_LINE
) -> AsyncIterator[tuple[int, bytes | None]]:
    """Numbered non-blank lines of ``source``, read in blocks as they become available.

    A line longer than ``max_line`` bytes is given as ``None`` (once) and the
    rest of it is skipped without being kept.  Each byte is looked at once: a
    long line arriving in many blocks costs linear time.
    """
    import trio

    stream = trio.wrap_file(source)
    number = 0
    pending = bytearray()  # the start of the current line
    skipping = False  # the current line is too long: drop it up to its newline
    while True:
        block: bytes = await stream.read1(1 << 16)  # type: ignore[misc]
        if not block:
            break
        start = 0
        while (end := block.find(b"\n", start)) >= 0:
            number += 1
            if skipping:
                skipping = False
            else:
                pending += block[start:end]
                if len(pending) > max_line:
                    yield number, None
                elif pending.strip():
                    yield number, bytes(pending)
                pending.clear()
            start = end + 1
        if not skipping:
            pending += memoryview(block)[start:]
            if len(pending) > max_line:
                skipping = True
                pending.clear()
                yield number + 1, None
    if not skipping and pending.strip():
        yield number + 1, bytes(pending)
