"""The provider's ASGI 3 application: routing, auth, validation, publish and stream.

Routes (exactly these paths, see :mod:`._paths`):

* ``POST …/events`` — publish one event (``202``);
* ``GET …/events/stream`` — NDJSON stream of matching events (``200``, chunked);
* ``GET …/events/openapi.json`` — the OpenAPI 3.1 document;
* ``GET /healthz`` and ``GET /readyz`` — probes, without auth.

Every refusal is a JSON error body, decided in the order auth (``401``, before
the body is read), body time and size (``408``, ``413``), validation (``400``),
scope (``403``), and always before a stream opens.  An unexpected failure is a
``500`` with a JSON body too, never an empty one.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time

import trio

from ._asgi import (
    DRAIN_SECONDS,
    HTTPError,
    Receive,
    Scope,
    Send,
    discard_body,
    only,
    send_error,
)
from ._auth import AuthError, Principal, TokenVerifier
from ._config import ProviderConfig
from ._metrics import ProviderMetrics
from ._names import literal_prefix
from ._paths import EVENTS, NOT_FOUND, OPENAPI, STREAM
from ._policy import Action
from ._probes import MetricsApp, probe_or_document, readiness
from ._publish_handler import PublishHandler
from ._stream_handler import StreamHandler
from .backends import make_backend as make_backend
from .backends._base import Backend, BackendUnavailable

__all__ = ["EventsApp", "HTTPError", "MetricsApp", "create_app"]

_log = logging.getLogger("busevents.provider")
#: Collector thresholds while serving: young collections every 10,000 allocations
#: (default 700), a full one after 100 of the middle one (default 10).
_GC_THRESHOLDS = (10_000, 10, 100)


class EventsApp:
    """The provider as a plain ASGI 3 callable; serve it with any ASGI server.

    ``config`` and ``backend`` are public for inspection (tests read
    ``app.backend.stats`` of the memory backend).
    """

    def __init__(self, config: ProviderConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        self.metrics = ProviderMetrics()
        self._verifier = TokenVerifier(config.secret)
        self._closing = False
        # The scopes that following streams wait in for their next events; closing
        # cancels the waits (never a send), so each stream ends with its final chunk.
        self.waits: dict[object, trio.CancelScope] = {}
        self._gc_settled = False
        self._publisher = PublishHandler(self)
        self._streams = StreamHandler(self)

    @property
    def closing(self) -> bool:
        """Whether :meth:`begin_shutdown` was called."""
        return self._closing

    def begin_shutdown(self) -> None:
        """End every following stream cleanly (terminating chunk); new ones end at once.

        ``/readyz`` answers ``503`` from now on.  The server stops accepting
        connections itself; this only asks the streams to finish.
        """
        self._closing = True
        for wait in list(self.waits.values()):
            wait.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        # The backend is connected (and its background tasks run) for the server's life.
        started = False
        try:
            async with self.backend.running():
                started = True
                while True:
                    message = await receive()
                    if message["type"] == "lifespan.startup":
                        self._settle_gc()
                        await send({"type": "lifespan.startup.complete"})
                    elif message["type"] == "lifespan.shutdown":
                        break
        except BackendUnavailable as exc:
            if started:
                raise
            await receive()
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})

    def _settle_gc(self) -> None:
        # Once, at start-up (lifespan) or else at the first request: see _settle_gc.
        if not self._gc_settled:
            self._gc_settled = True
            _settle_gc()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._gc_settled:
            self._settle_gc()
        path: str = scope["path"]
        method: str = scope["method"]
        started = time.perf_counter()
        route = "other"
        status = 0  # 0: recorded by the stream itself, when its headers go out
        try:
            if path == EVENTS:
                route = "publish"
                if method != "POST":
                    await discard_body(receive, DRAIN_SECONDS)
                    raise HTTPError(
                        405,
                        "method_not_allowed",
                        f"use POST on {path}",
                        headers=[(b"allow", b"POST")],
                    )
                status = await self._publisher.handle(scope, receive, send)
                return
            await discard_body(receive, DRAIN_SECONDS)
            if path == STREAM:
                route = "stream"
                only(method, "GET", path)
                await self._streams.handle(scope, receive, send, started)
                return
            if path in ("/healthz", "/readyz", OPENAPI):
                route = path.rpartition("/")[2].removesuffix(".json")
                only(method, "GET", path)
                status = await self._probe_or_document(route, send)
                return
            raise HTTPError(404, "not_found", NOT_FOUND)
        except HTTPError as error:
            status = error.status
            await send_error(send, error)
        except Exception:
            # Never an empty 500: log it, and answer with the usual JSON body when
            # the response has not started yet.
            _log.exception("unexpected error handling %s %s", method, path)
            status = 500
            failure = HTTPError(500, "internal_error", "the provider failed to handle this request")
            # When the response had started, the connection is closed instead.
            with contextlib.suppress(Exception):
                await send_error(send, failure)
        finally:
            if status:
                self.metrics.request(route, status, time.perf_counter() - started)

    async def _probe_or_document(self, route: str, send: Send) -> int:
        return await probe_or_document(self, route, send)

    async def readiness(self) -> tuple[int, bytes]:
        """``/readyz``'s answer: ``200`` when the backend answers, else ``503`` and why."""
        return await readiness(self)

    # -- common checks -------------------------------------------------------

    def authenticate(self, scope: Scope) -> Principal:
        values = [v for k, v in scope["headers"] if k.lower() == b"authorization"]
        try:
            if len(values) > 1:
                raise AuthError("more than one Authorization header")
            return self._verifier.verify_header(values[0] if values else None)
        except AuthError as exc:
            self.metrics.auth_failure(exc.reason)
            challenge = b'Bearer realm="bus-events"'
            if values:
                challenge += b', error="invalid_token"'
            raise HTTPError(
                401, "invalid_auth", str(exc), headers=[(b"www-authenticate", challenge)]
            ) from None

    def authorize(self, principal: Principal, name: str, action: Action, *, pattern: bool) -> None:
        policy = self.config.policy
        if pattern:
            required = policy.required_for_prefix(literal_prefix(name), action)
        else:
            required = policy.required(name, action)
        verb = "publish" if action == "send" else "stream"
        if required is None:
            self.metrics.auth_failure("reserved")
            raise HTTPError(
                403, "forbidden", f"{name} is in a reserved namespace: no token may {verb} it"
            )
        missing = principal.missing(required)
        if missing:
            self.metrics.auth_failure("forbidden")
            noun = "scope" if len(missing) == 1 else "scopes"
            raise HTTPError(
                403,
                "forbidden",
                f"token lacks {noun} {' '.join(missing)} required to {verb} {name}",
                required_scopes=list(required),
            )


def _settle_gc() -> None:
    """Keep what start-up made out of later collections, and collect the rest rarely.

    Modules, the app and the backend live as long as the process: frozen, they are
    no longer walked by every full collection.  Streams make many long-lived
    objects (buffers, tasks, parsers); with the default thresholds, opening a few
    thousand of them ran full passes over everything for hundreds of ms each, a
    stall for every request.  Garbage is still freed by reference counting at
    once; cycles are collected, only less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


def create_app(config: ProviderConfig) -> EventsApp:
    """Build the provider's ASGI app with the backend named by ``config.backend``.

    Raises :class:`ValueError` for an unknown backend name.

    >>> app = create_app(ProviderConfig(secret=b"s" * 32))
    """
    return EventsApp(config, make_backend(config))
