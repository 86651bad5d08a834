"""EventStream: an open NDJSON stream of events, its iterators and its filters.

``async for event in stream`` yields :class:`Event` values, ``stream.batches()``
a list per network read (fastest), ``stream.raw_batches()`` the original bytes
of validated envelope lines (for pass-through output).  Events received before
a broken line or a dropped connection are always delivered before the error.

The filters (the ``after`` cursor, a correlation id, a de-duplication window, a
limit: :meth:`EventStream.filter`) run here, once, for every iterator: lines
are cut at ``\n`` only, since a bare CR inside a line is JSON whitespace.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from ._contracts import Event, StreamSpec, event_id_key
from ._errors import InvalidEvent, StreamError, StreamInterrupted, StreamStalled, bounded_text
from ._ndjson import NDJSONDecoder
from ._responses import Inflater, describe_cause, format_seconds

if TYPE_CHECKING:
    from ._http import HttpxStream
    from ._publish import StreamResponse
    from ._reconnect import RecentIds

__all__ = ["EventStream"]

log = logging.getLogger("busevents")


class _EnvelopeCheck(msgspec.Struct, gc=False):
    """What pass-through output validates of each line: an object with id and name."""

    id: str
    name: str


class _Head(msgspec.Struct, gc=False, rename={"correlation_id": "correlationId"}):
    """What the filters read of a validated line (the payload is skipped)."""

    id: str
    correlation_id: str | None = None


_decode_id = msgspec.json.Decoder(_Head).decode
_decode_heads = msgspec.json.Decoder(_Head).decode_lines

#: Said once per process: a following stream without chunked framing (an HTTP/1.0 hop).
_UNFRAMED_WARNED = False


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
        response: StreamResponse | HttpxStream,
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
        #: What a read raises when the connection fails (the transport's own errors).
        self._read_errors = response.read_errors
        self._max_line = max_line
        self._chunks: AsyncIterator[bytes] | None = None
        self._decoder: NDJSONDecoder[Any] | None = None
        self._feed: Any = None
        self._pending: list[Event] = []
        self._pos = 0
        # Resuming after a cursor: skip up to it ourselves, in case the provider
        # ignores `after` (cleared at the first later event: ids only grow).
        self._skip_to = event_id_key(spec.after) if spec.after is not None else None
        self._unseen: RecentIds | None = None
        self._limit: int | None = None
        self._dropped = 0  # events received but filtered out
        self._last: Any = None  # the last event or raw block handed out
        #: True once the stream ended cleanly (the provider finished it).
        self.ended = False
        # Why reading cannot go on (a read was cancelled or failed): httpx closes the
        # connection then, and its iterator would just end, as if the stream had.
        self._broken: str | None = None
        headers = response.headers
        # Without chunks or a length, the end of the body is the end of the connection:
        # a provider that crashed looks like one that finished (an HTTP/1.0 hop).
        self._unframed = (
            "chunked" not in headers.get("transfer-encoding", "").lower()
            and "content-length" not in headers
        )
        if self._unframed and spec.follow:
            _warn_unframed(url, response.http_version)

    def filter(
        self,
        *,
        correlation_id: str | None = None,
        unseen: RecentIds | None = None,
        limit: int | None = None,
    ) -> EventStream:
        """Narrow what every iterator yields; call before iterating.  Returns the stream.

        ``correlation_id``: only events carrying it.  ``unseen``: skip the events
        whose id is in this window of recent ids (and remember the others): the
        de-duplication of a reconnecting listener.  ``limit``: hand out at most
        this many events, then end (``ended`` stays False: the stream did not).
        """
        if self._decoder is not None:
            raise RuntimeError("filter() must be called before the stream is read")
        if correlation_id is not None:
            self.correlation_id = correlation_id
        if unseen is not None:
            self._unseen = unseen
        if limit is not None:
            if limit < 1:
                raise ValueError("limit must be at least 1")
            self._limit = limit
        return self

    @property
    def last_id(self) -> str | None:
        """The id of the last event handed out (the cursor to resume after), or None."""
        pos = self._pos
        if pos < len(self._pending):  # event by event, in the middle of a network read
            return self._pending[pos - 1].id
        last = self._last
        if last is None:
            return None
        if isinstance(last, bytes):  # a raw block: it ends with its last line's newline
            return _decode_id(last[last.rfind(b"\n", 0, -1) + 1 :]).id
        return last.id  # type: ignore[no-any-return]

    @property
    def events_delivered(self) -> int:
        """Events handed out so far (received, less those the filters dropped and those
        of the last network read not handed out yet, event by event)."""
        return self.events_received - self._dropped - (len(self._pending) - self._pos)

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
            inflater = Inflater.for_encoding(self._response.headers.get("content-encoding"))
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
            if self._limit == 0:
                return None  # the limit was reached: the stream is done for this reader
            decoder.check()  # an error found with the last batch, once it was consumed
            if self._broken is not None:
                raise self._interrupted(self._broken)
            try:
                if self._stall_timeout is None:
                    chunk = await chunks.__anext__()
                else:
                    chunk = await self._read_or_stall(chunks, self._stall_timeout)
            except StopAsyncIteration:
                self._end()
                return None
            except self._read_errors as exc:
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
            batch: list[Any] = feed(chunk)
            if not batch:
                continue
            if (
                self._skip_to is not None
                or self.correlation_id is not None
                or self._unseen is not None
                or self._limit is not None
            ):
                batch = self._select(batch)
                if not batch:
                    continue
            self._last = batch[-1]
            return batch

    def _end(self) -> None:
        """The body ended: an error for a following stream that cannot be told from a crash."""
        decoder = self._decoder
        assert decoder is not None
        decoder.close()
        if self._unframed and self.spec.follow:
            self._broken = "failed"
            raise StreamInterrupted(
                f"the stream from {self.url} ended after {decoder.events} events without an "
                "end marker: the response was not chunked (an HTTP/1.0 hop?), so a "
                "provider that crashed cannot be told from one that finished; " + _UNFRAMED_FIX,
                url=self.url,
                offset=decoder.offset,
                event_number=decoder.events + 1,
            )
        self.ended = True

    def _select(self, batch: list[Any]) -> list[Any]:
        """``batch`` (events, or raw blocks) through the filters: events up to the
        ``after`` cursor, of another correlation id, already seen, beyond the limit."""
        raw = self._raw
        if raw:
            # The lines are validated and blank lines removed: one value per line, and
            # "\n" only ends a line (a bare CR inside one is JSON whitespace).
            lines = [line for block in batch for line in block.split(b"\n")[:-1]]
            heads = [head for block in batch for head in _decode_heads(block)]
        else:
            lines = heads = batch
        cursor, wanted, unseen = self._skip_to, self.correlation_id, self._unseen
        left = self._limit
        kept = []
        for line, head in zip(lines, heads, strict=True):
            if cursor is not None:
                key = event_id_key(head.id)
                if key is not None and key <= cursor:
                    continue
                # A later id, or one of another form (which cannot be ordered): pass on.
                cursor = self._skip_to = None
            if wanted is not None and head.correlation_id != wanted:
                continue
            if unseen is not None and unseen.seen(head.id):
                continue
            kept.append(line)
            if left is not None:
                left -= 1
                if not left:
                    break
        if left is not None:
            self._limit = left
        self._dropped += len(lines) - len(kept)
        if not raw or not kept:
            return kept
        kept.append(b"")
        return [b"\n".join(kept)]

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


_UNFRAMED_FIX = (
    'put HTTP/1.1 on every hop (nginx: proxy_http_version 1.1; and proxy_set_header Connection "";)'
)


def _warn_unframed(url: str, version: str) -> None:
    """Say once per process that a following stream arrived without chunked framing."""
    global _UNFRAMED_WARNED
    if _UNFRAMED_WARNED:
        return
    _UNFRAMED_WARNED = True
    log.warning(
        "the stream from %s arrived as %s without chunked framing: its end cannot be told "
        "from a crash of the provider or of a proxy, so an end is treated as a failure; %s",
        url,
        version,
        _UNFRAMED_FIX,
    )
