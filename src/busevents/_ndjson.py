"""Incremental NDJSON framing and batch decoding: the listen hot path.

Bytes arrive in chunks cut anywhere.  :class:`NDJSONDecoder` keeps at most
one partial line, cuts each chunk at its last ``\\n`` and hands all the
complete lines of the chunk to ``msgspec``'s ``Decoder.decode_lines`` in one
call, through a ``memoryview`` (no copy of the bulk of the chunk).  Blank
keep-alive lines and CRLF endings are accepted by ``decode_lines`` itself.

When a batch fails to decode, the batch is decoded again line by line (the
slow path runs only on error) so that every event before the bad line is
still delivered, and the error names the byte offset and event number of the
bad line.  The error is raised by the next :meth:`NDJSONDecoder.check` or
:meth:`NDJSONDecoder.close`, after the caller has consumed the good events.
"""

from __future__ import annotations

import re
from typing import Any, Generic, TypeVar

import msgspec

from ._errors import InvalidEvent, LineTooLong, StreamError, StreamTruncated

__all__ = ["DEFAULT_MAX_LINE", "NDJSONDecoder"]

T = TypeVar("T")

#: Default maximum length of one line, in bytes.
DEFAULT_MAX_LINE = 16 * 1024 * 1024

Buffer = bytes | bytearray | memoryview

#: From this max_line on, over-long lines are looked for by jumps (cheaper above about
#: 400 bytes, measured in instructions), below it by a regex.
_JUMP_FROM = 512

_BLANK_LINES = re.compile(rb"^[ \t\r]*\n", re.MULTILINE)


