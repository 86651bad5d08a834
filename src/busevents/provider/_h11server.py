"""The provider's HTTP/1.1 server: h11 over trio streams, running an ASGI 3 app.

Why not hypercorn: on a publish, hypercorn and trio were about 72 % of the
provider's CPU (a task, a queue and several events per request; see
``benchmarks/README.md``).  Here each connection is one task that parses with
h11 and calls the app in place: ``receive`` reads the socket on demand and
``send`` joins the response head and a whole body into one write.  What it
keeps of the hardened server:

* request heads of at most :data:`MAX_HEAD` bytes (larger: ``431``), a
  malformed request gets a ``400`` JSON body, then the connection closes;
* keep-alive (idle connections close after ``keep_alive`` seconds, the whole
  next request head must arrive within that time), pipelining, HTTP/1.0 and
  ``Connection: close``; ``Expect: 100-continue`` is answered when the app
  reads the body;
* streaming responses: chunked on HTTP/1.1, close-delimited on HTTP/1.0
  (h11 frames them);
* a connection whose request body the app did not read to its end is closed
  after the response (after a short lingering read, so that the peer gets the
  answer rather than a reset);
* writes are never shielded: a stop cancels a write to a peer that does not
  read, and :meth:`Server.close_all` closes every socket hard.

The app's ``receive`` returns ``http.disconnect`` when the peer closes; while
the app is still answering (a following stream), ``receive`` watches the
socket for the peer's EOF and keeps any pipelined request for later, bounded.

A streaming app may skip the ASGI body messages: the scope's
``extensions[BODY_WRITER]`` is a :class:`BodyWriter` that writes body bytes
straight to the socket (see there why).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import suppress
from email.utils import formatdate
from typing import Any, Final, Protocol
from urllib.parse import unquote, urlsplit

import h11
import trio

__all__ = ["BODY_WRITER", "KEEP_ALIVE", "MAX_HEAD", "BodyWriter", "Server", "chunk"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

#: Largest request head (request line and headers), in bytes.
MAX_HEAD: Final = 16 * 1024
#: Seconds an idle keep-alive connection is kept, and a request head may take.
KEEP_ALIVE: Final = 5.0
_READ: Final = 65536
#: Pipelined bytes kept while the app still answers the request before them.
_PIPELINE_LIMIT: Final = 4 * _READ
#: Lingering close: at most this long and this much read after the last answer.
_LINGER_SECONDS: Final = 1.0
_LINGER_BYTES: Final = 4 * 1024 * 1024
_ASGI: Final = {"version": "3.0", "spec_version": "2.3"}
_DISCONNECT: Final = {"type": "http.disconnect"}
_END: Final = {"type": "http.request", "body": b"", "more_body": False}
_CLOSE: Final = (b"connection", b"close")
_SOCKET_ERRORS: Final = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
#: The scope's ``extensions`` key of the :class:`BodyWriter`.
BODY_WRITER: Final = "busevents.body_writer"

_log = logging.getLogger("busevents.provider.server")


class _Clock:
    """The ``Date`` header, formatted once a second."""

    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = 0
        self.value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.value = formatdate(now, usegmt=True).encode("ascii")
        return self.value


_clock = _Clock()


def chunk(body: bytes) -> bytes:
    """``body`` as one HTTP/1.1 chunk (hex size, CRLF, the bytes, CRLF)."""
    return b"%x\r\n%b\r\n" % (len(body), body)


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message}, separators=(",", ":")).encode()


class BodyWriter(Protocol):
    """Writes a streaming response's body straight to the socket.

    For an app that sends many small bodies to many streams (the provider's
    fan-out: one event to a hundred listeners), the ASGI path costs more than
    the write itself: a message dict, h11's chunk framing and trio's
    ``send_all`` with its two trips through the scheduler, per listener and
    event.  Here the app frames once (:func:`chunk`, shareable between
    streams) and :meth:`write_now` sends without a schedule point, so a woken
    stream task costs one trip through the scheduler, not three.

    Only after ``http.response.start`` of a response without
    ``Content-Length`` (its head is sent at once); the app still ends the body
    with the final ASGI ``http.response.body``.  h11 does not see these
    bytes: it counts none for a chunked or close-delimited body.
    """

    @property
    def chunked(self) -> bool:
        """Whether body bytes must be framed with :func:`chunk` (else: sent as they are)."""
        ...

    def write_now(self, data: bytes) -> bytes:
        """Send what the socket takes now, without waiting; return the rest."""
        ...

    async def write(self, data: bytes) -> None:
        """Send ``data``, waiting for the peer to take it (cancellable)."""
        ...


class _Exchange:
    """One request and its response: the ASGI ``receive`` and ``send``, a :class:`BodyWriter`."""

    __slots__ = ("conn", "headers", "peer_gone", "server", "started", "status", "stream")

    def __init__(self, server: Server, conn: h11.Connection, stream: trio.SocketStream) -> None:
        self.server = server
        self.conn = conn
        self.stream = stream
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.started = False
        self.peer_gone = False

    async def receive(self) -> Message:
        conn = self.conn
        if conn.their_state is not h11.SEND_BODY:
            return await self._wait_disconnect()
        if conn.they_are_waiting_for_100_continue:
            response = h11.InformationalResponse(status_code=100, headers=[])
            with suppress(*_SOCKET_ERRORS):
                await self.stream.send_all(conn.send(response) or b"")
        parts: list[bytes] = []
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                self.peer_gone = True  # a broken body: nothing more can be read
                return _DISCONNECT
            kind = type(event)
            if kind is h11.Data:
                parts.append(bytes(event.data))  # type: ignore[union-attr]
                continue
            if kind is h11.EndOfMessage:
                body = b"".join(parts)
                return {"type": "http.request", "body": body, "more_body": False} if body else _END
            if event is h11.NEED_DATA:
                if parts:  # what arrived so far; the rest on the next call
                    return {"type": "http.request", "body": b"".join(parts), "more_body": True}
                data = await self._read()
                if not data:
                    return _DISCONNECT
                conn.receive_data(data)
                continue
            self.peer_gone = True  # ConnectionClosed
            return _DISCONNECT

    async def _wait_disconnect(self) -> Message:
        """The request is read: wait until the peer closes (or the app stops asking)."""
        conn = self.conn
        while not self.peer_gone:
            if len(conn.trailing_data[0]) >= _PIPELINE_LIMIT:
                await trio.sleep_forever()  # read no more; the app ends this wait
            data = await self._read()
            if not data:
                break
            with suppress(h11.LocalProtocolError):  # the peer had already closed
                conn.receive_data(data)  # a pipelined request, answered later
        return _DISCONNECT

    async def _read(self) -> bytes:
        """The next bytes from the peer; ``b""`` (and ``peer_gone``) once it is gone."""
        try:
            data = await self.stream.receive_some(_READ)
        except _SOCKET_ERRORS:
            data = b""
        if not data:
            self.peer_gone = True
        return bytes(data)

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            self.headers = headers = list(message.get("headers", ()))
            if not any(name.lower() == b"content-length" for name, _ in headers):
                # A stream: its head goes out now, not with its first event.
                await self._write(self._head())
            return
        if kind != "http.response.body":
            return
        conn = self.conn
        # With a Content-Length the head waits for the body: one write for both.
        data = b"" if self.started else self._head()
        body = message.get("body", b"")
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        if not message.get("more_body", False):
            data += conn.send(h11.EndOfMessage()) or b""
        await self._write(data)

    # -- BodyWriter ------------------------------------------------------------

    @property
    def chunked(self) -> bool:
        """Whether the body goes out as chunks (HTTP/1.1) or as it is (HTTP/1.0).

        h11's own rule for a response of unknown length: chunked when the
        peer speaks HTTP/1.1 or later, else delimited by closing the connection.
        """
        version = self.conn.their_http_version
        return version is not None and version >= b"1.1"

    def write_now(self, data: bytes) -> bytes:
        """Send what the socket takes now, without waiting; return the rest.

        ``b""`` when all was sent (or the peer is gone: nothing more will be).
        """
        if self.peer_gone:
            return b""
        try:
            # The socket's descriptor is asked for each time: after a hard close
            # it is -1 (EBADF here), never a number reused by another connection.
            sent = os.write(self.stream.socket.fileno(), data)
        except BlockingIOError:
            return data
        except OSError:
            self.peer_gone = True
            return b""
        return data[sent:] if sent < len(data) else b""

    async def write(self, data: bytes) -> None:
        """Send ``data``, waiting for the peer to take it (cancellable)."""
        await self._write(data)

    def _head(self) -> bytes:
        self.started = True
        headers = self.headers
        headers.append((b"date", _clock.date()))
        if self.server.closing:
            headers.append(_CLOSE)
        return self.conn.send(h11.Response(status_code=self.status, headers=headers)) or b""

    async def _write(self, data: bytes) -> None:
        if data and not self.peer_gone:
            try:
                await self.stream.send_all(data)
            except _SOCKET_ERRORS:
                # The peer went away: the app learns it from receive(); the
                # connection is closed once the app returns.
                self.peer_gone = True


class Server:
    """Serves ASGI apps on accepted trio socket streams; knows its open connections.

    :meth:`handle` is the per-connection handler (for :func:`trio.serve_listeners`).
    A graceful stop is :meth:`begin_close` (idle connections close now, the
    others after their current response), :meth:`wait_empty`, then
    :meth:`close_all` for whatever is left.
    """

    def __init__(self, *, keep_alive: float = KEEP_ALIVE) -> None:
        self.keep_alive = keep_alive
        self.closing = False
        self.streams: set[trio.SocketStream] = set()
        self._idle: set[trio.CancelScope] = set()
        self._empty = trio.Event()
        self._empty.set()

    def begin_close(self) -> None:
        """Close idle connections now; busy ones close after their response."""
        self.closing = True
        for scope in list(self._idle):
            scope.cancel()

    async def wait_empty(self) -> None:
        """Wait until every connection has closed."""
        await self._empty.wait()

    def close_all(self) -> None:
        """Close every open socket hard (a write blocked on a silent peer fails)."""
        for stream in list(self.streams):
            with suppress(OSError):
                stream.socket.close()

    async def handle(self, app: ASGIApp, stream: trio.SocketStream) -> None:
        """Serve requests on ``stream`` until it closes, then close it."""
        self.streams.add(stream)
        self._empty = trio.Event()
        try:
            clean = await self._serve(app, stream)
            if not clean and not self.closing:
                await _linger(stream)
        except _SOCKET_ERRORS:
            pass
        finally:
            self.streams.discard(stream)
            with suppress(OSError):
                stream.socket.close()
            if not self.streams:
                self._empty.set()

    async def _serve(self, app: ASGIApp, stream: trio.SocketStream) -> bool:
        """Requests until the connection ends; whether everything sent was read."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        sock = stream.socket
        client = _address(sock.getpeername())
        local = _address(sock.getsockname())
        while True:
            deadline = trio.current_time() + self.keep_alive
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._refuse(conn, stream, exc.error_status_hint, str(exc))
                    return False
                if event is not h11.NEED_DATA:
                    break
                if self.closing:
                    return True
                data = b""
                with trio.CancelScope(deadline=deadline) as idle:
                    self._idle.add(idle)
                    try:
                        data = await stream.receive_some(_READ)
                    finally:
                        self._idle.discard(idle)
                if not data:  # end of stream, idle timeout or stop
                    return True
                conn.receive_data(data)
            if type(event) is not h11.Request:
                return True  # ConnectionClosed
            if _head_size(event) > MAX_HEAD:  # h11 limits only a head that arrives in parts
                await self._refuse(conn, stream, 431, "")
                return False
            exchange = _Exchange(self, conn, stream)
            scope = _scope(event, client, local)
            scope["extensions"] = {BODY_WRITER: exchange}
            await self._call(app, exchange, scope)
            if exchange.peer_gone:
                return True
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE and not self.closing:
                conn.start_next_cycle()
                continue
            return conn.their_state is not h11.SEND_BODY

    async def _call(self, app: ASGIApp, exchange: _Exchange, scope: Scope) -> None:
        try:
            await app(scope, exchange.receive, exchange.send)
        except Exception:
            _log.exception("the app failed on %s %s", scope["method"], scope["path"])
        if not exchange.started and exchange.conn.our_state is h11.SEND_RESPONSE:
            # The app returned (or failed) without answering: never an empty reply.
            body = _error_body("internal_error", "the provider failed to handle this request")
            headers = [(b"content-type", b"application/json"), _CLOSE]
            headers.append((b"content-length", b"%d" % len(body)))
            await exchange.send({"type": "http.response.start", "status": 500, "headers": headers})
            await exchange.send({"type": "http.response.body", "body": body})

    async def _refuse(
        self, conn: h11.Connection, stream: trio.SocketStream, status: int, reason: str
    ) -> None:
        """Answer a request that cannot be served (400 malformed, 431 for a huge head)."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        if status == 431:
            body = _error_body(
                "request_header_fields_too_large",
                f"the request head exceeds {MAX_HEAD} bytes: send fewer or shorter headers",
            )
        else:
            message = reason[:200] or "malformed request"
            body = _error_body("bad_request", f"malformed HTTP request: {message}")
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        headers += [(b"date", _clock.date()), _CLOSE]
        try:
            data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
            data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return
        with suppress(*_SOCKET_ERRORS), trio.move_on_after(self.keep_alive):
            await stream.send_all(data)


def _scope(request: h11.Request, client: Any, local: Any) -> Scope:
    target = bytes(request.target)
    if target.startswith(b"/"):
        target, _, query = target.partition(b"?")
    elif target != b"*":  # absolute-form, as sent to a proxy
        parts = urlsplit(target)
        target, query = parts.path or b"/", parts.query
    else:
        query = b""
    return {
        "type": "http",
        "asgi": _ASGI,
        "http_version": request.http_version.decode(),
        "method": request.method.decode("ascii"),
        "scheme": "http",
        "path": unquote(target.decode("ascii")) if b"%" in target else target.decode("ascii"),
        "raw_path": target,
        "query_string": query,
        "root_path": "",
        "headers": list(request.headers),
        "client": client,
        "server": local,
    }


def _head_size(request: h11.Request) -> int:
    size = len(request.method) + len(request.target) + 12
    for name, value in request.headers.raw_items():
        size += len(name) + len(value) + 4
    return size


def _address(name: Any) -> tuple[str, int] | None:
    if isinstance(name, tuple) and len(name) >= 2:
        return (str(name[0]), int(name[1]))
    return None


async def _linger(stream: trio.SocketStream) -> None:
    """Stop sending, then read and drop what the peer still sends, briefly: closing
    with unread data would reset the connection before the peer reads our answer."""
    with suppress(*_SOCKET_ERRORS), trio.move_on_after(_LINGER_SECONDS):
        await stream.send_eof()
        dropped = 0
        while dropped < _LINGER_BYTES:
            data = await stream.receive_some(_READ)
            if not data:
                return
            dropped += len(data)
