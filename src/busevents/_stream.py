"""EventStream: an open NDJSON stream of events, and its iterators.

``async for event in stream`` yields :class:`Event` values, ``stream.batches()``
a list per network read (fastest), ``stream.raw_batches()`` the original bytes
of validated envelope lines (for pass-through output).  Events received before
a broken line or a dropped connection are always delivered before the error.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import trio

from ._contracts import Event, StreamSpec, event_id_key
from ._errors import InvalidEvent, StreamError, StreamInterrupted, StreamStalled, bounded_text
from ._ndjson import NDJSONDecoder
from ._responses import Inflater, describe_cause, format_seconds

__all__ = ["EventStream"]


class _EnvelopeCheck(msgspec.Struct, gc=False):
    """What pass-through output validates of each line: an object with id and name."""

    id: str
    name: str


_decode_id = msgspec.json.Decoder(_EnvelopeCheck).decode


class _Correlation(msgspec.Struct, gc=False, rename={"correlation_id": "correlationId"}):
    """What the correlation filter reads of a validated line."""

    correlation_id: str | None = None


_decode_correlations = msgspec.json.Decoder(_Correlation).decode_lines


class EventStream:
    """An open stream of events; iterate it with ``async for``.

    ``async for event in stream`` yields :class:`Event` values;
    ``async for batch in stream.batches()`` yields them a list per network read
    (fastest); ``async for block in stream.raw_batches()`` yields the original
    bytes of validated envelope lines (for pass-through output).  Use one of
    the three per stream.  Events received before a broken line or a dropped
    connection are always delivered before the error is raised.
    """

    def __init__(
        self,
        response: httpx.Response,
        spec: StreamSpec,
        max_line: int,
        url: str,
        stall_timeout: float | None = None,
        *,
        correlation_id: str | None = None,
    ) -> None:
        self.spec = spec
        #: Only events with this correlation id are yielded (filtered here, in the client).
        self.correlation_id = correlation_id
        self._raw = False
        self._stall_timeout = stall_timeout
        self.url = url
        self.bytes_received = 0
        self._response = response
        self._max_line = max_line
        self._chunks: AsyncIterator[bytes] | None = None
        self._decoder: NDJSONDecoder[Any] | None = None
        self._feed: Any = None
        self._pending: list[Event] = []
        self._pos = 0
        # Resuming after a cursor: skip up to it ourselves, in case the provider
        # ignores `after` (cleared at the first later event: ids only grow).
        self._skip_to = event_id_key(spec.after) if spec.after is not None else None
        # Why reading cannot go on (a read was cancelled or failed): httpx closes the
        # connection then, and its iterator would just end, as if the stream had.
        self._broken: str | None = None

    @property
    def events_received(self) -> int:
        """Complete events received so far (those a correlation filter skipped included)."""
        return self._decoder.events if self._decoder is not None else 0

    def __aiter__(self) -> EventStream:
        self._begin(Event, raw=False)
        return self

    async def __anext__(self) -> Event:
        if self._pos < len(self._pending):
            event = self._pending[self._pos]
            self._pos += 1
            return event
        if self._decoder is None:  # __anext__ without __aiter__ (anext(stream))
            self._begin(Event, raw=False)
        batch = await self._read()
        if batch is None:
            raise StopAsyncIteration
        self._pending, self._pos = batch, 1
        return batch[0]  # type: ignore[no-any-return]

    def batches(self) -> AsyncIterator[list[Event]]:
        """The events, a list per network read."""
        self._begin(Event, raw=False)
        return _Batches(self)

    def raw_batches(self) -> AsyncIterator[bytes]:
        """Validated envelope lines, their original bytes, a block per network read.

        Each line is checked to be a JSON object with string ``id`` and ``name``;
        blank keep-alive lines are left out; nothing is re-encoded.
        """
        self._begin(_EnvelopeCheck, raw=True)
        return _RawBlocks(self)

    def _begin(self, type: Any, *, raw: bool) -> None:
        if self._decoder is not None:
            raise RuntimeError("this stream is already being read")
        self._decoder = decoder = NDJSONDecoder(type, max_line=self._max_line)
        self._feed = decoder.feed_raw if raw else decoder.feed
        self._raw = raw
        try:
            inflater = Inflater.of(self._response)
        except ValueError as exc:
            raise StreamError(
                f"the stream from {self.url} came with {exc}, which busevents does not "
                "decode (it asks for identity): turn compression off for "
                "application/x-ndjson in the proxy or provider",
                offset=0,
                event_number=1,
            ) from None
        chunks = self._response.aiter_raw()
        self._chunks = chunks if inflater is None else _Inflating(chunks, inflater)

    async def _read(self) -> list[Any] | None:
        """The next non-empty batch, or None at the clean end of the stream."""
        decoder, chunks, feed = self._decoder, self._chunks, self._feed
        assert decoder is not None and chunks is not None
        while True:
            decoder.check()  # an error found with the last batch, once it was consumed
            if self._broken is not None:
                raise self._interrupted(self._broken)
            try:
                if self._stall_timeout is None:
                    chunk = await chunks.__anext__()
                else:
                    chunk = await self._read_or_stall(chunks, self._stall_timeout)
            except StopAsyncIteration:
                decoder.close()
                return None
            except httpx.HTTPError as exc:
                self._broken = "failed"
                raise self._interrupted(bounded_text(describe_cause(exc), 200)) from exc
            except zlib.error as exc:
                self._broken = "failed"
                raise InvalidEvent(
                    f"the compressed stream from {self.url} is corrupt after "
                    f"{decoder.events} events: {exc}",
                    offset=decoder.offset,
                    event_number=decoder.events + 1,
                ) from None
            except BaseException as exc:
                # Cancelled (a deadline around one read), a stall, a corrupt encoding…
                self._broken = "was cancelled" if isinstance(exc, trio.Cancelled) else "failed"
                raise
            self.bytes_received += len(chunk)
            batch = feed(chunk)
            if batch and self._skip_to is not None:
                batch = self._skip(batch)
            if batch and self.correlation_id is not None:
                batch = self._correlated(batch)
            if batch:
                return batch  # type: ignore[no-any-return]

    def _skip(self, batch: list[Any]) -> list[Any]:
        """``batch`` without the events up to the ``after`` cursor (see :meth:`listen`)."""
        cursor = self._skip_to
        if isinstance(batch[0], bytes):  # raw blocks: look at each line's id
            lines = [line for block in batch for line in block.splitlines(keepends=True)]
            ids = [_decode_id(line).id for line in lines]
        else:
            lines, ids = batch, [event.id for event in batch]
        for index, event_id in enumerate(ids):
            key = event_id_key(event_id)
            if key is None or cursor is None or key > cursor:
                # An id of another form cannot be ordered: it is passed on.
                self._skip_to = None
                kept = lines[index:]
                return [b"".join(kept)] if isinstance(batch[0], bytes) else kept
        return []

    def _correlated(self, batch: list[Any]) -> list[Any]:
        """The part of ``batch`` (events, or raw blocks) with the wanted correlation id."""
        wanted = self.correlation_id
        if not self._raw:
            return [event for event in batch if event.correlation_id == wanted]
        blocks = []
        for block in batch:
            # The lines are validated and blank lines removed: one value per line.
            ids = _decode_correlations(block)
            lines = block.split(b"\n")  # never splitlines(): a CR inside a line is JSON space
            kept = b"".join(
                line + b"\n"
                for line, value in zip(lines, ids, strict=False)
                if value.correlation_id == wanted
            )
            if kept:
                blocks.append(kept)
        return blocks

    def _interrupted(self, why: str) -> StreamInterrupted:
        """The error for a read that cannot go on: ``why`` is "failed", "was
        cancelled" or the reason of the failure that happens now."""
        decoder = self._decoder
        assert decoder is not None
        if why == "was cancelled":
            why = (
                "; a read was cancelled, which closes the connection: open a new stream "
                "(replay=True catches up), and put a deadline around the whole iteration "
                "rather than around one read"
            )
        elif why == "failed":
            why = "; an earlier read failed: open a new stream"
        else:
            why = ": " + why
        return StreamInterrupted(
            f"connection to {self.url} failed after {decoder.events} events "
            f"({decoder.offset} bytes){why}",
            url=self.url,
            offset=decoder.offset,
            event_number=decoder.events + 1,
        )

    async def _read_or_stall(self, chunks: AsyncIterator[bytes], limit: float) -> bytes:
        with trio.move_on_after(limit):
            return await chunks.__anext__()
        decoder = self._decoder
        assert decoder is not None
        raise StreamStalled(
            f"no data from {self.url} for {format_seconds(limit)} (the stall timeout) "
            f"after {decoder.events} events; the connection is presumed dead",
            url=self.url,
            offset=decoder.offset,
            event_number=decoder.events + 1,
        )

    async def aclose(self) -> None:
        """Stop reading; the owning ``listen`` block closes the connection."""
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            with trio.CancelScope(shield=True):
                await chunks.aclose()  # type: ignore[attr-defined]