class NDJSONDecoder(Generic[T]):
    """Decode a stream of NDJSON chunks into ``type`` values, batch by batch.

    ``feed(chunk)`` returns the values of the lines completed by ``chunk``;
    ``feed_raw(chunk)`` validates those lines the same way but returns their
    original bytes (for pass-through output that must not re-encode).
    """

    __slots__ = (
        "_decoder",
        "_error",
        "_events",
        "_long_line",
        "_max_line",
        "_offset",
        "_partial",
        "_too_long",
    )

    def __init__(self, type: type[T] | Any, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError("max_line must be positive")
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(type)
        self._max_line = max_line
        # A line longer than max_line among a chunk's complete lines, for small limits.
        self._long_line = (
            re.compile(rb"\n[^\n]{%d}" % (max_line + 1)) if max_line < _JUMP_FROM else None
        )
        self._partial = bytearray()
        self._offset = 0  # stream offset of the first byte not yet decoded
        self._events = 0  # events decoded so far
        self._error: StreamError | None = None
        self._too_long: tuple[int, int] | None = None  # (offset, size) found while framing

    @property
    def events(self) -> int:
        """How many events were decoded so far."""
        return self._events

    @property
    def offset(self) -> int:
        """Bytes of the stream consumed so far (complete lines only)."""
        return self._offset

    # -- framing -----------------------------------------------------------

    def _frame(self, chunk: bytes | bytearray) -> list[Buffer]:
        """Cut ``chunk`` into at most two blocks of complete lines, keep the rest.

        The first block is the kept partial line completed by the chunk, the
        second every complete line after it, as a view of ``chunk`` (no copy).
        An over-long line stops the framing: the blocks before it are returned
        and ``_too_long`` records where it starts, to fail once they are decoded.
        """
        if self._error is not None or self._too_long is not None:
            return []
        partial = self._partial
        # Stream offset of chunk[0]: every earlier complete line was decoded already.
        base = self._offset + len(partial)
        last = chunk.rfind(b"\n")
        if last < 0:
            partial += chunk
            if len(partial) > self._max_line:
                self._too_long = (self._offset, len(partial))
                partial.clear()  # never decoded: don't hold it
            return []
        blocks: list[Buffer] = []
        view = memoryview(chunk)
        start = 0
        if partial:
            start = chunk.find(b"\n") + 1
            size = len(partial) + start - 1  # the newline is not part of the line
            if size > self._max_line:
                self._too_long = (self._offset, size)
                partial.clear()
                return []
            partial += view[:start]
            blocks.append(bytes(partial))
            partial.clear()
        end = last + 1
        if end - start > self._max_line + 1:
            # Complete lines longer together than the limit (a limit below the read
            # size): one C-speed scan for a single line that is too long.
            bad = self._find_long_line(chunk, start, end)
            if bad is not None:
                if bad > start:
                    blocks.append(view[start:bad])
                self._too_long = (base + bad, chunk.find(b"\n", bad) - bad)
                return blocks
        if start < end:
            blocks.append(view[start:end])
        rest = len(chunk) - end
        if rest > self._max_line:
            self._too_long = (base + end, rest)
        elif rest:
            partial += view[end:]
        return blocks

    def _find_long_line(self, chunk: bytes | bytearray, start: int, end: int) -> int | None:
        """Where the first line of ``chunk[start:end]`` (complete lines) longer than
        ``max_line`` starts, or None.  No Python step per line: a regular
        expression for small limits, a jump of ``max_line`` bytes per step (at
        most ``2 * (end - start) / max_line`` steps) for large ones."""
        limit = self._max_line
        if self._long_line is None:
            pos = start
            while end - pos > limit + 1:
                newline = chunk.rfind(b"\n", pos, pos + limit + 1)
                if newline < 0:
                    return pos
                pos = newline + 1  # every line up to here fits in the window
            return None
        first = chunk.find(b"\n", start, end)
        if first - start > limit:
            return start
        match = self._long_line.search(chunk, first, end)
        return match.start() + 1 if match else None

    def _fail_too_long(self) -> None:
        assert self._too_long is not None
        offset, size = self._too_long
        self._partial = bytearray()
        self._error = LineTooLong(
            f"line at byte offset {offset} (event {self._events + 1}) is longer than "
            f"the {self._max_line}-byte limit (at least {size} bytes); "
            "raise max_line if such events are expected",
            offset=offset,
            event_number=self._events + 1,
        )

    # -- decoding ----------------------------------------------------------

    def feed(self, chunk: bytes | bytearray) -> list[T]:
        """Decode the lines completed by ``chunk``; values before any bad line."""
        out: list[T] = []
        for block in self._frame(chunk):
            out += self._decode(block)
            if self._error is not None:
                return out
        if self._too_long is not None and self._error is None:
            self._fail_too_long()
        return out

    def feed_raw(self, chunk: bytes | bytearray) -> list[bytes]:
        """Validate the lines completed by ``chunk``; return their original bytes.

        Blank keep-alive lines are left out; every other byte is as received.
        """
        out: list[bytes] = []
        blocks = self._frame(chunk)
        if len(blocks) == 2:
            # The completed partial line and the rest: one block, so one decode call
            # and one write downstream (the copy costs less than a second of each).
            blocks = [b"".join(blocks)]
        for block in blocks:
            size, count = self._validate(block)
            if count:
                raw = bytes(block[:size])  # a copy costs little beside the decode
                # Every non-blank line decoded to one value, so more line ends than
                # values means blank lines (keep-alives).  replace() runs at memchr
                # speed, several times faster than count() or a two-byte search.
                if len(raw) - len(raw.replace(b"\n", b"")) != count:
                    raw = _BLANK_LINES.sub(b"", raw)
                out.append(raw)
            if self._error is not None:
                return out
        if self._too_long is not None and self._error is None:
            self._fail_too_long()
        return out

    def _decode(self, block: Buffer) -> list[T]:
        try:
            values = self._decoder.decode_lines(block)
        except Exception:  # any failure (RecursionError too): find the bad line
            return self._decode_slowly(block)[0]
        self._events += len(values)
        self._offset += len(block)
        return values

    def _validate(self, block: Buffer) -> tuple[int, int]:
        """Decode ``block`` only to check it: how many leading bytes and values are good."""
        try:
            count = len(self._decoder.decode_lines(block))
        except Exception:  # any failure (RecursionError too): find the bad line
            values, size = self._decode_slowly(block)
            return size, len(values)
        self._events += count
        self._offset += len(block)
        return len(block), count

    def _decode_slowly(self, block: Buffer) -> tuple[list[T], int]:
        """Line by line: the values and byte length before the first bad line."""
        data = bytes(block)
        values: list[T] = []
        pos = 0
        decode = self._decoder.decode
        while pos < len(data):
            end = data.index(b"\n", pos) + 1
            line = data[pos:end]
            if line.strip():
                try:
                    values.append(decode(line))
                except Exception as exc:  # msgspec's errors, RecursionError, MemoryError…
                    self._events += len(values)
                    self._offset += pos
                    self._error = error = InvalidEvent(
                        f"invalid event at byte offset {self._offset} "
                        f"(event {self._events + 1}): {_describe(exc)}; "
                        f"the line starts {_excerpt(line)}",
                        offset=self._offset,
                        event_number=self._events + 1,
                    )
                    error.__cause__ = exc
                    return values, pos
            pos = end
        # Not reached in practice: the batch failed as a whole, so one line must.
        self._events += len(values)
        self._offset += pos
        return values, pos

    # -- end of stream -----------------------------------------------------

    def check(self) -> None:
        """Raise the error found by the last ``feed``, if any."""
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """The stream ended: raise a pending error, or :class:`StreamTruncated` when a
        partial line is left over (it is never decoded)."""
        self.check()
        if self._partial.strip():
            size = len(self._partial)
            self._partial = bytearray()
            self._error = StreamTruncated(
                f"stream ended in the middle of a line: {size} bytes after byte offset "
                f"{self._offset} (event {self._events + 1}) were not a complete event",
                offset=self._offset,
                event_number=self._events + 1,
            )
            raise self._error


def _describe(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply to decode"
    if not isinstance(exc, msgspec.MsgspecError):
        return f"cannot decode ({type(exc).__name__})"
    text = str(exc)
    # decode() on one line reports paths as `$…`; make the message about the event.
    return text.replace(" - at `$`", "").replace("`$.", "`")


def _excerpt(line: bytes, limit: int = 60) -> str:
    from ._errors import bounded_text

    return repr(bounded_text(line, limit))
