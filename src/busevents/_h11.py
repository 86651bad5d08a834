"""The lean transports' HTTP/1.1, without I/O: what to send, how a reply is read, and
when a connection may carry another request.

Shared by the trio transport (``_publish.py``) and the blocking one (``_sync.py``),
so both speak, parse and refuse exactly alike:

* :class:`Origin` / :class:`ProxyRoute`: a request URL parsed once, and the
  ``http://`` proxy carrying it (absolute-form requests for http:// URLs, a
  ``CONNECT`` tunnel for https:// URLs);
* :func:`post_bytes` / :func:`request_bytes`: head and body in one buffer (one
  write per request);
* :func:`response_head`: a streaming response's head (its body is read by the
  caller, event by event of h11's);
* :class:`Reply`: feeds h11 events into a bounded response;
* :func:`finish`: the response, and whether the connection may be reused —
  never when a byte follows the response in h11's buffer, when the response had
  both ``Content-Length`` and ``Transfer-Encoding`` (which framing the server
  meant is a guess, RFC 9112 §6.3), or when either side is not cleanly done;
* :class:`Tunnel`: the ``CONNECT`` exchange.

The I/O side adds the rest of the rule: an idle connection that has become
readable (``poll``) is closed, not reused.
"""

from __future__ import annotations

import logging
import select
from typing import Final
from urllib.parse import unquote, urlsplit

import h11

from ._config import Proxies, url_for_humans
from ._errors import ConnectError, TransportError, bounded_text
from ._http import MAX_BODY, USER_AGENT, Headers, Response, as_headers
from ._responses import decode_body

__all__ = [
    "MAX_REPLY",
    "READ_SIZE",
    "UNSAFE_EVENTS",
    "Origin",
    "PoolKey",
    "ProxyRoute",
    "Reply",
    "Routes",
    "Tunnel",
    "IdleCheck",
    "finish",
    "log_request",
    "post_bytes",
    "request_bytes",
    "response_head",
]

_log = logging.getLogger("busevents.http")

#: The most of a reply body that is read off the wire, in bytes (acceptances are ~100 bytes).
MAX_REPLY: Final = 1024 * 1024
READ_SIZE: Final = 65536
#: ``poll`` events that make an idle connection unfit for another request.
UNSAFE_EVENTS: Final = (
    select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | select.POLLNVAL
)


class Origin:
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


PoolKey = tuple[str, str, int, str | None]


class Routes:
    """Where each request URL goes: its :class:`Origin`, its proxy (decided per URL,
    ``NO_PROXY`` included) and the key of its connection pool; parsed once per URL."""

    __slots__ = ("_cache", "_proxies")

    def __init__(self, proxies: Proxies) -> None:
        self._proxies = proxies
        self._cache: dict[str, tuple[Origin, ProxyRoute | None, PoolKey]] = {}

    def __call__(self, url: str) -> tuple[Origin, ProxyRoute | None, PoolKey]:
        route = self._cache.get(url)
        if route is None:
            origin = Origin(url)
            proxy = self._proxies.for_url(origin.scheme, origin.host, origin.port)
            key = (origin.scheme, origin.host, origin.port, proxy)
            route = (origin, ProxyRoute(proxy) if proxy is not None else None, key)
            if len(self._cache) < 64:
                self._cache[url] = route
        return route


class ProxyRoute:
    """An http:// proxy: where it listens, and its ``Proxy-Authorization`` if any."""

    __slots__ = ("auth", "host", "port", "url")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.auth: bytes | None = None
        if parts.username is not None:
            import base64  # only for a proxy with credentials

            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.auth = b"Basic " + base64.b64encode(pair.encode())


def post_bytes(
    conn: h11.Connection, origin: Origin, proxy: ProxyRoute | None, headers: Headers, body: bytes
) -> bytes:
    """The bytes of a POST of ``body`` (``headers`` without Host and Content-Length)."""
    return request_bytes(conn, b"POST", origin, proxy, headers, body)


def request_bytes(
    conn: h11.Connection,
    method: bytes,
    origin: Origin,
    proxy: ProxyRoute | None,
    headers: Headers,
    body: bytes | None = None,
    query: bytes = b"",
) -> bytes:
    """The bytes of a whole request, head and body in one buffer (one write):
    ``headers`` without Host and Content-Length; ``body`` None for a GET;
    ``query`` (encoded) is added to the URL's own query."""
    plain_proxy = proxy is not None and origin.scheme == "http"
    head = [(b"Host", origin.authority), *headers]
    if body is not None:
        head.append((b"Content-Length", b"%d" % len(body)))
    if plain_proxy and proxy is not None and proxy.auth is not None:
        head.append((b"Proxy-Authorization", proxy.auth))
    target = origin.absolute if plain_proxy else origin.target
    if query:
        target += (b"&" if b"?" in origin.target else b"?") + query
    data = conn.send(h11.Request(method=method, target=target, headers=head)) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")


def response_head(conn: h11.Connection, url: str) -> h11.Response | None:
    """The final response's head once h11 holds it (1xx heads are skipped), or None
    when more data is needed.  Raises :class:`TransportError` when the connection
    ended before a response (call ``conn.receive_data(b"")`` at EOF first)."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            return None
        if type(event) is h11.Response:
            return event
        if type(event) is not h11.InformationalResponse:  # ConnectionClosed
            raise TransportError(
                f"request to {url} failed: the server closed the connection "
                "without sending a response",
                url=url,
            )


def log_request(method: str, url: str, status: int) -> None:
    """httpx's request line at DEBUG (the CLI shows it from ``-vv`` on)."""
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug('HTTP Request: %s %s "HTTP/1.1 %d %s"', method, url, status, _phrase(status))


