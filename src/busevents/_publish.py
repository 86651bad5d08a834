"""The lean transport: HTTP/1.1 on h11 over trio streams: keep-alive pooled POSTs,
and streaming GETs read in large blocks.

:class:`EventsClient` publishes and streams through :class:`LeanTransport` unless
the caller hands in an httpx transport (see ``_http.py``, the seam).  Why a
second HTTP implementation: httpx + httpcore cost about ten times the client CPU
of a minimal publisher per request (pool bookkeeping, header models, two writes
per request), and publishing is where that cost is felt (benchmarks/README.md,
issue 14); a stream read through httpcore comes in its fixed 64 KiB reads, each
passing four layers, where a listener that keeps up with its pipe wants a
megabyte per read (issue 24).  What it keeps of httpx's behaviour, and where it
is stricter:

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
* no deadline of its own: the caller's cancel scope bounds the whole exchange;
* a stream (:meth:`LeanTransport.open_stream`) has a connection of its own,
  opened like any other (proxy, TLS) and closed with it, never reused: its body
  is h11's, handed out as h11 frames it (a block per read), and a body cut short
  (a chunked stream without its last chunk, a short ``Content-Length``) is an
  error, never a clean end.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Final

import h11
import trio

from ._config import Proxies
from ._errors import TransportError
from ._h11 import (
    READ_SIZE,
    IdleCheck,
    Origin,
    PoolKey,
    ProxyRoute,
    Reply,
    Routes,
    Tunnel,
    finish,
    log_request,
    post_bytes,
    protocol_error,
    request_bytes,
    response_head,
)
from ._http import MAX_BODY, Headers, Response, as_headers, transport_error
from ._responses import decode_body, describe_cause

__all__ = ["STREAM_READ", "LeanTransport", "StreamResponse"]

#: Bytes asked of the socket per read of a stream.  Large reads are what let a
#: listener keep up with its pipe: per read, trio, h11 and the decoder each cost
#: a fixed few microseconds, so 64 KiB reads (httpcore's) cost a sixth of the
#: CLI's CPU (issue 24); a read returns what has arrived, so a quiet stream
#: still hands out each event as it comes.
STREAM_READ: Final = 1024 * 1024


class _Connection:
    __slots__ = ("check", "h11", "stream")

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.check = IdleCheck(sock.fileno())

    def unsafe(self) -> bool:
        """True when an idle connection holds or receives anything (see ``_h11``)."""
        return self.check.unsafe() or _tls_pending(self.stream)


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
        self._route = Routes(proxies)
        self._ssl_context = ssl_context
        self._socket_options = tuple(socket_options)
        self._idle: dict[PoolKey, list[_Connection]] = {}
        self._slots = trio.Semaphore(max_connections)
        self._closed = False

    async def post(self, url: str, headers: Headers, body: bytes) -> Response:
        if self._closed:
            raise TransportError(f"request to {url} failed: the client is closed", url=url)
        origin, proxy, key = self._route(url)
        async with self._slots:
            connection = self._take_idle(key)
            if connection is None:
                connection = await self._connect(origin, proxy)
            reusable = False
            try:
                response, reusable = await _exchange(connection, origin, proxy, headers, body)
            finally:
                if reusable and not self._closed:
                    self._idle.setdefault(key, []).append(connection)
                else:
                    await _close(connection.stream)
        return response

    async def open_stream(self, url: str, headers: Headers, query: str = "") -> StreamResponse:
        """GET ``url`` plus ``query`` (encoded; errors name ``url`` alone) on a
        connection of its own; return once the response's head arrived (the
        caller's cancel scope bounds that).  Close it with :meth:`StreamResponse.aclose`."""
        if self._closed:
            raise TransportError(f"request to {url} failed: the client is closed", url=url)
        origin, proxy, _ = self._route(url)
        connection = await self._connect(origin, proxy)
        try:
            head = await _stream_head(connection, origin, proxy, headers, query.encode("ascii"))
        except BaseException:
            await _close(connection.stream)
            raise
        log_request("GET", url, head.status_code)
        return StreamResponse(connection, head, url, proxy.url if proxy else None)

    async def aclose(self) -> None:
        """Close every idle connection; requests in flight close theirs when done."""
        self._closed = True
        pools, self._idle = self._idle, {}
        for idle in pools.values():
            for connection in idle:
                await _close(connection.stream)

    # -- internals -----------------------------------------------------------

    def _take_idle(self, key: PoolKey) -> _Connection | None:
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

    async def _connect(self, origin: Origin, proxy: ProxyRoute | None) -> _Connection:
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
                    tunnel = Tunnel(origin, proxy)
                    await tcp.send_all(tunnel.request)
                    while not tunnel.step(await tcp.receive_some(READ_SIZE)):
                        pass
                stream = trio.SSLStream(
                    stream, self._ssl_context(), server_hostname=origin.host, https_compatible=True
                )
                await stream.do_handshake()
        except BaseException as exc:
            await _close(stream)
            if isinstance(exc, OSError | trio.BrokenResourceError | h11.ProtocolError):
                raise transport_error(exc, origin.url, proxy=proxy_url, connecting=True) from exc
            raise
        return _Connection(stream, tcp.socket)


