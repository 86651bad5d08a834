"""The lean transport: HTTP/1.1 POSTs on h11 over trio streams, keep-alive pooled.

:class:`EventsClient` publishes through :class:`LeanTransport` unless the caller
hands in an httpx transport (see ``_http.py``, the seam).  Why a second HTTP
implementation: httpx + httpcore cost about ten times the client CPU of a
minimal publisher per request (pool bookkeeping, header models, two writes per
request), and publishing is where that cost is felt (benchmarks/README.md,
issue 14).  What it keeps of httpx's behaviour, and where it is stricter:

* every response is parsed by h11 and returned whole (body bounded, gzip or
  deflate inflated up to the bound), mapped by the caller like any other;
* one ``send_all`` per request (head and body together) and keep-alive reuse
  — but a connection is reused only when nothing can be left of the last
  exchange: not when a byte follows the response (in h11's buffer, in the TLS
  layer or in the socket, checked with ``poll``, which has no fd limit), not
  when the response had both ``Content-Length`` and ``Transfer-Encoding``,
  not after a cancellation, a failure, ``Connection: close`` or HTTP/1.0;
  so a response is never taken for another request's;
* proxies (``http://`` only), decided per request URL: absolute-form requests
  for http:// URLs, a ``CONNECT`` tunnel for https:// URLs; a proxy that
  cannot be reached is an error naming it, never a direct connection;
* TLS with the client's verifying context (``trio.SSLStream``), SNI and host
  name checks;
* no redirects: a 3xx is returned like any other status;
* no deadline of its own: the caller's cancel scope bounds the whole exchange.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import select
import ssl
from collections.abc import Callable, Sequence
from typing import Final
from urllib.parse import unquote, urlsplit

import h11
import trio

from ._config import Proxies, url_for_humans
from ._errors import ConnectError, TransportError, bounded_text
from ._http import USER_AGENT, Headers, Response, as_headers, transport_error
from ._responses import decode_body

__all__ = ["MAX_REPLY", "LeanTransport"]

_log = logging.getLogger("busevents.http")

#: The most of a reply body that is read off the wire, in bytes (acceptances are ~100 bytes).
MAX_REPLY: Final = 1024 * 1024
_READ: Final = 65536
_UNSAFE: Final = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | select.POLLNVAL


class _Origin:
    """A request URL, parsed once: where to connect and what to send."""

    __slots__ = ("absolute", "authority", "host", "port", "scheme", "target", "url")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if self.scheme == "https" else 80)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        self.target = target.encode("ascii")
        host = self.host if ":" not in self.host else f"[{self.host}]"
        default = self.port == (443 if self.scheme == "https" else 80)
        authority = host if default else f"{host}:{self.port}"
        self.authority = authority.encode("idna" if not authority.isascii() else "ascii")
        # A plain request through a proxy names the whole URL (absolute-form).
        self.absolute = f"{self.scheme}://".encode() + self.authority + self.target


class _Proxy:
    """An http:// proxy: where it listens, and its ``Proxy-Authorization`` if any."""

    __slots__ = ("auth", "host", "port", "url")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.auth: bytes | None = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.auth = b"Basic " + base64.b64encode(pair.encode())


class _Connection:
    __slots__ = ("h11", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    def unsafe(self) -> bool:
        """True when an idle connection holds or receives anything (a byte the
        server sent unasked, its close, an error): it must not carry another request."""
        if self.h11.trailing_data[0] or _tls_pending(self.stream):
            return True
        sock = _socket_of(self.stream)
        if sock is None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), _UNSAFE)
        return bool(poller.poll(0))


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def _tls_pending(stream: trio.abc.Stream) -> bool:
    """Bytes read off the socket but not yet by us, inside a TLS stream."""
    if not isinstance(stream, trio.SSLStream):
        return False
    ssl_object = getattr(stream, "_ssl_object", None)
    incoming = getattr(stream, "_incoming", None)
    return bool(
        (ssl_object is not None and ssl_object.pending())
        or (incoming is not None and incoming.pending)
    )


