"""``listen``: stream events to stdout, a file, or nowhere, with stop conditions.

With ``--retry`` a dropped connection is reconnected with the shared backoff
(``BUS_EVENTS_LISTENER_RETRY_MIN``/``_MAX``); with ``--replay`` too, events
already written are skipped by id, so the output holds each event once.  On a
pipe, a reader that went away (``| head -n 2``) ends the listen within about a
second even while the stream is quiet, as ``tail -f | head`` does.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from cyclopts import Parameter

from ._base import EXIT_FAILURE, EXIT_OK, Duration, Globals, UsageError, app
from ._commands import _client, run_client_command
from ._output import TextFormatter
from ._stats import plural, stats_line

if TYPE_CHECKING:
    from busevents import EventsClient, EventStream, RetryPolicy

    from ._output import Diagnostics, Results

#: How often stdout is checked for a reader that went away, in seconds.
READER_CHECK = 0.25


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
    retry: Annotated[
        bool | None,
        Parameter(
            show_default=False,
            help="Reconnect when the connection drops or the provider answers 5xx/429, "
            "with backoff (BUS_EVENTS_LISTENER_RETRY_MIN/_MAX); with --replay, events "
            "already written are skipped by id, so none is written twice. "
            "[default: BUS_EVENTS_LISTENER_RETRY, else off]",
        ),
    ] = None,
    max_retries: Annotated[
        int | None,
        Parameter(
            help="With --retry: give up (exit 1) after this many reconnects in a row "
            "that delivered nothing. [default: no limit]"
        ),
    ] = None,
) -> int:
    """Stream matching events as newline-delimited JSON.

    json (the default) writes each envelope exactly as received, one per line,
    flushed as it arrives; text writes one aligned, readable line per event.
    With an explicit --timeout, stops cleanly when it passes (exit 0, or 1 if
    --count was not reached).  With --retry it reconnects after a dropped
    connection; --retry --replay writes every event exactly once.

    Long-running: bus-events listen --name x --retry --replay -o events.ndjson

    Example: bus-events listen --name example.ping --replay --no-follow
    """
    if group is not None and delivery != "unicast":
        raise UsageError("--group needs --delivery unicast")
    if count is not None and count < 1:
        raise UsageError("--count must be at least 1")
    if max_retries is not None and max_retries < 0:
        raise UsageError("--max-retries must be 0 or more")
    idle = None if idle_timeout is None else float(idle_timeout)

    async def body(g: Globals) -> int:
        import trio

        from busevents import RetryPolicy

        _keep_heap_slack()
        diag = g.diagnostics()
        results = g.results()
        # A one-shot command reconnects only when asked: by --retry or by the variable.
        asked = os.environ.get("BUS_EVENTS_LISTENER_RETRY", "").strip() != ""
        policy = RetryPolicy.from_env()
        policy = RetryPolicy.from_env(enabled=policy.enabled and asked if retry is None else retry)
        meter = Meter(diag, live=stats and sys.stderr.isatty()) if stats else None
        writer = EventWriter(results, g.format, count, idle, meter)
        options = {
            "delivery": delivery,
            "group": group,
            "consumer": consumer,
            "replay": replay,
            "follow": follow,
            "correlation_id": correlation_id,
        }
        try:
            async with _client(g) as client, _reader_watch(results) as gone:
                with trio.move_on_after(g.timeout if g.timeout_given else float("inf")) as limit:
                    await _listen(client, name, options, writer, policy, max_retries, diag)
                if limit.cancelled_caught:
                    writer.stopped_by = f"--timeout deadline ({g.timeout:g} s) passed"
            if gone.is_set():
                raise BrokenPipeError("the reader of the output went away")
        finally:
            results.close()
            if meter is not None:
                meter.finish()
        if count is not None and writer.written < count:
            diag.error(
                f"{writer.written} of the {plural(count, 'event')} asked for arrived before the "
                f"{writer.stopped_by}"
            )
            return EXIT_FAILURE
        return EXIT_OK

    return run_client_command(body)


async def _listen(
    client: EventsClient,
    name: str,
    options: dict[str, Any],
    writer: EventWriter,
    policy: RetryPolicy,
    max_retries: int | None,
    diag: Diagnostics,
) -> None:
    """Stream into ``writer`` with the SDK's reconnect loop (``policy.enabled``: --retry).

    With --retry --replay a reconnect resumes after the last event written (the
    ``after=`` cursor) and skips ids in a bounded window: each event is written
    once, in constant memory however long the listen runs.
    """
    from busevents import DEDUPE_WINDOW, follow_stream

    def opened(stream: EventStream) -> None:
        writer.results.open()
        writer.results.widen_pipe()

    def retrying(error: BaseException | None, delay: float) -> None:
        diag.note(
            f"{error or 'the stream ended'}; reconnecting in {delay:.1f}s "
            f"({writer.written} events written so far)"
        )

    await follow_stream(
        client,
        name,
        writer.run,
        policy=policy,
        dedupe=DEDUPE_WINDOW if policy.enabled and options["replay"] else 0,
        max_retries=max_retries,
        on_up=opened,
        on_retry=retrying,
        **options,
    )


#: Slack glibc's heap keeps when it shrinks (``M_TOP_PAD``), for :func:`_keep_heap_slack`.
HEAP_SLACK = 16 * 1024 * 1024


def _keep_heap_slack() -> None:
    """Let glibc keep 16 MiB of freed heap instead of handing it back to the kernel.

    A fast stream passes a few megabytes of short-lived buffers per read (the
    socket's, h11's, the validated block); by default glibc returns the heap's
    top to the kernel whenever a megabyte or two is free, and the next read
    faults every page back in: 40,000 to 120,000 minor page faults and about
    0.1 s of system time per 200 MB, a fifth of the whole listen
    (benchmarks/README.md, issue 24).  This process is ours, so the allocator
    is tuned here, once; the SDK leaves its host's allocator alone.  Elsewhere
    than glibc this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):  # musl and others: no mallopt
        return
    mallopt(-2, HEAP_SLACK)  # M_TOP_PAD


