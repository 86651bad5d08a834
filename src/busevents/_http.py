"""The one HTTP seam: what the client needs of an HTTP transport, and what both
transports share.

:class:`EventsClient` publishes through a :class:`Transport`: the lean one
(:class:`~busevents._publish.LeanTransport`, h11 over trio streams, the fast
default) or :class:`HttpxTransport` (when the caller hands in an httpx
transport); it streams the same way (:meth:`LeanTransport.open_stream`, or
:class:`HttpxStream` over :func:`httpx_client`).  Both paths share, from here:

* one response type, :class:`Response` (status, lower-case headers, a bounded
  and decoded body);
* one header builder, :class:`RequestHeaders` (User-Agent, ``Accept-Encoding:
  identity``, the bearer token, the idempotency key);
* one error mapper for failures below HTTP, :func:`transport_error` (naming
  the URL, the proxy when one was used, and how to trust a CA when a
  certificate does not verify; never a token or a proxy password);
* proxies (:class:`~busevents._config.Proxies`, decided per request URL) and
  TLS trust (:class:`TLSTrust`);
* one set of limits: :data:`DEFAULT_TIMEOUT`, :data:`MAX_BODY`,
  :data:`MAX_CONNECTIONS`, :func:`keepalive_options`.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Final, Protocol

from ._config import Proxies, ca_file_from_env, url_for_humans
from ._errors import ConfigError, ConnectError, TransportError, bounded_text
from ._responses import MAX_BODY, describe_cause, read_body
from ._version import __version__

if TYPE_CHECKING:
    import ssl

    import httpx

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_BODY",
    "MAX_CONNECTIONS",
    "USER_AGENT",
    "HttpxStream",
    "HttpxTransport",
    "RequestHeaders",
    "Response",
    "TLSTrust",
    "Transport",
    "client_network",
    "httpx_client",
    "keepalive_options",
    "transport_error",
]

#: Default bound of connecting plus one HTTP exchange, in seconds (spec §5).
DEFAULT_TIMEOUT: Final = 30.0
#: Connections per client (publishes in flight at once).
MAX_CONNECTIONS: Final = 100
USER_AGENT: Final = f"bus-events/{__version__}"

Headers = list[tuple[bytes, bytes]]


class Response:
    """A complete response: status, headers (lower-case names), the body decoded
    (gzip/deflate inflated) and bounded to :data:`MAX_BODY`, and whether there was more."""

    __slots__ = ("content", "headers", "more", "status_code")

    def __init__(
        self, status_code: int, headers: dict[str, str], content: bytes, more: bool = False
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content
        self.more = more


class Transport(Protocol):
    """What :class:`EventsClient` needs to publish: one POST, its complete response."""

    async def post(self, url: str, headers: Headers, body: bytes) -> Response:
        """POST ``body`` to ``url`` with ``headers`` (no Host, no Content-Length).

        Raises :class:`ConnectError` (connecting, the proxy, TLS) or
        :class:`TransportError` (anything after), never for an HTTP status.
        """
        ...

    async def aclose(self) -> None: ...


class RequestHeaders:
    """The headers of every request (User-Agent, ``Accept-Encoding: identity``: a
    stream is read raw, and no body may inflate beyond what is read), plus the
    per-request ones."""

    __slots__ = ("_base", "_last", "_last_token")

    def __init__(self) -> None:
        self._base: Headers = [
            (b"User-Agent", USER_AGENT.encode()),
            (b"Accept-Encoding", b"identity"),
        ]
        self._last_token: str | None = None
        self._last: Headers | None = None

    def as_dict(self) -> dict[str, str]:
        """The constant headers, for httpx."""
        return {name.decode(): value.decode() for name, value in self._base}

    def publish(self, token: str | None, idempotency_key: str | None = None) -> Headers:
        """The headers of a publish (JSON both ways); the caller must not change them."""
        if idempotency_key is None and token == self._last_token and self._last is not None:
            return self._last
        headers = [
            *self._base,
            (b"Accept", b"application/json"),
            (b"Content-Type", b"application/json"),
        ]
        if token:
            headers.append((b"Authorization", b"Bearer " + token.encode("latin-1")))
        if idempotency_key is not None:
            headers.append((b"Idempotency-Key", idempotency_key.encode("ascii")))
        else:
            self._last_token, self._last = token, headers
        return headers

    def stream(self, token: str | None) -> Headers:
        """The headers of a stream request (NDJSON back)."""
        headers = [*self._base, (b"Accept", b"application/x-ndjson")]
        if token:
            headers.append((b"Authorization", b"Bearer " + token.encode("latin-1")))
        return headers


def client_network(
    proxy: str | None, *, trust_env: bool, ca_file: str | None, verify: bool
) -> tuple[Proxies, TLSTrust]:
    """A client's proxies and TLS trust, decided alike for :class:`EventsClient` and
    :class:`SyncClient`: an explicit ``proxy``, else the proxy variables unless
    ``trust_env`` is False; ``ca_file``, else ``BUS_EVENTS_CA_FILE`` under ``trust_env``."""
    proxies = Proxies.explicit(proxy) if proxy else Proxies.from_env() if trust_env else Proxies()
    if ca_file is None and trust_env:
        ca_file = ca_file_from_env()
    return proxies, TLSTrust(ca_file, verify=verify)


def keepalive_options() -> list[tuple[int, int, int]]:
    """TCP keep-alive, so that a peer that vanished is noticed on a quiet stream."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