class LeanTransport:
    """POST bodies over pools of keep-alive connections, at most ``max_connections``
    in all (see the module's docstring).

    ``proxies`` decides the proxy of each request URL; ``ssl_context`` is called
    for each new ``https`` connection (cache it: loading a CA bundle is slow);
    ``socket_options`` are ``setsockopt`` triples applied to every new socket.
    """

    def __init__(
        self,
        *,
        proxies: Proxies,
        ssl_context: Callable[[], ssl.SSLContext],
        socket_options: Sequence[tuple[int, int, int]] = (),
        max_connections: int = 100,
    ) -> None:
        self._proxies = proxies
        self._ssl_context = ssl_context
        self._socket_options = tuple(socket_options)
        self._origins: dict[str, tuple[_Origin, _Proxy | None]] = {}
        self._idle: dict[tuple[str, str, int, str | None], list[_Connection]] = {}
        self._slots = trio.Semaphore(max_connections)
        self._closed = False

    def _route(self, url: str) -> tuple[_Origin, _Proxy | None]:
        route = self._origins.get(url)
        if route is None:
            origin = _Origin(url)
            proxy = self._proxies.for_url(origin.scheme, origin.host, origin.port)
            route = (origin, _Proxy(proxy) if proxy is not None else None)
            if len(self._origins) < 64:
                self._origins[url] = route
        return route

    async def post(self, url: str, headers: Headers, body: bytes) -> Response:
        if self._closed:
            raise TransportError(f"request to {url} failed: the client is closed", url=url)
        origin, proxy = self._route(url)
        tunnel = origin.scheme == "https"
        head = [
            (b"Host", origin.authority),
            *headers,
            (b"Content-Length", b"%d" % len(body)),
        ]
        if proxy is not None and proxy.auth is not None and not tunnel:
            head.append((b"Proxy-Authorization", proxy.auth))
        target = origin.absolute if proxy is not None and not tunnel else origin.target
        key = (origin.scheme, origin.host, origin.port, proxy.url if proxy else None)
        async with self._slots:
            connection = self._take_idle(key)
            if connection is None:
                connection = await self._connect(origin, proxy)
            reusable = False
            try:
                response, reusable = await self._exchange(
                    connection, origin, proxy, target, head, body
                )
            finally:
                if reusable and not self._closed:
                    self._idle.setdefault(key, []).append(connection)
                else:
                    await _close(connection.stream)
        return response

    async def aclose(self) -> None:
        """Close every idle connection; requests in flight close theirs when done."""
        self._closed = True
        pools, self._idle = self._idle, {}
        for idle in pools.values():
            for connection in idle:
                await _close(connection.stream)

    # -- internals -----------------------------------------------------------

    def _take_idle(self, key: tuple[str, str, int, str | None]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()  # the most recently used: least likely stale
            try:
                unsafe = connection.unsafe()
            except (OSError, ValueError):
                unsafe = True
            if not unsafe:
                return connection
            _close_now(connection.stream)
        return None

    async def _connect(self, origin: _Origin, proxy: _Proxy | None) -> _Connection:
        host, port = (proxy.host, proxy.port) if proxy else (origin.host, origin.port)
        proxy_url = proxy.url if proxy else None
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise transport_error(exc, origin.url, proxy=proxy_url, connecting=True) from exc
        stream: trio.abc.Stream = tcp
        try:
            for level, option, value in self._socket_options:
                tcp.setsockopt(level, option, value)
            if origin.scheme == "https":
                if proxy is not None:
                    await _tunnel(tcp, origin, proxy)
                stream = trio.SSLStream(
                    stream, self._ssl_context(), server_hostname=origin.host, https_compatible=True
                )
                await stream.do_handshake()
        except BaseException as exc:
            await _close(stream)
            if isinstance(exc, OSError | trio.BrokenResourceError | h11.ProtocolError):
                raise transport_error(exc, origin.url, proxy=proxy_url, connecting=True) from exc
            raise
        return _Connection(stream)

    async def _exchange(
        self,
        connection: _Connection,
        origin: _Origin,
        proxy: _Proxy | None,
        target: bytes,
        headers: Headers,
        body: bytes,
    ) -> tuple[Response, bool]:
        conn = connection.h11
        stream = connection.stream
        url = origin.url
        try:
            request = h11.Request(method=b"POST", target=target, headers=headers)
            data = conn.send(request) or b""
            data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
            status, pairs, content, complete = await _read_response(conn, stream, url)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise transport_error(exc, url, proxy=proxy.url if proxy else None) from exc
        except h11.ProtocolError as exc:
            reason = bounded_text(str(exc) or type(exc).__name__, 200)
            raise TransportError(
                f"request to {url} failed: invalid HTTP response ({reason})", url=url
            ) from None
        reply = as_headers(pairs)
        reusable = (
            complete
            and conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
            # Both framings: which one the server meant is a guess (RFC 9112 §6.3).
            and not ("content-length" in reply and "transfer-encoding" in reply)
            and not conn.trailing_data[0]
        )
        if reusable:
            conn.start_next_cycle()
        if _log.isEnabledFor(logging.DEBUG):  # httpx's request line; the CLI shows it at -vv
            _log.debug('HTTP Request: POST %s "HTTP/1.1 %d %s"', url, status, _phrase(status))
        content, more = decode_body(reply.get("content-encoding"), content)
        return Response(status, reply, content, more), reusable


async def _read_response(
    conn: h11.Connection, stream: trio.abc.Stream, url: str
) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
    """Status, headers, body (at most :data:`MAX_REPLY` bytes), and whether the
    response was read to its end."""
    status = 0
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_READ)
            if not data and conn.their_state is h11.SEND_RESPONSE:
                raise TransportError(
                    f"request to {url} failed: the server closed the connection "
                    "without sending a response",
                    url=url,
                )
            conn.receive_data(bytes(data))
        elif type(event) is h11.Response:
            status = event.status_code
            headers = list(event.headers)
        elif type(event) is h11.Data:
            if size < MAX_REPLY:
                chunks.append(bytes(event.data[: MAX_REPLY - size]))
            size += len(event.data)
            if size > MAX_REPLY:  # keep what is bounded; this connection is done
                return status, headers, b"".join(chunks), False
        elif type(event) is h11.EndOfMessage:
            return status, headers, b"".join(chunks), True
        elif type(event) is h11.InformationalResponse:
            continue  # 100 Continue and friends: the final response follows
        else:  # ConnectionClosed, PAUSED: nothing more will come
            raise TransportError(
                f"request to {url} failed: the server closed the connection "
                "in the middle of its response",
                url=url,
            )