@asynccontextmanager
async def _reader_watch(results: Results) -> AsyncIterator[Any]:
    """While inside, watch stdout (a pipe or socket) for a reader that went away.

    A quiet stream writes nothing, so a closed pipe would go unnoticed until the
    next event (hours, maybe).  When the reader goes, the block is cancelled and
    the returned event is set.
    """
    import select
    import stat

    import trio

    gone = trio.Event()
    fd = sys.stdout.fileno() if results.path is None and not results.quiet else -1
    try:
        watch = fd >= 0 and (
            stat.S_ISFIFO(os.fstat(fd).st_mode) or stat.S_ISSOCK(os.fstat(fd).st_mode)
        )
    except OSError:
        watch = False
    if not watch or not hasattr(select, "poll"):
        yield gone
        return

    async def watcher(scope: trio.CancelScope) -> None:
        poller = select.poll()
        poller.register(fd, 0)  # POLLERR and POLLHUP are always reported
        while not poller.poll(0):  # noqa: ASYNC110 (no event fires when a reader goes)
            await trio.sleep(READER_CHECK)
        gone.set()
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher, nursery.cancel_scope)
        try:
            yield gone
        finally:
            nursery.cancel_scope.cancel()


@dataclass
class EventWriter:
    """Write a stream's events until it ends, ``count`` is reached or it goes idle.

    The stream's own filters do the selecting (``EventStream.filter``: the count
    as a limit; correlation id and de-duplication are set by whoever opened it):
    blocks are written as they come, never split again here.
    """

    results: Results
    format: str | None
    count: int | None = None
    idle_timeout: float | None = None
    meter: Meter | None = None
    written: int = 0
    stopped_by: str = "stream ended"
    _text: TextFormatter | None = field(default=None, repr=False)

    async def run(self, stream: EventStream) -> int:
        """Write events until the stream ends; return how many were written in all."""
        if self.count is not None:
            stream.filter(limit=self.count - self.written)
        base = self.written  # events of earlier connections
        self.stopped_by = "stream ended"
        try:
            if self.format == "text":
                await self._text_lines(stream)
            else:
                await self._pass_through(stream)
        finally:
            self.written = base + stream.events_delivered
            if self.meter is not None:
                self.meter.bytes = stream.bytes_received
                self.meter.add(self.written - self.meter.events)
        if self.count is not None and self.written >= self.count:
            self.stopped_by = "count"
        return self.written

    async def _text_lines(self, stream: EventStream) -> None:
        text = self._text = self._text or TextFormatter(self.results.is_terminal)
        batches = stream.batches()
        write_lines = self.results.write_lines
        while (batch := await self._next(batches)) is not None:
            write_lines([text.line(e) for e in batch])
            self._progress(stream)

    async def _pass_through(self, stream: EventStream) -> None:
        """The hot path: validated blocks straight to the output, counted by the stream."""
        blocks = stream.raw_batches()
        write = self.results.write
        if self.meter is None:
            while (block := await self._next(blocks)) is not None:
                write(block)
            return
        while (block := await self._next(blocks)) is not None:
            write(block)
            self._progress(stream)

    def _progress(self, stream: EventStream) -> None:
        meter = self.meter
        if meter is not None:
            meter.bytes = stream.bytes_received
            meter.add(self.written + stream.events_delivered - meter.events)

    async def _next(self, units: Any) -> Any:
        """The next unit, or None at the end of the stream or after the idle timeout."""
        if self.idle_timeout is None:
            return await anext(units, None)
        import trio

        with trio.move_on_after(self.idle_timeout):
            return await anext(units, None)
        self.stopped_by = "idle timeout"
        return None


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
        return stats_line(self.events, self.bytes, elapsed)

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
