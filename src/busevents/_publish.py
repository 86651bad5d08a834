"""The lean publish path: HTTP/1.1 POSTs on h11 over trio streams, keep-alive pooled.

:class:`EventsClient` publishes through :class:`LeanPublisher` when it owns its
transport (no ``transport=`` given) and no proxy is configured in the
environment; everything else (streams, proxies, custom transports) goes through
httpx.  Why a second HTTP path: httpx + httpcore cost about ten times the
client CPU of a minimal publisher per request (pool bookkeeping, header models,
two writes per request), and publishing is where that cost is felt
(benchmarks/README.md, issue 14).  What it keeps of httpx's behaviour:

* every response is parsed by h11 and returned whole (body bounded), so the
  caller maps it with the same ``_responses.api_error`` as the httpx path;
* one ``send_all`` per request (head and body together), keep-alive reuse, a
  connection whose peer has closed is never reused, a connection left in an
  unknown state (cancelled, failed, ``Connection: close``) is closed;
* TLS with the client's verifying context (``trio.SSLStream``), SNI and host
  name checks;
* no redirects: a 3xx is returned like any other status;
* no deadline of its own: the caller's cancel scope bounds the whole exchange.

Failures raise :class:`ConnectError` (connecting, TLS handshake) or
:class:`TransportError` (anything after), naming the URL, never the token.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Final
from urllib.parse import urlsplit

import h11
import trio

from ._errors import ConnectError, TransportError, bounded_text
from ._responses import describe_cause as _describe

__all__ = ["MAX_REPLY", "LeanPublisher", "LeanResponse", "proxy_configured"]

_log = logging.getLogger("busevents.http")

#: The most of a reply body that is kept, in bytes (acceptances are ~100 bytes).
MAX_REPLY: Final = 1024 * 1024
_READ: Final = 65536
_PROXY_VARIABLES: Final = frozenset({"http_proxy", "https_proxy", "all_proxy"})


def proxy_configured(env: Mapping[str, str] | None = None) -> bool:
    """True when a proxy variable is set (any case), as httpx would honour it:
    the client then publishes through httpx, which knows proxies."""
    environ = os.environ if env is None else env
    return any(key.lower() in _PROXY_VARIABLES and environ[key] for key in environ)


class LeanResponse:
    """A complete response: status, headers (lower-case names), body."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content