class Reply:
    """A response being read: call :meth:`step` after each ``receive_data``."""

    __slots__ = ("chunks", "complete", "headers", "size", "status", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False

    def step(self, conn: h11.Connection) -> bool:
        """Process what h11 holds; True when the response is read (whole, or as much
        as is kept: :data:`MAX_REPLY`), False when more data is needed."""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return False
            if type(event) is h11.Response:
                self.status = event.status_code
                self.headers = list(event.headers)
            elif type(event) is h11.Data:
                if self.size < MAX_REPLY:
                    self.chunks.append(bytes(event.data[: MAX_REPLY - self.size]))
                self.size += len(event.data)
                if self.size > MAX_REPLY:  # keep what is bounded; this connection is done
                    return True
            elif type(event) is h11.EndOfMessage:
                self.complete = True
                return True
            elif type(event) is not h11.InformationalResponse:  # 1xx: the final one follows
                # ConnectionClosed, PAUSED: nothing more will come
                raise TransportError(
                    f"request to {self.url} failed: the server closed the connection "
                    "in the middle of its response",
                    url=self.url,
                )

    def eof(self, conn: h11.Connection) -> None:
        """The peer closed the connection: tell h11 (raising when no response came)."""
        if conn.their_state is h11.SEND_RESPONSE:
            raise TransportError(
                f"request to {self.url} failed: the server closed the connection "
                "without sending a response",
                url=self.url,
            )
        conn.receive_data(b"")


def finish(conn: h11.Connection, reply: Reply) -> tuple[Response, bool]:
    """The response read, and whether its connection may carry another request
    (then it is ready to)."""
    headers = as_headers(reply.headers)
    reusable = (
        reply.complete
        and conn.our_state is h11.DONE
        and conn.their_state is h11.DONE
        and not ("content-length" in headers and "transfer-encoding" in headers)
        and not conn.trailing_data[0]
    )
    if reusable:
        conn.start_next_cycle()
    log_request("POST", reply.url, reply.status)
    content = b"".join(reply.chunks)
    encoding = headers.get("content-encoding")
    if encoding is None and len(content) <= MAX_BODY:
        return Response(reply.status, headers, content), reusable
    content, more = decode_body(encoding, content)
    return Response(reply.status, headers, content, more), reusable


def protocol_error(exc: h11.ProtocolError, url: str) -> TransportError:
    reason = bounded_text(str(exc) or type(exc).__name__, 200)
    return TransportError(f"request to {url} failed: invalid HTTP response ({reason})", url=url)


class IdleCheck:
    """Whether an idle connection has become readable (a byte the server sent
    unasked, its close, an error): then it must not carry another request.  What
    h11 held after the response was checked by :func:`finish`."""

    __slots__ = ("_poll",)

    def __init__(self, fd: int) -> None:
        self._poll = select.poll()  # not select(): no limit on the fd number
        self._poll.register(fd, UNSAFE_EVENTS)

    def unsafe(self) -> bool:
        return bool(self._poll.poll(0))


class Tunnel:
    """The ``CONNECT`` exchange with a proxy: send :attr:`request`, feed the answer
    to :meth:`step` until it returns True."""

    __slots__ = ("conn", "origin", "proxy", "request", "target")

    def __init__(self, origin: Origin, proxy: ProxyRoute) -> None:
        host = origin.host if ":" not in origin.host else f"[{origin.host}]"
        self.target = f"{host}:{origin.port}".encode("idna" if not host.isascii() else "ascii")
        headers = [(b"Host", self.target), (b"User-Agent", USER_AGENT.encode())]
        if proxy.auth is not None:
            headers.append((b"Proxy-Authorization", proxy.auth))
        self.origin = origin
        self.proxy = proxy
        self.conn = conn = h11.Connection(h11.CLIENT)
        data = conn.send(h11.Request(method=b"CONNECT", target=self.target, headers=headers))
        self.request = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")

    def step(self, data: bytes) -> bool:
        """Feed bytes from the proxy; True once the tunnel is open.  Raises
        :class:`ConnectError` when the proxy refuses, :class:`OSError` when it fails."""
        if not data:
            raise OSError(f"the proxy {self.proxy.host}:{self.proxy.port} closed the connection")
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                return False
            if type(event) is h11.Response:
                break
            if type(event) is not h11.InformationalResponse:
                raise OSError(f"the proxy answered CONNECT with {type(event).__name__}")
        if not 200 <= event.status_code < 300:
            raise ConnectError(
                f"cannot connect to {self.origin.url}: the proxy {url_for_humans(self.proxy.url)} "
                f"refused a tunnel to {self.target.decode()}: HTTP {event.status_code} "
                f"{bounded_text(event.reason, 80)}".rstrip(),
                url=self.origin.url,
            )
        if self.conn.trailing_data[0]:  # the origin spoke before the TLS handshake: not ours
            raise OSError("the proxy sent bytes after its CONNECT answer")
        return True


def _phrase(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
