"""Where the CLI writes: results to stdout (or ``--output``), diagnostics to stderr.

Results are bytes written to a binary stream and flushed per batch, so a
pipe sees events as they arrive.  Diagnostics go to stderr only, with color
only when stderr is a terminal (or ``--color always``) and ``NO_COLOR`` is unset.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import TYPE_CHECKING, BinaryIO, Literal

if TYPE_CHECKING:
    from busevents import Event

__all__ = ["Diagnostics", "Results", "TextFormatter", "use_color"]

ColorMode = Literal["auto", "always", "never"]

_RED = "\x1b[31m"
_YELLOW = "\x1b[33m"
_BOLD = "\x1b[1m"
_RESET = "\x1b[0m"


def use_color(mode: ColorMode, stream: object) -> bool:
    """Whether to color ``stream``: ``always``, ``never``, or ``auto`` (a TTY and no NO_COLOR)."""
    if mode == "always":
        return True
    if mode == "never" or os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Diagnostics:
    """Messages for humans, on stderr: errors always, notes unless quiet, debug with -v."""

    def __init__(self, *, color: bool, verbose: int = 0, quiet: bool = False) -> None:
        self.color = color
        self.verbose = verbose
        self.quiet = quiet

    def _paint(self, text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if self.color else text

    def _write(self, line: str) -> None:
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (BrokenPipeError, ValueError):
            pass

    def error(self, message: str) -> None:
        self._write(f"bus-events: {self._paint('error:', _RED + _BOLD)} {message}")

    def warning(self, message: str) -> None:
        self._write(f"bus-events: {self._paint('warning:', _YELLOW)} {message}")

    def hint(self, message: str) -> None:
        self._write(f"bus-events: hint: {message}")

    def note(self, message: str) -> None:
        if not self.quiet:
            self._write(f"bus-events: {message}")

    def info(self, message: str) -> None:
        if self.verbose:
            self._write(f"bus-events: {message}")

    def paint_name(self, text: str) -> str:
        return self._paint(text, _BOLD)


class Results:
    """The result stream: stdout, a file (``--output``), or nothing (``--quiet``)."""

    def __init__(self, path: str | None, *, quiet: bool) -> None:
        self.path = path
        self.quiet = quiet
        self._stream: BinaryIO | None = None
        self._owned = False

    def open(self) -> None:
        """Open the destination (creating/truncating ``--output``); OSError if it cannot."""
        if self.quiet or self._stream is not None:
            return
        if self.path is None:
            self._stream = sys.stdout.buffer
        else:
            self._stream = open(self.path, "wb")  # noqa: SIM115 - closed in close()
            self._owned = True

    @property
    def is_terminal(self) -> bool:
        return self.path is None and not self.quiet and sys.stdout.isatty()

    def write(self, data: bytes) -> None:
        """Write ``data`` and flush it, so the next tool in a pipe sees it now."""
        if self._stream is not None:
            self._stream.write(data)
            self._stream.flush()

    def write_lines(self, blocks: list[bytes]) -> None:
        if self._stream is not None:
            self._stream.writelines(blocks)
            self._stream.flush()

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None and self._owned:
            stream.close()


class TextFormatter:
    """One aligned line per event: time, name, short id, correlation id, payload.

    No color: stdout carries data (spec §5: color only on stderr).  On a
    terminal the payload is cut to the terminal's width.
    """

    def __init__(self, terminal: bool) -> None:
        self.width = shutil.get_terminal_size().columns if terminal else None
        self.name_width = 12

    def line(self, event: Event) -> bytes:
        self.name_width = max(self.name_width, min(len(event.name), 40))
        event_id = event.id if len(event.id) <= 16 else "…" + event.id[-15:]
        correlation = event.correlation_id or "-"
        if len(correlation) > 16:
            correlation = correlation[:15] + "…"
        head = (
            f"{event.time or '-':<27}  {event.name:<{self.name_width}}  "
            f"{event_id:<16}  {correlation:<16}  "
        )
        payload = bytes(event.payload).decode("utf-8", "replace")
        if self.width is not None:
            room = max(self.width - len(head), 10)
            if len(payload) > room:
                payload = payload[: room - 1] + "…"
        return (head + payload + "\n").encode()