class _Connection:
    __slots__ = ("h11", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    def peer_closed(self) -> bool:
        """True when an idle connection has become readable: the peer closed it (or
        sent something unasked), so it must not carry another request."""
        sock = _socket_of(self.stream)
        if sock is None:
            return False
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


class LeanPublisher:
    """POST bodies to one URL over a pool of at most ``max_connections`` keep-alive
    connections.

    ``ssl_context`` is called for each new ``https`` connection (cache it: loading
    a CA bundle is slow); without it, the system's default verifying context.
    ``socket_options`` are ``setsockopt`` triples applied to every new socket.
    """

    def __init__(
        self,
        url: str,
        *,
        user_agent: str,
        ssl_context: Callable[[], ssl.SSLContext] | None = None,
        socket_options: Sequence[tuple[int, int, int]] = (),
        max_connections: int = 100,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._ssl_context = ssl_context
        self._socket_options = tuple(socket_options)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        self._target = target.encode("ascii")
        default_port = self._port == (443 if self._tls else 80)
        host = self._host if ":" not in self._host else f"[{self._host}]"
        authority = host if default_port else f"{host}:{self._port}"
        self._headers: list[tuple[bytes, bytes]] = [
            (b"Host", authority.encode("idna" if not authority.isascii() else "ascii")),
            (b"User-Agent", user_agent.encode("ascii")),
            (b"Accept", b"application/json"),
            (b"Content-Type", b"application/json"),
        ]
        self._idle: list[_Connection] = []
        self._slots = trio.Semaphore(max_connections)
        self._closed = False

    async def post(
        self, body: bytes, token: str | None = None, idempotency_key: str | None = None
    ) -> LeanResponse:
        """Send ``body`` as a JSON POST (``Authorization: Bearer token`` when given);
        return the complete response, whatever its status."""
        if self._closed:
            raise TransportError(
                f"request to {self.url} failed: the client is closed", url=self.url
            )
        headers = [*self._headers, (b"Content-Length", b"%d" % len(body))]
        if token:
            headers.append((b"Authorization", b"Bearer " + token.encode("latin-1")))
        if idempotency_key is not None:
            headers.append((b"Idempotency-Key", idempotency_key.encode("ascii")))
        async with self._slots:
            connection = self._take_idle()
            if connection is None:
                connection = await self._connect()
            reusable = False
            try:
                response, reusable = await self._exchange(connection, headers, body)
            finally:
                if reusable and not self._closed:
                    self._idle.append(connection)
                else:
                    await _close(connection.stream)
        return response

    async def aclose(self) -> None:
        """Close every idle connection; requests in flight close theirs when done."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await _close(connection.stream)

    # -- internals -----------------------------------------------------------

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()  # the most recently used: least likely stale
            try:
                stale = connection.peer_closed()
            except (OSError, ValueError):
                stale = True
            if not stale:
                return connection
            _close_now(connection.stream)
        return None

    async def _connect(self) -> _Connection:
        try:
            tcp = await trio.open_tcp_stream(self._host, self._port)
        except OSError as exc:
            raise self._connect_error(exc) from exc
        stream: trio.abc.Stream = tcp
        try:
            for level, option, value in self._socket_options:
                tcp.setsockopt(level, option, value)
            if self._tls:
                context = self._ssl_context() if self._ssl_context else ssl.create_default_context()
                stream = trio.SSLStream(
                    stream, context, server_hostname=self._host, https_compatible=True
                )
                await stream.do_handshake()
        except BaseException as exc:
            await _close(stream)
            if isinstance(exc, OSError | trio.BrokenResourceError):
                raise self._connect_error(exc) from exc
            raise
        return _Connection(stream)

    def _connect_error(self, exc: BaseException) -> ConnectError:
        reason = bounded_text(_describe(exc), 200)
        return ConnectError(f"cannot connect to {self.url}: {reason}", url=self.url)

    async def _exchange(
        self, connection: _Connection, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[LeanResponse, bool]:
        conn = connection.h11
        stream = connection.stream
        try:
            request = h11.Request(method=b"POST", target=self._target, headers=headers)
            data = conn.send(request) or b""
            data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
            status, reply_headers, content = await self._read_response(conn, stream)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = bounded_text(_describe(exc), 200)
            raise TransportError(f"request to {self.url} failed: {reason}", url=self.url) from exc
        except h11.ProtocolError as exc:
            reason = bounded_text(str(exc) or type(exc).__name__, 200)
            raise TransportError(
                f"request to {self.url} failed: invalid HTTP response ({reason})", url=self.url
            ) from None
        reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE
        if reusable:
            conn.start_next_cycle()
        if _log.isEnabledFor(logging.DEBUG):  # httpx's request line; the CLI shows it at -vv
            _log.debug('HTTP Request: POST %s "HTTP/1.1 %d %s"', self.url, status, _phrase(status))
        return LeanResponse(status, reply_headers, content), reusable

    async def _read_response(
        self, conn: h11.Connection, stream: trio.abc.Stream
    ) -> tuple[int, dict[str, str], bytes]:
        status = 0
        headers: dict[str, str] = {}
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(_READ)
                if not data and conn.their_state is h11.SEND_RESPONSE:
                    raise TransportError(
                        f"request to {self.url} failed: the server closed the connection "
                        "without sending a response",
                        url=self.url,
                    )
                conn.receive_data(bytes(data))
            elif type(event) is h11.Response:
                status = event.status_code
                for name, value in event.headers:
                    key = name.decode("latin-1")
                    text = value.decode("latin-1")
                    headers[key] = f"{headers[key]}, {text}" if key in headers else text
            elif type(event) is h11.Data:
                if size < MAX_REPLY:
                    chunks.append(bytes(event.data[: MAX_REPLY - size]))
                size += len(event.data)
                if size > MAX_REPLY:  # keep what is bounded; this connection is done
                    return status, headers, b"".join(chunks)
            elif type(event) is h11.EndOfMessage:
                return status, headers, b"".join(chunks)
            elif type(event) is h11.InformationalResponse:
                continue  # 100 Continue and friends: the final response follows
            else:  # ConnectionClosed, PAUSED: nothing more will come
                raise TransportError(
                    f"request to {self.url} failed: the server closed the connection "
                    "in the middle of its response",
                    url=self.url,
                )


def _phrase(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _close_now(stream: trio.abc.Stream) -> None:
    """Close a stale idle connection without a checkpoint (its peer is gone)."""
    sock = _socket_of(stream)
    if sock is not None:
        sock.close()


async def _close(stream: trio.abc.Stream) -> None:
    with (
        trio.CancelScope(shield=True),
        contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await trio.aclose_forcefully(stream)