# -- TLS trust ------------------------------------------------------------------

#: What a certificate error adds: how to trust the CA that signed the server's certificate.
TRUST_HINT: Final = (
    "to trust a private CA, give its PEM file with --ca-file or BUS_EVENTS_CA_FILE "
    "(SDK: EventsClient(ca_file=...)), or set SSL_CERT_FILE / SSL_CERT_DIR"
)

_contexts: dict[tuple[object, ...], ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


class TLSTrust:
    """Which CAs a client trusts, resolved when the client is built.

    ``ca_file`` (PEM) replaces the default trust; else ``SSL_CERT_FILE`` /
    ``SSL_CERT_DIR`` as set *now* (when the client is built); else certifi's
    bundle (httpx's default), or the system's.  ``verify=False`` checks nothing.
    The context is built on the first https connection and shared by clients
    with the same settings (loading a bundle costs tens of milliseconds); a
    change of the variables or of the file makes a new one.
    """

    __slots__ = ("_key", "ca_file", "verify")

    def __init__(self, ca_file: str | None = None, *, verify: bool = True) -> None:
        self.ca_file = ca_file
        self.verify = verify
        cert_file = os.environ.get("SSL_CERT_FILE") or None
        cert_dir = os.environ.get("SSL_CERT_DIR") or None
        stamps = tuple(_stamp(path) for path in (ca_file, cert_file, cert_dir))
        self._key = (verify, ca_file, cert_file, cert_dir, stamps)

    def context(self) -> ssl.SSLContext:
        with _contexts_lock:
            context = _contexts.get(self._key)
            if context is None:
                context = _contexts[self._key] = self._build()
            return context

    def _build(self) -> ssl.SSLContext:
        import ssl  # only for https: the sync path's start-up does not pay it for http

        verify, ca_file, cert_file, cert_dir, _ = self._key
        if not verify:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        if ca_file is not None:
            try:
                return ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot use the CA file {ca_file}: {bounded_text(describe_cause(exc), 200)}"
                    " (a PEM file of CA certificates)"
                ) from None
        if cert_file or cert_dir:
            cafile = cert_file if cert_file and os.path.isfile(cert_file) else None
            capath = cert_dir if cert_dir and os.path.isdir(cert_dir) else None
            if cafile or capath:
                return ssl.create_default_context(cafile=cafile, capath=capath)
        try:
            import certifi
        except ImportError:  # pragma: no cover - httpx depends on certifi
            return ssl.create_default_context()
        return ssl.create_default_context(cafile=certifi.where())


def _stamp(path: object) -> tuple[int, int] | None:
    if not isinstance(path, str):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


# -- failures below HTTP -----------------------------------------------------------


