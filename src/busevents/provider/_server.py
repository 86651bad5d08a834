"""Running the provider on a real socket: :func:`serve` and :func:`open_provider`."""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import cast

import hypercorn.config
import hypercorn.trio
import trio
from hypercorn.typing import ASGIFramework

from busevents import single_error

from ._app import EventsApp, create_app
from ._auth import API_AUDIENCE, mint_token
from ._backend import Backend
from ._config import ProviderConfig

__all__ = ["RunningProvider", "open_provider", "serve"]

_EVENTS_PATH = "/api/v1/events"
# Hypercorn logs through this logger; with no handler configured only warnings
# and errors reach stderr, so normal operation prints nothing.
_server_log = logging.getLogger("busevents.provider.server")


def _bind(host: str, port: int) -> socket.socket:
    # Bound here rather than by hypercorn so that a failure (port in use) raises
    # a plain OSError and leaves no half-made socket behind.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _hypercorn_config(sock: socket.socket) -> hypercorn.config.Config:
    config = hypercorn.config.Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the socket from here on
    config.accesslog = None
    config.errorlog = _server_log
    return config


async def _serve_app(
    app: EventsApp,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    config = _hypercorn_config(_bind(host, port))
    with single_error():
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                partial(
                    hypercorn.trio.serve,
                    # Our app types ASGI messages as plain mappings, hypercorn as TypedDicts.
                    cast(ASGIFramework, app),
                    config,
                    mode="asgi",
                )
            )
            task_status.started(binds[0] + _EVENTS_PATH)


async def serve(
    config: ProviderConfig,
    host: str = "127.0.0.1",
    port: int = 8081,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the provider on ``host:port`` until cancelled (hypercorn, trio worker).

    With ``nursery.start(serve, config, host, 0)`` the start value is the events
    base URL with the real bound port, e.g. ``http://127.0.0.1:54321/api/v1/events``.
    Prints nothing; hypercorn's messages go to the ``busevents.provider.server``
    logger.  Raises :class:`OSError` when the address cannot be bound and
    :class:`ValueError` for an unknown backend.

    A client that stops reading while keeping its connection open holds its
    stream's task inside hypercorn's (shielded) socket write until it reads or
    disconnects; cancellation waits for that.
    """
    await _serve_app(create_app(config), host, port, task_status=task_status)


@dataclass(frozen=True, slots=True)
class RunningProvider:
    """A provider started by :func:`open_provider`."""

    #: The events base URL, e.g. ``http://127.0.0.1:54321/api/v1/events``.
    url: str
    #: The origin, e.g. ``http://127.0.0.1:54321``.
    origin: str
    config: ProviderConfig
    app: EventsApp

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
    config: ProviderConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningProvider]:
    """Run a provider for the duration of an ``async with`` block.

    With no ``config`` a random 32-byte secret is used (mint tokens with
    :meth:`RunningProvider.token`).  Port 0 picks a free port.  Leaving the
    block stops the server; no task is left running.  Errors come out as
    themselves (``OSError`` when the port is taken), not as exception groups.
    As with :func:`serve`, a client that keeps its connection open but stops
    reading delays the stop until it reads or disconnects.

    >>> async with open_provider() as provider:
    ...     token = provider.token("alice")
    ...     # POST provider.url, GET provider.url + "/stream"
    """
    if config is None:
        config = ProviderConfig(secret=secrets.token_bytes(32))
    app = create_app(config)
    with single_error():
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(partial(_serve_app, app, host, port))
            try:
                yield RunningProvider(url, url.removesuffix(_EVENTS_PATH), config, app)
            finally:
                nursery.cancel_scope.cancel()
