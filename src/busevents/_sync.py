"""SyncClient: publish from synchronous code (scripts, Django, Flask, Celery), no event loop.

::

    from busevents import SyncClient

    with SyncClient.from_env() as client:
        accepted = client.send("example.ping", {"ok": True})

The same HTTP as :class:`EventsClient`'s lean path (``_h11.py``: the same
requests, the same reuse rule, the same errors) over blocking sockets: a
keep-alive pool shared by threads, TLS with the same trust (``ca_file``,
``verify``, ``SSL_CERT_FILE``), the same proxies, retries with one idempotency
key per call.  It never imports trio or httpx.  Streams need
:class:`EventsClient`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import h11

from ._attempts import (
    Attempts,
    acceptance,
    accepted_fields,
    as_raw,
    error_for,
    request_body,
    retry_identity,
)
from ._config import (
    Proxies,
    Token,
    check_token,
    client_from_env,
    normalize_events_url,
)
from ._errors import APIError, Timeout, TransportError
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
    post_bytes,
    protocol_error,
)
from ._http import (
    DEFAULT_TIMEOUT,
    Headers,
    RequestHeaders,
    Response,
    client_network,
    keepalive_options,
    transport_error,
)
from ._responses import format_seconds

if TYPE_CHECKING:
    import ssl

    from ._contracts import Accepted, PublishRequest

T = TypeVar("T")

__all__ = ["SyncClient"]


class _Connection:
    __slots__ = ("check", "h11", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)
        self.check = IdleCheck(sock.fileno())

    def unsafe(self) -> bool:
        """True when an idle connection holds or receives anything (see ``_h11``)."""
        return self.check.unsafe() or (bool(getattr(self.sock, "pending", _none)()))


class _Deadline:
    """The time left of one exchange, set on the socket before each blocking call."""

    __slots__ = ("at", "timeout")

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.at = time.monotonic() + timeout if timeout is not None else None

    def left(self) -> float | None:
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def apply(self, sock: socket.socket) -> None:
        sock.settimeout(self.left())


class SyncTransport:
    """Blocking POSTs over a thread-safe keep-alive pool (at most ``max_connections``)."""

    def __init__(
        self,
        *,
        proxies: Proxies,
        ssl_context: Callable[[], ssl.SSLContext],
        socket_options: Sequence[tuple[int, int, int]] = (),
        max_connections: int = 10,
    ) -> None:
        self._route = Routes(proxies)
        self._ssl_context = ssl_context
        self._socket_options = tuple(socket_options)
        self._idle: dict[PoolKey, list[_Connection]] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._closed = False

    def post(self, url: str, headers: Headers, body: bytes, timeout: float | None) -> Response:
        if self._closed:
            raise TransportError(f"request to {url} failed: the client is closed", url=url)
        origin, proxy, key = self._route(url)
        deadline = _Deadline(timeout)
        proxy_url = proxy.url if proxy else None
        with self._slots:
            connection = self._take_idle(key)
            reusable = False
            try:
                if connection is None:
                    try:
                        connection = self._connect(origin, proxy, deadline)
                    except TimeoutError:
                        raise _timeout(url, timeout) from None
                    except OSError as exc:
                        raise transport_error(exc, url, proxy=proxy_url, connecting=True) from exc
                response, reusable = _exchange(connection, origin, proxy, headers, body, deadline)
            finally:
                if connection is not None:
                    self._release(key, connection, reusable)
        return response

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools, self._idle = self._idle, {}
        for idle in pools.values():
            for connection in idle:
                _close(connection.sock)

    def _take_idle(self, key: PoolKey) -> _Connection | None:
        with self._lock:
            idle = self._idle.get(key)
            while idle:
                connection = idle.pop()  # the most recently used: least likely stale
                try:
                    unsafe = connection.unsafe()
                except (OSError, ValueError):
                    unsafe = True
                if not unsafe:
                    return connection
                _close(connection.sock)
        return None

    def _release(self, key: PoolKey, connection: _Connection, reusable: bool) -> None:
        with self._lock:
            if reusable and not self._closed:
                self._idle.setdefault(key, []).append(connection)
                return
        _close(connection.sock)

    def _connect(
        self, origin: Origin, proxy: ProxyRoute | None, deadline: _Deadline
    ) -> _Connection:
        host, port = (proxy.host, proxy.port) if proxy else (origin.host, origin.port)
        # An ASCII name as bytes: getaddrinfo() would encode a str with the idna codec,
        # an import that a publish to 127.0.0.1 need not pay.
        # (bytes work at run time; the stubs say str)
        address: tuple[Any, int] = (host.encode("ascii") if host.isascii() else host, port)
        try:
            sock = socket.create_connection(address, timeout=deadline.left())
        except (TimeoutError, socket.gaierror):
            raise
        except OSError as exc:
            # trio's words (EventsClient's open_tcp_stream), so that both clients say the same
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise OSError(f"all attempts to connect to {where} failed") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for level, option, value in self._socket_options:
                sock.setsockopt(level, option, value)
            if origin.scheme == "https":
                if proxy is not None:
                    tunnel = Tunnel(origin, proxy)
                    sock.sendall(tunnel.request)
                    while not tunnel.step(_receive(sock, deadline)):
                        pass
                deadline.apply(sock)
                sock = self._ssl_context().wrap_socket(sock, server_hostname=origin.host)
        except BaseException:
            _close(sock)
            raise
        return _Connection(sock)


def _none() -> int:
    return 0


def _receive(sock: socket.socket, deadline: _Deadline) -> bytes:
    deadline.apply(sock)
    return sock.recv(READ_SIZE)


def _exchange(
    connection: _Connection,
    origin: Origin,
    proxy: ProxyRoute | None,
    headers: Headers,
    body: bytes,
    deadline: _Deadline,
) -> tuple[Response, bool]:
    conn, sock, url = connection.h11, connection.sock, origin.url
    reply = Reply(url)
    try:
        deadline.apply(sock)
        sock.sendall(post_bytes(conn, origin, proxy, headers, body))
        while not reply.step(conn):
            data = _receive(sock, deadline)
            if data:
                conn.receive_data(data)
            else:
                reply.eof(conn)
    except TimeoutError:
        raise _timeout(url, deadline.timeout) from None
    except OSError as exc:
        raise transport_error(exc, url, proxy=proxy.url if proxy else None) from exc
    except h11.ProtocolError as exc:
        raise protocol_error(exc, url) from None
    return finish(conn, reply)


def _timeout(url: str, timeout: float | None) -> Timeout:
    limit = timeout or 0.0
    return Timeout(
        f"no answer from {url} within {format_seconds(limit)} (the timeout= limit)",
        url=url,
        timeout=limit,
    )


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


class SyncClient:
    """A blocking publisher to one Events API deployment; safe to share between threads.

    The arguments are :class:`EventsClient`'s (``url``, ``token``, ``timeout``,
    ``proxy``, ``trust_env``, ``ca_file``, ``verify``, ``max_connections``);
    ``token_refresh``: on a 401, re-read a token that came from a file and send
    once more.  ``timeout`` bounds connecting plus each exchange.
    """

    def __init__(
        self,
        url: str,
        token: str | Token | None = None,
        *,
        token_refresh: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_connections: int = 10,
        proxy: str | None = None,
        trust_env: bool = True,
        ca_file: str | None = None,
        verify: bool = True,
    ) -> None:
        self.url = normalize_events_url(url)
        self.timeout = timeout
        if isinstance(token, str) and token:
            check_token(token, "the token argument")
        self._token = token
        self._old_tokens: list[str] = []
        self._refresh = token_refresh
        self._headers = RequestHeaders()
        proxies, trust = client_network(proxy, trust_env=trust_env, ca_file=ca_file, verify=verify)
        self._transport = SyncTransport(
            proxies=proxies,
            ssl_context=trust.context,
            socket_options=keepalive_options(),
            max_connections=max_connections,
        )

    @classmethod
    def from_env(
        cls,
        *,
        api_url: str | None = None,
        token_file: str | None = None,
        env: Mapping[str, str] | None = None,
        **options: Any,
    ) -> SyncClient:
        """Resolve URL, token and CA file as :meth:`EventsClient.from_env` does."""
        url, token = client_from_env(api_url, token_file, env, options)
        return cls(url, token, **options)

    def __repr__(self) -> str:
        source = self._token.source if isinstance(self._token, Token) else None
        token = f"<hidden, from {source}>" if source else "None" if not self._token else "<hidden>"
        return f"SyncClient(url={self.url!r}, token={token}, timeout={self.timeout!r})"

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._transport.close()

    def send(
        self,
        name: str,
        payload: Any = None,
        *,
        correlation_id: str | None = None,
        metadata: dict[str, str] | None = None,
        identity_id: str | None = None,
        idempotency_key: str | None = None,
        retries: int = 0,
    ) -> Accepted:
        """Publish one event; return the provider's acceptance (see
        :meth:`EventsClient.send` and, for ``retries``, :meth:`EventsClient.publish`)."""
        from ._contracts import PublishRequest

        request = PublishRequest(
            name=name,
            payload=as_raw(payload),
            correlation_id=correlation_id,
            metadata=metadata,
            identity_id=identity_id,
        )
        return self.publish(request, retries=retries, idempotency_key=idempotency_key)[0]

    def publish(
        self, request: PublishRequest, *, retries: int = 0, idempotency_key: str | None = None
    ) -> tuple[Accepted, bytes]:
        """Publish ``request``; return the acceptance and the provider's JSON body
        (the semantics of :meth:`EventsClient.publish`)."""
        return self._attempt(Attempts(request, retries, idempotency_key), acceptance)

    def _publish_json(
        self, name: str, payload: bytes, *, correlation_id: str | None = None, retries: int = 0
    ) -> tuple[str, str, bytes]:
        """``publish(PublishRequest(name, Raw(payload), correlation_id), retries=retries)``
        for a ``payload`` that is JSON already, returning the accepted event's name and id
        and the provider's JSON body: the same bytes sent, the same acceptance and errors,
        without loading msgspec for a plain acceptance.  For the CLI's fast ``send``."""
        correlation_id, key = retry_identity(correlation_id, retries, None)
        body = request_body(name, payload, correlation_id)
        return self._attempt(Attempts.encoded(body, retries, key), accepted_fields)

    def _attempt(self, attempts: Attempts, accept: Callable[[Response, str, list[str]], T]) -> T:
        while True:
            try:
                return self._publish_once(attempts.body, attempts.key, accept)
            except (APIError, TransportError) as exc:
                wait = attempts.wait_after(exc)
            time.sleep(wait)

    @property
    def _token_values(self) -> list[str]:
        current = self._token.value if isinstance(self._token, Token) else self._token
        return [*([current] if current else []), *self._old_tokens]

    def _publish_once(
        self, body: bytes, key: str | None, accept: Callable[[Response, str, list[str]], T]
    ) -> T:
        again = self._refresh
        while True:
            token = self._token
            used = token.value if isinstance(token, Token) else token
            headers = self._headers.publish(used, key)
            response = self._transport.post(self.url, headers, body, self.timeout)
            if response.status_code in (200, 201, 202):
                return accept(response, self.url, self._token_values)
            error = error_for(
                response.status_code, response.headers, response.content, self.url,
                self._token_values,
            )  # fmt: skip
            if response.status_code != 401 or not again or not self._reread():
                raise error
            again = False

    def _reread(self) -> bool:
        """A new token from the token's file (True when it changed)."""
        token = self._token
        if not isinstance(token, Token) or token.path is None:
            return False
        new = token.reread()
        if new.value == token.value:
            return False
        self._old_tokens = [token.value]
        self._token = new
        return True
