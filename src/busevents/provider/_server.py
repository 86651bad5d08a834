"""Running the provider on a real socket: :func:`serve` and :func:`open_provider`."""

from __future__ import annotations

import dataclasses
import secrets
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import trio

from busevents import single_error

from ._app import EventsApp, MetricsApp, create_app
from ._auth import API_AUDIENCE, mint_token
from ._config import ProviderConfig
from ._h11server import ASGIApp, Server
from .backends._base import Backend

__all__ = ["RunningProvider", "open_provider", "serve"]

_EVENTS_PATH = "/api/v1/events"
_BACKLOG = 1024


def _bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    # Bound here so that a failure (port in use) raises a plain OSError and
    # leaves no half-made socket behind.  ``reuse_port``: several processes
    # share the address, the kernel spreads connections (``serve --workers``).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _serve_app(
    app: EventsApp,
    host: str,
    port: int,
    *,
    shutdown: trio.Event | None = None,
    metrics_addr: tuple[str, int] | None = None,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` (and its metrics on ``metrics_addr``) until ``shutdown`` or cancelled.

    When ``shutdown`` is set: stop accepting, end the streams cleanly, wait up to
    ``config.shutdown_grace`` seconds for the connections to finish, then close
    the rest hard.  Cancellation closes every connection hard at once.
    Starts with the URLs bound (events base first, then the metrics origin).
    """
    sockets: list[tuple[ASGIApp, socket.socket]] = [(app, _bind(host, port, reuse_port=reuse_port))]
    if metrics_addr is not None:
        sockets.append((MetricsApp(app), _bind(*metrics_addr, reuse_port=reuse_port)))
    connections = Server()
    urls: list[str] = []
    listeners: list[trio.SocketListener] = []
    for _, sock in sockets:
        sock.listen(_BACKLOG)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        name = sock.getsockname()
        urls.append("http://" + (f"[{name[0]}]" if sock.family == socket.AF_INET6 else name[0]))
        urls[-1] += f":{name[1]}"
    urls[0] += _EVENTS_PATH
    try:
        # The backend connects for the server's lifetime (this loop sends no ASGI
        # lifespan events; other ASGI servers enter the same context through them).
        with single_error():
            async with app.backend.running(), trio.open_nursery() as handlers:
                async with trio.open_nursery() as accepting:
                    for (asgi, _), listener in zip(sockets, listeners, strict=True):
                        handler = partial(connections.handle, asgi)
                        accepting.start_soon(
                            partial(
                                trio.serve_listeners, handler, [listener], handler_nursery=handlers
                            )
                        )
                    task_status.started(urls)
                    await (trio.Event() if shutdown is None else shutdown).wait()
                    accepting.cancel_scope.cancel()
                for listener in listeners:
                    await listener.aclose()
                # Keep-alive connections close when idle, requests in progress end
                # their connection, following streams write their last chunk.
                connections.begin_close()
                app.begin_shutdown()
                with trio.move_on_after(app.config.shutdown_grace):
                    await connections.wait_empty()
                connections.close_all()
                handlers.cancel_scope.cancel()
    finally:
        # Also on cancellation: a write a peer never reads must not hold us.
        connections.close_all()
        for listener in listeners:
            listener.socket.close()


async def serve(
    config: ProviderConfig,
    host: str = "127.0.0.1",
    port: int = 8081,
    *,
    shutdown: trio.Event | None = None,
    metrics_addr: tuple[str, int] | None = None,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the provider on ``host:port`` (HTTP/1.1: h11 on trio).

    With ``nursery.start(serve, config, host, 0)`` the start value is the events
    base URL with the real bound port, e.g. ``http://127.0.0.1:54321/api/v1/events``.

    Stopping: set ``shutdown`` for a graceful stop — no new connections, every
    following stream ends with its terminating chunk, and after
    ``config.shutdown_grace`` seconds the connections still open are closed
    hard, whatever the peers do.  Cancelling closes them hard at once.

    ``metrics_addr`` (``(host, port)``) serves ``GET /metrics``, ``/healthz``
    and ``/readyz`` on a second address.  ``reuse_port`` sets ``SO_REUSEPORT``
    so that several processes serve one address.  Prints nothing; the server's
    errors go to the ``busevents.provider.server`` logger.  Raises :class:`OSError` when an
    address cannot be bound and :class:`ValueError` for an unknown backend.
    """
    app = create_app(config)
    with single_error():
        async with trio.open_nursery() as nursery:
            urls: list[str] = await nursery.start(
                partial(
                    _serve_app,
                    app,
                    host,
                    port,
                    shutdown=shutdown,
                    metrics_addr=metrics_addr,
                    reuse_port=reuse_port,
                )
            )
            task_status.started(urls[0])


@dataclass(frozen=True, slots=True)
class RunningProvider:
    """A provider started by :func:`open_provider`."""

    #: The events base URL, e.g. ``http://127.0.0.1:54321/api/v1/events``.
    url: str
    #: The origin, e.g. ``http://127.0.0.1:54321``.
    origin: str
    config: ProviderConfig
    app: EventsApp
    #: ``http://127.0.0.1:PORT/metrics`` when started with ``metrics=True``.
    metrics_url: str | None = None

    @property
    def backend(self) -> Backend:
        """The app's backend (the memory backend has ``stats``)."""
        return self.app.backend

    def token(
        self,
        subject: str = "dev",
        scopes: str | Iterable[str] = "events:send events:listen",
        audience: str = API_AUDIENCE,
        ttl: float = 3600,
    ) -> str:
        """A token this provider accepts, signed with its secret (see :func:`mint_token`)."""
        return mint_token(
            self.config.secret, subject=subject, scopes=scopes, audience=audience, ttl=ttl
        )


@asynccontextmanager
async def open_provider(
    config: ProviderConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    metrics: bool = False,
) -> AsyncIterator[RunningProvider]:
    """Run a provider for the duration of an ``async with`` block.

    With no ``config`` a random 32-byte secret is used (mint tokens with
    :meth:`RunningProvider.token`).  Port 0 picks a free port.  Leaving the
    block stops the server gracefully (open streams end with their last chunk;
    connections still open after ``config.shutdown_grace`` seconds are closed);
    no task is left running.  With ``metrics=True`` a second loopback port
    serves ``/metrics`` (:attr:`RunningProvider.metrics_url`).  Errors come out
    as themselves (``OSError`` when the port is taken), not as exception groups.

    >>> async with open_provider() as provider:
    ...     token = provider.token("alice")
    ...     # POST provider.url, GET provider.url + "/stream"
    """
    if config is None:
        config = ProviderConfig(secret=secrets.token_bytes(32))
    app = create_app(config)
    shutdown = trio.Event()
    metrics_addr = (host, 0) if metrics else None
    with single_error():
        async with trio.open_nursery() as nursery:
            urls: list[str] = await nursery.start(
                partial(_serve_app, app, host, port, shutdown=shutdown, metrics_addr=metrics_addr)
            )
            url = urls[0]
            running = RunningProvider(url, url.removesuffix(_EVENTS_PATH), config, app)
            if metrics:
                running = dataclasses.replace(running, metrics_url=urls[1] + "/metrics")
            try:
                yield running
            finally:
                shutdown.set()