def transport_error(
    exc: BaseException, url: str, *, proxy: str | None = None, connecting: bool = False
) -> TransportError:
    """The error for a failure talking to ``url`` (through ``proxy``, if any).

    ``connecting``: the failure happened before the request was sent (a
    :class:`ConnectError`, safe to retry); certificate errors say how to trust a CA.
    """
    reason = bounded_text(describe_cause(exc), 200)
    if _is_cert_error(exc):
        reason = f"{reason}; {TRUST_HINT}"
        connecting = True
    if connecting:
        if proxy is not None:
            return ConnectError(
                f"cannot connect to {url} through the proxy {url_for_humans(proxy)}: {reason}",
                url=url,
            )
        return ConnectError(f"cannot connect to {url}: {reason}", url=url)
    via = f" (through the proxy {url_for_humans(proxy)})" if proxy is not None else ""
    return TransportError(f"request to {url}{via} failed: {reason}", url=url)


def _is_cert_error(exc: BaseException | None) -> bool:
    import ssl

    while exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return True
        if isinstance(exc, ssl.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def httpx_error(exc: httpx.HTTPError, url: str, proxy: str | None) -> TransportError:
    import httpx

    connecting = isinstance(exc, httpx.ConnectError | httpx.UnsupportedProtocol | httpx.ProxyError)
    return transport_error(exc, url, proxy=proxy, connecting=connecting)


# -- the httpx path --------------------------------------------------------------


def httpx_client(
    url: str,
    *,
    headers: dict[str, str],
    transport: httpx.AsyncBaseTransport | None,
    proxies: Proxies,
    trust: TLSTrust,
    max_connections: int,
) -> tuple[httpx.AsyncClient, str | None]:
    """An httpx client for requests to ``url``'s origin, and the proxy it goes through.

    ``transport``: the caller's own (no proxy, no TLS settings of ours apply).
    """
    import ssl
    from urllib.parse import urlsplit

    import httpx

    proxy = None
    if transport is None:
        parts = urlsplit(url)
        https = parts.scheme == "https"
        proxy = proxies.for_url(
            parts.scheme, parts.hostname or "", parts.port or (443 if https else 80)
        )
        transport = httpx.AsyncHTTPTransport(
            # For http:// URLs no CA bundle is loaded (redirects are not followed).
            verify=trust.context() if https else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
            socket_options=keepalive_options(),
            proxy=httpx.Proxy(proxy) if proxy is not None else None,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
    client = httpx.AsyncClient(
        headers=headers,
        timeout=None,  # deadlines are trio cancel scopes
        transport=transport,
        follow_redirects=False,
        trust_env=False,  # proxies and CAs are ours (above), decided the same on both paths
    )
    return client, proxy


class HttpxStream:
    """A streaming httpx response as the lean path's :class:`StreamResponse` looks:
    the same attributes and methods, so :class:`EventStream` reads either."""

    __slots__ = ("_response", "headers", "http_version", "read_errors", "status_code")

    def __init__(self, response: httpx.Response) -> None:
        import httpx

        self._response = response
        self.status_code = response.status_code
        self.headers = response.headers
        self.http_version = response.http_version
        #: What a body read raises when the connection fails.
        self.read_errors: tuple[type[BaseException], ...] = (httpx.HTTPError,)

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self._response.aiter_raw()

    async def read_bounded(self, limit: int = MAX_BODY) -> bytes:
        return (await read_body(self._response, limit))[0]

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxTransport:
    """Publishing through an httpx client (when the caller hands in an httpx transport)."""

    def __init__(self, client: httpx.AsyncClient, proxy: str | None) -> None:
        self._client = client
        self._proxy = proxy

    async def post(self, url: str, headers: Headers, body: bytes) -> Response:
        import httpx
        import trio

        request = self._client.build_request(
            "POST", url, content=body, headers=[(k.decode(), v.decode()) for k, v in headers]
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise httpx_error(exc, url, self._proxy) from exc
        try:
            # Bounded, and never inflated beyond the bound (a hostile or broken server
            # may send an endless body or a gzip bomb).
            ok = response.status_code in (200, 201, 202)
            try:
                content, more = await read_body(response, raise_errors=ok)
            except httpx.HTTPError as exc:
                raise httpx_error(exc, url, self._proxy) from exc
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()
        return Response(response.status_code, dict(response.headers), content, more)

    async def aclose(self) -> None:
        await self._client.aclose()


def as_headers(pairs: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """Headers as a dict of lower-case names (repeated names joined with ``, ``)."""
    found: dict[str, str] = {}
    for name, value in pairs:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        found[key] = f"{found[key]}, {text}" if key in found else text
    return found
