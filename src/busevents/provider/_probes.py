"""The probes (``/healthz``, ``/readyz``), the OpenAPI document and the metrics app."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._asgi import (
    DRAIN_SECONDS,
    JSON_HEADERS,
    HTTPError,
    Receive,
    Scope,
    Send,
    discard_body,
    encode,
    only,
    send_error,
    send_response,
)
from ._metrics import CONTENT_TYPE
from ._openapi import openapi_json
from ._paths import METRICS_ONLY
from ._readiness import backend_not_ready

if TYPE_CHECKING:
    from ._app import EventsApp

__all__ = ["MetricsApp", "probe_or_document", "readiness"]

_HEALTHY = b'{"ok":true,"service":"bus-events"}'


async def probe_or_document(app: EventsApp, route: str, send: Send) -> int:
    """Answer ``route`` (``openapi``, ``healthz`` or ``readyz``); the status sent."""
    if route == "openapi":
        await send_response(send, 200, openapi_json(), JSON_HEADERS)
        return 200
    if route == "healthz":
        await send_response(send, 200, _HEALTHY, JSON_HEADERS)
        return 200
    status, body = await readiness(app)
    await send_response(send, status, body, [*JSON_HEADERS, (b"cache-control", b"no-store")])
    return status


async def readiness(app: EventsApp) -> tuple[int, bytes]:
    """``/readyz``'s answer: ``200`` when the backend answers, else ``503`` and why."""
    if app.closing:
        return 503, _not_ready("shutting_down", "the provider is shutting down")
    if failed := await backend_not_ready(app.backend, app.config.backend, app.metrics):
        return 503, failed
    return 200, encode({"ok": True, "service": "bus-events", "backend": app.config.backend})


class MetricsApp:
    """The metrics address: ``GET /metrics`` (Prometheus text) and the two probes.

    Kept off the events address because the numbers (event-name prefixes,
    failure counts) are about every identity; bind it where only operators reach.
    """

    def __init__(self, events: EventsApp) -> None:
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.events(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        await discard_body(receive, DRAIN_SECONDS)
        path: str = scope["path"]
        try:
            if path not in ("/metrics", "/healthz", "/readyz"):
                raise HTTPError(404, "not_found", METRICS_ONLY)
            only(scope["method"], "GET", path)
            if path == "/metrics":
                body = self.events.metrics.exposition()
                await send_response(send, 200, body, [(b"content-type", CONTENT_TYPE.encode())])
            else:
                await probe_or_document(self.events, path[1:], send)
        except HTTPError as error:
            await send_error(send, error)


def _not_ready(code: str, message: str) -> bytes:
    return encode({"ok": False, "service": "bus-events", "error": code, "message": message})
