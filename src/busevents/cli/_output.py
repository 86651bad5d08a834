"""Where the CLI writes: results to stdout (or ``--output``), diagnostics to stderr.

Results are bytes written to a binary stream and flushed per batch, so a
pipe sees events as they arrive.  Diagnostics go to stderr only, with color
only when stderr is a terminal (or ``--color always``) and ``NO_COLOR`` is unset.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING, BinaryIO, Literal

if TYPE_CHECKING:
    from busevents import Event

__all__ = ["Diagnostics", "Results", "TextFormatter", "escape_controls", "use_color"]

ColorMode = Literal["auto", "always", "never"]

_RED = "\x1b[31m"
_YELLOW = "\x1b[33m"
_BOLD = "\x1b[1m"
_RESET = "\x1b[0m"


#: C0 and C1 controls, DEL, and the bidirectional overrides that reorder what a terminal shows
#: (compiled at first use: start-up of the fast ``send`` need not pay for it).
_CONTROLS = "[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]"
_controls: re.Pattern[str] | None = None
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\r``).

    For every text-format field that may come from someone else (event names,
    ids, correlation ids, payloads, server messages): an escape sequence in
    it must not retitle, clear or rewrite the reader's terminal.  JSON output
    is never passed through this: it stays byte-exact.
    """
    if text.isascii() and text.isprintable():  # no C0 control, no DEL; nothing else is ASCII
        return text
    global _controls
    if _controls is None:
        _controls = re.compile(_CONTROLS)
    return _controls.sub(_escaped, text)


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

    # Messages may quote what a server or another identity sent: controls are escaped.
    def error(self, message: str) -> None:
        message = escape_controls(cli_wording(message))
        self._write(f"bus-events: {self._paint('error:', _RED + _BOLD)} {message}")

    def warning(self, message: str) -> None:
        self._write(f"bus-events: {self._paint('warning:', _YELLOW)} {escape_controls(message)}")

    def hint(self, message: str) -> None:
        self._write(f"bus-events: hint: {escape_controls(message)}")

    def note(self, message: str) -> None:
        if not self.quiet:
            self._write(f"bus-events: {escape_controls(message)}")

    def info(self, message: str) -> None:
        if self.verbose:
            self._write(f"bus-events: {escape_controls(message)}")

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

    def widen_pipe(self, size: int = 1 << 20) -> None:
        """Grow the buffer of the pipe the results go to, where the OS allows (Linux).

        A long stream into ``| next-tool`` then blocks less often on a full 64 KiB
        pipe (measured: about a fifth less CPU for ``listen | wc -c``).
        """
        if self._stream is None or self._owned:
            return
        import contextlib
        import fcntl
        import os
        import stat

        setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
        with contextlib.suppress(OSError, ValueError):
            fd = self._stream.fileno()
            if setsize is not None and stat.S_ISFIFO(os.fstat(fd).st_mode):
                fcntl.fcntl(fd, setsize, size)

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

    No color: stdout carries data (color only on stderr).  On a terminal the
    payload is cut to the terminal's width.  Control characters in any field
    are escaped (see :func:`escape_controls`).
    """

    def __init__(self, terminal: bool) -> None:
        import shutil

        self.width = shutil.get_terminal_size().columns if terminal else None
        self.name_width = 12

    def line(self, event: Event) -> bytes:
        name = escape_controls(event.name)
        self.name_width = max(self.name_width, min(len(name), 40))
        event_id = escape_controls(event.id)
        event_id = event_id if len(event_id) <= 16 else "…" + event_id[-15:]
        correlation = escape_controls(event.correlation_id or "-")
        if len(correlation) > 16:
            correlation = correlation[:15] + "…"
        head = (
            f"{escape_controls(event.time or '-'):<27}  {name:<{self.name_width}}  "
            f"{event_id:<16}  {correlation:<16}  "
        )
        payload = escape_controls(bytes(event.payload).decode("utf-8", "replace"))
        if self.width is not None:
            room = max(self.width - len(head), 10)
            if len(payload) > room:
                payload = payload[: room - 1] + "…"
        return (head + payload + "\n").encode()


_SDK_ARGUMENT = r"(?<![\w.-])(api_url|token_file|timeout)="


def cli_wording(message: str) -> str:
    """An SDK message in the CLI's words: ``api_url=`` becomes ``--api-url``, …"""
    if "=" not in message:
        return message
    message = message.replace("pass token_file= or", "use --token-file PATH or")
    return re.sub(_SDK_ARGUMENT, lambda m: "--" + m.group(1).replace("_", "-"), message)


def report_failure(
    exc: BaseException, diagnostics: Diagnostics, output: str | None = None
) -> int | None:
    """Report ``exc`` on stderr and give its exit status; None for a bug (re-raised).

    The one mapping of every command (``_commands``) and of the fast ``send``
    (``_fastsend``), light enough for the latter: no cyclopts.  ``output`` names
    the ``--output`` file a failed write went to.
    """
    from busevents import BusEventsError, ConfigError, ExitStatus, Forbidden, Unauthorized

    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, ConfigError):
        diagnostics.error(str(exc))
        return ExitStatus.USAGE
    if isinstance(exc, BusEventsError):
        diagnostics.error(str(exc))
        # A reserved name: no scope opens it, so no hint helps.
        reserved = (
            not getattr(exc, "required_scopes", ())
            and "reserved" in (getattr(exc, "message", "") or "").lower()
        )
        if isinstance(exc, Forbidden) and not reserved:
            diagnostics.hint(f"get a token with the scope it needs: {exc.hint}")
        if isinstance(exc, Unauthorized) and exc.hint:
            diagnostics.hint(exc.hint)
        return ExitStatus.FAILURE
    if isinstance(exc, BrokenPipeError):
        from . import _silence_stdout

        _silence_stdout()
        return ExitStatus.OK
    if isinstance(exc, OSError):
        where = f" to {output}" if output else ""
        diagnostics.error(f"cannot write results{where}: {exc.strerror or exc}")
        return ExitStatus.FAILURE
    return None
