"""The durable state of a relay route: cursors and counters in a JSON file, and its lock.

The state file is replaced atomically (a temporary file beside it, fsync, rename,
fsync of the directory), so a crash at any moment leaves either the old or the
new state, never a torn one.  The files are handled like a careful daemon's: the
state and lock files are opened without following a symbolic link
(``O_NOFOLLOW``) and without waiting (``O_NONBLOCK``: a FIFO would block the
open); anything but a regular file there is refused at once.  The temporary file
has a random name and is created exclusively (``O_EXCL``), mode 600.  A lock
file beside it (``F.lock``, an ``flock`` held for the process lifetime,
released by the kernel even on SIGKILL) keeps a second relay off the same
state.  A state file that cannot be read is an error naming the file: the relay
never silently starts again from zero.

The state holds no secret: URLs without credentials, names, ids, counters and
error messages (the client already redacts tokens from those).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import msgspec

from .._errors import BusEventsError
from .._ids import parse_event_id

__all__ = ["RelayLock", "RouteState", "public_url", "read_state", "relay_status", "utc_now"]

STATE_VERSION: Final = 1


def utc_now() -> str:
    """The current time, RFC 3339 UTC with seconds."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def public_url(url: str) -> str:
    """``url`` without user info, query or fragment: what may be stored and shown."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class Cursor(msgspec.Struct, omit_defaults=True):
    """Where one name stands: the last source event forwarded (or skipped), and the
    destination id of the last forwarded one (the reconciliation scan starts after it)."""

    source: str | None = None
    destination: str | None = None


class Counters(msgspec.Struct):
    """Cumulative over the route's life, saved with the cursors (so never counted twice):
    ``received == forwarded + skipped``."""

    #: Source events handled (after the cursor: a resumed run counts only new ones).
    received: int = 0
    #: Events the destination acknowledged (including those found there after a crash).
    forwarded: int = 0
    #: Events not forwarded because they came from another environment (no echo).
    skipped: int = 0
    #: Events read from the source but not yet handled when the state was saved.
    pending: int = 0


class RouteInfo(msgspec.Struct):
    """What identifies a route; a state file belongs to one route."""

    from_url: str
    to_url: str
    environment_id: str
    id: str | None = None


class RouteState(msgspec.Struct, kw_only=True):
    """The content of a state file."""

    version: int = STATE_VERSION
    route: RouteInfo
    names: list[str] = msgspec.field(default_factory=list)
    cursors: dict[str, Cursor] = msgspec.field(default_factory=dict)
    counters: Counters = msgspec.field(default_factory=Counters)
    created: str | None = None
    last_attempt: str | None = None
    last_success: str | None = None
    last_error: str | None = None
    last_error_time: str | None = None

    def cursor(self, name: str) -> Cursor:
        found = self.cursors.get(name)
        if found is None:
            found = self.cursors[name] = Cursor()
        return found


_encode = msgspec.json.Encoder(order="deterministic").encode


#: Largest state file read: cursors and counters of a route take a few KiB.
MAX_STATE_FILE = 16 * 1024 * 1024


def open_regular(path: Path, flags: int, what: str, mode: int = 0o600) -> int:
    """``os.open`` of a regular file, never through a symbolic link, never blocking.

    Raises :class:`FileNotFoundError` when missing (and not created), else
    :class:`BusEventsError` naming ``what`` and ``path`` for a symbolic link, a
    FIFO, socket, device or directory, or another failure.
    """
    extra = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | extra, mode)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BusEventsError(
                f"the {what} {path} is a symbolic link; it is never followed: "
                "remove it, or give a path to a regular file"
            ) from None
        raise BusEventsError(f"cannot open the {what} {path}: {exc.strerror}") from None
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        raise BusEventsError(
            f"the {what} {path} is not a regular file (a directory, FIFO, socket or "
            "device); give a path to a regular file"
        )
    return fd


def read_state(path: Path) -> RouteState | None:
    """The state in ``path``; None when the file does not exist.

    Raises :class:`BusEventsError` naming the file when it cannot be read, is
    not a regular file, or is not a relay state (it is never overwritten then).
    """
    try:
        fd = open_regular(path, os.O_RDONLY, "relay state file")
    except FileNotFoundError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(MAX_STATE_FILE + 1)
    except OSError as exc:
        raise BusEventsError(f"cannot read the relay state file {path}: {exc.strerror}") from None
    try:
        if len(data) > MAX_STATE_FILE:
            raise ValueError(f"larger than {MAX_STATE_FILE // (1024 * 1024)} MiB")
        state = msgspec.json.decode(data, type=RouteState)
        for name, cursor in state.cursors.items():
            for value in (cursor.source, cursor.destination):
                if value is not None:
                    try:
                        parse_event_id(value)
                    except ValueError as exc:
                        raise ValueError(f"cursor of {name[:100]!r}: {exc}") from None
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError) as exc:
        raise BusEventsError(
            f"the relay state file {path} is corrupt ({str(exc)[:200]}); it was left as it is: "
            "restore it from a backup, or move it away to start the route from scratch "
            "(the destination's history then decides what was already forwarded)"
        ) from None
    if state.version != STATE_VERSION:
        raise BusEventsError(
            f"the relay state file {path} has version {state.version}; "
            f"this bus-events reads version {STATE_VERSION}"
        )
    return state


def write_state(path: Path, state: RouteState) -> None:
    """Replace ``path`` with ``state`` atomically and durably (temp file, fsync, rename).

    The temporary file beside it has a random name and is created exclusively
    (``O_EXCL``: never an existing file, never through a symbolic link), mode 600.
    """
    data = msgspec.json.format(_encode(state), indent=2) + b"\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise BusEventsError(f"cannot write the relay state file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory is synced.
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@dataclass
class RelayLock:
    """The exclusive lock of a state file: ``F.lock``, holding the owner's pid.

    :meth:`acquire` raises :class:`BusEventsError` when another process holds
    it; the kernel releases it when the process ends, however it ends.
    """

    path: Path
    _fd: int | None = field(default=None, repr=False)

    def acquire(self) -> None:
        fd = open_regular(lock_path(self.path), os.O_RDWR | os.O_CREAT, "relay lock file")
        lock = lock_path(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise BusEventsError(
                f"another relay is running on the state file {self.path} "
                f"(pid {owner} holds {lock}); stop it first, or give this route "
                "its own --state-file"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> RelayLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def lock_owner(path: Path) -> int | None:
    """The pid of the relay running on ``path``, or None when none is."""
    try:
        fd = open_regular(lock_path(path), os.O_RDONLY, "relay lock file")
    except (OSError, BusEventsError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else -1
        return None
    finally:
        os.close(fd)


def relay_status(state_file: str | os.PathLike[str]) -> dict[str, Any]:
    """The status of the route whose state is ``state_file``, as JSON-ready values:
    the route, cursors per name, counters, last success / attempt / error (with
    times), and whether a relay is running on it (``running``, ``pid``).  Never a
    token: the state holds none.

    Raises :class:`BusEventsError` naming the file when it is missing or corrupt.
    """
    path = Path(state_file)
    state = read_state(path)
    if state is None:
        raise BusEventsError(
            f"no relay state file {path}: the route has not run yet (or the path is wrong)"
        )
    document: dict[str, Any] = msgspec.to_builtins(state)
    owner = lock_owner(path)
    document["state_file"] = str(path)
    document["running"] = owner is not None
    if owner is not None and owner > 0:
        document["pid"] = owner
    return document
