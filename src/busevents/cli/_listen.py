"""``listen``: stream events to stdout, a file, or nowhere, with stop conditions."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from cyclopts import Parameter

from ._app import EXIT_FAILURE, EXIT_OK, Duration, Globals, UsageError, app
from ._commands import _client, run_client_command
from ._output import TextFormatter

if TYPE_CHECKING:
    from busevents import Event, EventStream

    from ._output import Diagnostics, Results


@app.command
def listen(
    *,
    name: Annotated[str, Parameter(help="Event name to stream.")],
    delivery: Annotated[
        Literal["broadcast", "unicast"],
        Parameter(help="broadcast: every listener gets each event; unicast: one of the group."),
    ] = "broadcast",
    group: Annotated[
        str | None,
        Parameter(help="Unicast group: listeners of one group compete. [default: default]"),
    ] = None,
    consumer: Annotated[
        str | None, Parameter(help="Stable consumer name inside the group. [default: default]")
    ] = None,
    replay: Annotated[bool, Parameter(help="First send the existing matching events.")] = False,
    follow: Annotated[
        bool, Parameter(help="Keep following new events; --no-follow ends after the replay.")
    ] = True,
    count: Annotated[
        int | None,
        Parameter(help="Stop after this many events (exit 0); exit 1 if the stream ends first."),
    ] = None,
    correlation_id: Annotated[
        str | None, Parameter(help="Only events with this correlation id.")
    ] = None,
    idle_timeout: Annotated[
        Duration | None,
        Parameter(help="Stop (exit 0) when no event arrived for this long, e.g. 2s."),
    ] = None,
    stats: Annotated[
        bool,
        Parameter(
            negative="",
            show_default=False,
            help="Show events, events/s, bytes and elapsed time on stderr "
            "(live on a terminal, a summary at the end).",
        ),
    ] = False,
) -> int:
    """Stream matching events as newline-delimited JSON.

    json (the default) writes each envelope exactly as received, one per line,
    flushed as it arrives; text writes one aligned, readable line per event.
    With an explicit --timeout, stops cleanly when it passes (exit 0, or 1 if
    --count was not reached).

    Example: bus-events listen --name example.ping --replay --no-follow
    """
    if group is not None and delivery != "unicast":
        raise UsageError("--group needs --delivery unicast")
    if count is not None and count < 1:
        raise UsageError("--count must be at least 1")
    idle = None if idle_timeout is None else float(idle_timeout)

    async def body(g: Globals) -> int:
        import trio

        diag = g.diagnostics()
        results = g.results()
        meter = Meter(diag, live=stats and sys.stderr.isatty()) if stats else None
        writer = EventWriter(results, g.format, count, correlation_id, idle, meter)
        try:
            async with (
                _client(g) as client,
                client.listen(
                    name,
                    delivery=delivery,
                    group=group,
                    consumer=consumer,
                    replay=replay,
                    follow=follow,
                ) as stream,
            ):
                results.open()
                with trio.move_on_after(g.timeout if g.timeout_given else float("inf")):
                    await writer.run(stream)
        finally:
            results.close()
            if meter is not None:
                meter.finish()
        if count is not None and writer.written < count:
            diag.error(
                f"{writer.written} of the {count} events asked for arrived before the "
                f"{writer.stopped_by}"
            )
            return EXIT_FAILURE
        return EXIT_OK

    return run_client_command(body)


@functools.cache
def _correlation_decoder() -> Callable[[bytes], Any]:
    """Decodes only the correlation id of a line (filtering keeps the original bytes)."""
    import msgspec

    Line = msgspec.defstruct(
        "Line", [("correlation_id", str | None, None)], rename={"correlation_id": "correlationId"}
    )
    return msgspec.json.Decoder(Line).decode


@dataclass
class EventWriter:
    """Write a stream's events until it ends, ``count`` is reached or it goes idle."""

    results: Results
    format: str | None
    count: int | None = None
    correlation_id: str | None = None
    idle_timeout: float | None = None
    meter: Meter | None = None
    written: int = 0
    stopped_by: str = "stream ended"
    _text: TextFormatter | None = field(default=None, repr=False)

    async def run(self, stream: EventStream) -> int:
        """Write events; return how many were written."""
        if self.format == "text":
            self._text = TextFormatter(self.results.is_terminal)
            units = stream.batches()
        elif self.count is None and self.correlation_id is None:
            await self._pass_through(stream)
            return self.written
        else:
            units = stream.raw_batches()  # type: ignore[assignment]
        self.stopped_by = "stream ended"
        while (unit := await self._next(units)) is not None:
            if self.meter is not None:
                self.meter.bytes = stream.bytes_received
            if self._write(unit):
                self.stopped_by = "count"
                break
        return self.written

    async def _pass_through(self, stream: EventStream) -> None:
        """The hot path: validated blocks straight to the output, nothing counted twice
        (the decoder already counts events)."""
        blocks = stream.raw_batches()
        write = self.results.write
        meter = self.meter
        self.stopped_by = "stream ended"
        try:
            while (block := await self._next(blocks)) is not None:
                write(block)
                if meter is not None:
                    meter.bytes = stream.bytes_received
                    meter.add(stream.events_received - meter.events)
        finally:
            self.written = stream.events_received

    async def _next(self, units: Any) -> Any:
        """The next unit, or None at the end of the stream or after the idle timeout."""
        if self.idle_timeout is None:
            return await anext(units, None)
        import trio

        with trio.move_on_after(self.idle_timeout):
            return await anext(units, None)
        self.stopped_by = "idle timeout"
        return None

    def _write(self, unit: bytes | list[Event]) -> bool:
        """Write one block or batch; True once ``count`` events were written."""
        left = None if self.count is None else self.count - self.written
        if isinstance(unit, list):
            events = unit
            if self.correlation_id is not None:
                events = [e for e in events if e.correlation_id == self.correlation_id]
            events = events[:left]
            assert self._text is not None
            self.results.write_lines([self._text.line(e) for e in events])
            n = len(events)
        else:
            if self.correlation_id is not None or left is not None:
                lines = unit.splitlines(keepends=True)
                if self.correlation_id is not None:
                    decode = _correlation_decoder()
                    lines = [x for x in lines if decode(x).correlation_id == self.correlation_id]
                lines = lines[:left]
                unit = b"".join(lines)
                n = len(lines)
            else:
                n = unit.count(b"\n")
            if unit:
                self.results.write(unit)
        self.written += n
        if self.meter is not None:
            self.meter.add(n)
        return self.count is not None and self.written >= self.count


class Meter:
    """Counts for ``--stats``: a live line on a terminal, a summary at the end."""

    def __init__(self, diag: Diagnostics, *, live: bool) -> None:
        self.diag = diag
        self.live = live
        self.events = 0
        self.bytes = 0
        self.start = time.monotonic()
        self._shown = 0.0

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return (
            f"{self.events} events, {self.events / elapsed:,.0f} events/s, "
            f"{self.bytes / 1e6:,.2f} MB, {elapsed:,.1f} s"
        )

    def add(self, events: int) -> None:
        self.events += events
        now = time.monotonic()
        if self.live and now - self._shown > 0.2:
            self._shown = now
            sys.stderr.write(f"\r\x1b[Kbus-events: {self._line()}")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.live:
            sys.stderr.write("\r\x1b[K")
        self.diag.note(self._line())