async def _tunnel(tcp: trio.SocketStream, origin: _Origin, proxy: _Proxy) -> None:
    """Ask the proxy for a tunnel to ``origin`` (``CONNECT host:port``)."""
    host = origin.host if ":" not in origin.host else f"[{origin.host}]"
    authority = f"{host}:{origin.port}".encode("idna" if not host.isascii() else "ascii")
    headers = [(b"Host", authority), (b"User-Agent", USER_AGENT.encode())]
    if proxy.auth is not None:
        headers.append((b"Proxy-Authorization", proxy.auth))
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(h11.Request(method=b"CONNECT", target=authority, headers=headers)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await tcp.send_all(data)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            received = await tcp.receive_some(_READ)
            if not received:
                raise OSError(f"the proxy {proxy.host}:{proxy.port} closed the connection")
            conn.receive_data(received)
        elif type(event) is h11.Response:
            break
        elif type(event) is not h11.InformationalResponse:
            raise OSError(f"the proxy {proxy.host}:{proxy.port} answered CONNECT with {event!r}")
    if not 200 <= event.status_code < 300:
        reason = bounded_text(event.reason, 80)
        raise ConnectError(
            f"cannot connect to {origin.url}: the proxy {url_for_humans(proxy.url)} refused "
            f"a tunnel to {authority.decode()}: "
            f"HTTP {event.status_code} {reason}".rstrip(),
            url=origin.url,
        )
    if conn.trailing_data[0]:  # the origin spoke before the TLS handshake: not ours
        raise OSError("the proxy sent bytes after its CONNECT answer")


def _phrase(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _close_now(stream: trio.abc.Stream) -> None:
    """Close an unsafe idle connection without a checkpoint."""
    sock = _socket_of(stream)
    if sock is not None:
        sock.close()


async def _close(stream: trio.abc.Stream) -> None:
    with (
        trio.CancelScope(shield=True),
        contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await trio.aclose_forcefully(stream)