class _Inflating:
    """The chunks of a gzip- or deflate-encoded body, inflated a bounded piece at a time."""

    __slots__ = ("_chunks", "_done", "_inflater")

    PIECE = 64 * 1024

    def __init__(self, chunks: AsyncIterator[bytes], inflater: Inflater) -> None:
        self._chunks = chunks
        self._inflater = inflater
        self._done = False

    def __aiter__(self) -> _Inflating:
        return self

    async def __anext__(self) -> bytes:
        inflater = self._inflater
        while True:
            pending = inflater.pending
            if pending:
                data = pending  # the rest of the last chunk, held back by the bound
            elif self._done:
                raise StopAsyncIteration
            else:
                try:
                    data = await self._chunks.__anext__()
                except StopAsyncIteration:
                    self._done = True
                    raise
            piece = inflater.inflate(data, self.PIECE)  # zlib.error: see _read
            if piece:
                return piece

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]


class _Batches:
    __slots__ = ("_stream",)

    def __init__(self, stream: EventStream) -> None:
        self._stream = stream

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> list[Event]:
        batch = await self._stream._read()
        if batch is None:
            raise StopAsyncIteration
        return batch


class _RawBlocks:
    """One validated block of envelope lines per step (a read gives one or two)."""

    __slots__ = ("_blocks", "_stream")

    def __init__(self, stream: EventStream) -> None:
        self._stream = stream
        self._blocks: list[bytes] = []

    def __aiter__(self) -> _RawBlocks:
        return self

    async def __anext__(self) -> bytes:
        if not self._blocks:
            blocks = await self._stream._read()
            if blocks is None:
                raise StopAsyncIteration
            self._blocks = blocks
        return self._blocks.pop(0)
