"""A worker host's health server: ``/healthz``, ``/readyz`` and ``/metrics`` over HTTP.

Opt-in (``WorkerHost(health_addr=...)`` or ``BUS_EVENTS_HEALTH_ADDR``), served
by hypercorn's trio worker inside the host's nursery, so it answers exactly
while the host runs:

* ``GET /healthz`` — ``200 {"ok": true, "service": "busevents-worker"}`` while
  the host runs, through the drain of a stop (liveness: the server is part of
  the host's nursery and closes once the last handler finished).
* ``GET /readyz`` — ``200`` (the same body) while every stream is established
  (the host's :class:`Readiness`), else ``503`` with ``"error": "not_ready"``
  and ``"not_ready": [{"worker", "name", "state", "since", ...}, ...]``: per
  stream its ``state`` (``connecting``, ``backoff`` with ``next_attempt``,
  ``down``), since when, and ``last_error``, the text of what ended the
  previous attempt (never a token); ``503`` with ``"error": "shutting_down"``
  from the first signal of a stop.
* ``GET /metrics`` — the host's registry, rendered by ``prometheus_client``
  (``handlers_in_flight`` counts down through the drain).

The bodies mirror the provider's probes (``ok``, ``service``, ``error``).

hypercorn and prometheus_client are the ``health`` extra; they are imported
only when the server starts.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import msgspec
import trio

from .._errors import ConfigError
from .._groups import single_error

if TYPE_CHECKING:
    from ._listener import Readiness
    from ._metrics import WorkerMetrics

__all__ = ["HEALTH_ADDR_ENV", "HealthApp", "parse_health_addr", "serve_health"]

HEALTH_ADDR_ENV = "BUS_EVENTS_HEALTH_ADDR"
_INSTALL = "pip install 'busevents[health]'"

log = logging.getLogger("busevents.worker")
# hypercorn logs through this logger (errors only: no access log).
_server_log = logging.getLogger("busevents.worker.health")

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_JSON = b"application/json"
_UP = {"ok": True, "service": "busevents-worker"}
_DOWN = {"ok": False, "service": "busevents-worker"}
_encoder = msgspec.json.Encoder()


def parse_health_addr(value: str, where: str = "health_addr") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as ``(host, port)``; port 0 picks one."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"{where}: {value!r} is not HOST:PORT; use e.g. 127.0.0.1:9464 or [::1]:9464"
        )
    return host, int(port)


def health_addr_from_env(env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """``BUS_EVENTS_HEALTH_ADDR`` parsed, or ``None`` when it is unset or empty."""
    raw = (env if env is not None else os.environ).get(HEALTH_ADDR_ENV, "").strip()
    return parse_health_addr(raw, HEALTH_ADDR_ENV) if raw else None


class HealthApp:
    """The ASGI app of the health server (HTTP; lifespan acknowledged, websockets refused)."""

    def __init__(
        self,
        readiness: Readiness,
        metrics: WorkerMetrics,
        stopping: Callable[[], bool],
    ) -> None:
        self.readiness = readiness
        self.metrics = metrics
        self.stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        path, method = scope["path"], scope["method"]
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, _JSON, {"error": "method_not_allowed"}, allow=b"GET, HEAD")
        elif path == "/healthz":
            await _respond(send, 200, _JSON, _UP)
        elif path == "/readyz":
            if self.stopping():
                await _respond(send, 503, _JSON, {**_DOWN, "error": "shutting_down"})
            elif self.readiness.is_ready:
                await _respond(send, 200, _JSON, _UP)
            else:
                body = {**_DOWN, "error": "not_ready", "not_ready": self.metrics.not_ready()}
                await _respond(send, 503, _JSON, body)
        elif path == "/metrics":
            from ._metrics import CONTENT_TYPE

            await _respond(send, 200, CONTENT_TYPE.encode(), self.metrics.exposition())
        else:
            await _respond(send, 404, _JSON, {"error": "not_found", "path": path})


async def _respond(
    send: Send, status: int, content_type: bytes, body: object, allow: bytes | None = None
) -> None:
    data = body if isinstance(body, bytes) else _encoder.encode(body) + b"\n"
    headers = [(b"content-type", content_type), (b"cache-control", b"no-store")]
    if allow is not None:
        headers.append((b"allow", allow))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def require_health_extra() -> None:
    """Raise :class:`ConfigError` naming the extra to install when it is missing."""
    try:
        import hypercorn.trio  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"the worker health server needs {exc.name}: {_INSTALL} (or unset {HEALTH_ADDR_ENV})"
        ) from None


def _bind(host: str, port: int) -> socket.socket:
    # Bound here so that a taken port is one clear error before anything runs.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot serve the worker health server on {host}:{port}: {exc.strerror}; "
            f"choose another {HEALTH_ADDR_ENV}"
        ) from None
    return sock


async def serve_health(
    app: HealthApp,
    addr: tuple[str, int],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``addr`` until cancelled; starts with its base URL."""
    require_health_extra()
    import hypercorn.config
    import hypercorn.trio
    from hypercorn.typing import ASGIFramework

    config = hypercorn.config.Config()
    config.bind = [f"fd://{_bind(*addr).detach()}"]  # hypercorn owns the socket now
    config.accesslog = None
    config.errorlog = _server_log
    if _server_log.level == logging.NOTSET:
        # hypercorn's "Running on … (CTRL + C to quit)": our own line below says it better.
        _server_log.setLevel(logging.WARNING)
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
            log.info("health server on %s (/healthz, /readyz, /metrics)", binds[0])
            task_status.started(binds[0])