async def _exchange(
    connection: _Connection,
    origin: Origin,
    proxy: ProxyRoute | None,
    headers: Headers,
    body: bytes,
) -> tuple[Response, bool]:
    conn = connection.h11
    stream = connection.stream
    url = origin.url
    reply = Reply(url)
    try:
        await stream.send_all(post_bytes(conn, origin, proxy, headers, body))
        while not reply.step(conn):
            data = await stream.receive_some(READ_SIZE)
            if data:
                conn.receive_data(bytes(data))
            else:
                reply.eof(conn)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise transport_error(exc, url, proxy=proxy.url if proxy else None) from exc
    except h11.ProtocolError as exc:
        raise protocol_error(exc, url) from None
    return finish(conn, reply)


async def _stream_head(
    connection: _Connection,
    origin: Origin,
    proxy: ProxyRoute | None,
    headers: Headers,
    query: bytes,
) -> h11.Response:
    conn = connection.h11
    url = origin.url
    request = request_bytes(conn, b"GET", origin, proxy, headers, query=query)
    try:
        await connection.stream.send_all(request)
        while (head := response_head(conn, url)) is None:
            conn.receive_data(bytes(await connection.stream.receive_some(READ_SIZE)))
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise transport_error(exc, url, proxy=proxy.url if proxy else None) from exc
    except h11.ProtocolError as exc:
        raise protocol_error(exc, url) from None
    return head


class BodyReadError(TransportError):
    """The connection failed while a stream's body was read; the message is the
    reason alone (:class:`EventStream` turns it into :class:`StreamInterrupted`)."""


class StreamResponse:
    """A streaming response of the lean path: status, lower-case headers, and the
    body as it arrives (:meth:`aiter_raw`), on a connection that :meth:`aclose`
    closes.  A failure while reading the body is a :class:`BodyReadError`."""

    __slots__ = ("_connection", "headers", "http_version", "proxy", "status_code", "url")

    #: What a body read raises when the connection fails (see :class:`EventStream`).
    read_errors: Final = (BodyReadError,)

    def __init__(
        self, connection: _Connection, head: h11.Response, url: str, proxy: str | None
    ) -> None:
        self._connection = connection
        self.status_code = head.status_code
        self.headers = as_headers(head.headers)
        self.http_version = "HTTP/" + head.http_version.decode("ascii", "replace")
        self.url = url
        self.proxy = proxy

    async def aiter_raw(self) -> AsyncGenerator[bytes, None]:
        """The body's bytes, a block per read, as framed by h11; ends at the body's end."""
        conn = self._connection.h11
        stream = self._connection.stream
        try:
            while True:
                event = conn.next_event()
                kind = type(event)
                if kind is h11.Data:
                    yield event.data  # type: ignore[union-attr]
                elif event is h11.NEED_DATA:
                    # b"" at EOF (bytes() of bytes is the same object: no copy)
                    conn.receive_data(bytes(await stream.receive_some(STREAM_READ)))
                elif kind is h11.EndOfMessage:
                    return
                else:  # ConnectionClosed: nothing more will come
                    raise BodyReadError(
                        "the server closed the connection in the middle of the body", url=self.url
                    )
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise BodyReadError(describe_cause(exc), url=self.url) from exc
        except h11.ProtocolError as exc:
            # A chunked body without its last chunk, a Content-Length not reached, bad framing.
            raise BodyReadError(describe_cause(exc), url=self.url) from None

    async def read_bounded(self, limit: int = MAX_BODY) -> bytes:
        """At most ``limit`` bytes of the (decoded) body: an error body's diagnostic.
        A failure ends the body where it broke (the status already says what matters)."""
        body = bytearray()
        with contextlib.suppress(BodyReadError):
            async with contextlib.aclosing(self.aiter_raw()) as chunks:
                async for data in chunks:
                    body += data
                    if len(body) > limit * 4:  # decode_body bounds what is kept; stop
                        break
        return decode_body(self.headers.get("content-encoding"), bytes(body), limit)[0]

    async def aclose(self) -> None:
        """Close the connection (a stream's connection is never reused)."""
        await _close(self._connection.stream)


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
