"""The provider's ASGI 3 application: routing, auth, validation, publish and stream.

Routes (any prefix, so ``/api/v1/events`` and ``/local/v1/events`` both work):

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
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

import msgspec
import trio

from busevents import Delivery, ErrorBody, PublishRequest, StreamSpec, single_error

from ._auth import INTERNAL_AUDIENCE, AuthError, Principal, TokenVerifier
from ._config import ProviderConfig
from ._idempotency import (
    REPLAYED_HEADER,
    InvalidIdempotencyKey,
    accepted_body,
    idempotency_key,
    publish_or_replay,
)
from ._metrics import CONTENT_TYPE, ProviderMetrics
from ._names import (
    InvalidParameter,
    check_flag,
    check_label,
    check_name,
    has_wildcard,
    literal_prefix,
)
from ._openapi import openapi_json
from ._policy import Action
from .backends import make_backend as make_backend
from .backends._base import (
    Backend,
    BackendLimit,
    BackendUnavailable,
    Draft,
    Selector,
    StoredEvent,
    Subscription,
)

__all__ = ["EventsApp", "HTTPError", "MetricsApp", "create_app"]

_log = logging.getLogger("busevents.provider")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON_HEADERS = [(b"content-type", b"application/json")]
_STREAM_HEADERS = [
    (b"content-type", b"application/x-ndjson"),
    (b"cache-control", b"no-store"),
    # Ask buffering reverse proxies (nginx) to pass lines through at once.
    (b"x-accel-buffering", b"no"),
]
#: Most events joined into one write.  Unicast batches stay small so that one
#: consumer does not take work that an idle peer could have done.
_BATCH_LIMIT = {Delivery.BROADCAST: 1024, Delivery.UNICAST: 16}
_SNAPSHOT_CHUNK = 256 * 1024
#: How long an unauthenticated request's body is read (and discarded) before the
#: 401, so that closing the connection does not reset it before the client reads
#: the answer.  Nothing of it is kept.
_DRAIN_SECONDS = 1.0
#: How long ``/readyz`` waits for the backend's answer.
_PING_SECONDS = 2.0
_HEALTHY = b'{"ok":true,"service":"bus-events"}'
_DELIVERIES = {d.value: d for d in Delivery}
_encode = msgspec.json.Encoder().encode
_log = logging.getLogger("busevents.provider")
#: Seconds a client should wait before retrying after ``503 backend_unavailable``.
_RETRY_AFTER = b"1"


class HTTPError(Exception):
    """An error response: status, JSON ``error`` code, message and extra headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        required_scopes: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []
        self.required_scopes = required_scopes


def _bad_request(message: str) -> HTTPError:
    return HTTPError(400, "bad_request", message)


def _unavailable(exc: BackendUnavailable) -> HTTPError:
    return HTTPError(503, "backend_unavailable", str(exc), headers=[(b"retry-after", _RETRY_AFTER)])


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _bad_request(f"invalid publish body: duplicate key {key!r} in a JSON object")
        result[key] = value
    return result


class _BodyTimeout(Exception):
    pass


async def _read_body(receive: Receive, limit: int, seconds: float) -> bytes | None:
    """The whole request body, or ``None`` when it exceeds ``limit`` bytes.

    The body is read to its end even when too big (hypercorn's per-request
    queue is small and an unread body could stall the connection), keeping at
    most ``limit`` bytes.  Raises :class:`_BodyTimeout` when it has not ended
    after ``seconds``; returns ``None`` early when the client disconnects.
    """
    parts: list[bytes] = []
    size = 0
    with trio.move_on_after(seconds) as deadline:
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # http.disconnect: nobody to answer
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                parts.append(chunk)
            if not message.get("more_body", False):
                break
    if deadline.cancelled_caught:
        raise _BodyTimeout
    return None if size > limit else b"".join(parts)


async def _discard_body(receive: Receive, seconds: float) -> bool:
    """Read and drop the request body for up to ``seconds``; whether it ended."""
    with trio.move_on_after(seconds):
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return True
    return False


async def _send_response(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, error: HTTPError) -> None:
    body = _encode(
        ErrorBody(error=error.code, message=error.message, required_scopes=error.required_scopes)
    )
    await _send_response(send, error.status, body, [*_JSON_HEADERS, *error.headers])


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


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
        self._decoder = msgspec.json.Decoder(PublishRequest)
        self._closing = False
        # The scopes that following streams wait in for their next events; closing
        # cancels the waits (never a send), so each stream ends with its final chunk.
        self._waits: dict[object, trio.CancelScope] = {}

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
        for wait in list(self._waits.values()):
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

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        started = time.perf_counter()
        route = "other"
        status = 0  # 0: recorded by the stream itself, when its headers go out
        try:
            if path.endswith("/events"):
                route = "publish"
                if method != "POST":
                    await _discard_body(receive, _DRAIN_SECONDS)
                    raise HTTPError(
                        405,
                        "method_not_allowed",
                        f"use POST on {path}",
                        headers=[(b"allow", b"POST")],
                    )
                status = await self._publish(scope, receive, send)
                return
            await _discard_body(receive, _DRAIN_SECONDS)
            if path.endswith("/events/stream"):
                route = "stream"
                _only(method, "GET", path)
                await self._stream(scope, receive, send, started)
                return
            if path in ("/healthz", "/readyz") or path.endswith("/events/openapi.json"):
                route = path.rpartition("/")[2].removesuffix(".json")
                _only(method, "GET", path)
                status = await self._probe_or_document(route, send)
                return
            raise HTTPError(
                404,
                "not_found",
                "no such endpoint: use POST .../events or GET .../events/stream",
            )
        except HTTPError as error:
            status = error.status
            await _send_error(send, error)
        except Exception:
            # Never an empty 500: log it, and answer with the usual JSON body when
            # the response has not started yet.
            _log.exception("unexpected error handling %s %s", method, path)
            status = 500
            failure = HTTPError(500, "internal_error", "the provider failed to handle this request")
            # When the response had started, the connection is closed instead.
            with contextlib.suppress(Exception):
                await _send_error(send, failure)
        finally:
            if status:
                self.metrics.request(route, status, time.perf_counter() - started)

    async def _probe_or_document(self, route: str, send: Send) -> int:
        if route == "openapi":
            await _send_response(send, 200, openapi_json(), _JSON_HEADERS)
            return 200
        if route == "healthz":
            await _send_response(send, 200, _HEALTHY, _JSON_HEADERS)
            return 200
        status, body = await self.readiness()
        await _send_response(send, status, body, [*_JSON_HEADERS, (b"cache-control", b"no-store")])
        return status

    async def readiness(self) -> tuple[int, bytes]:
        """``/readyz``'s answer: ``200`` when the backend answers, else ``503`` and why."""
        if self._closing:
            return 503, _not_ready("shutting_down", "the provider is shutting down")
        try:
            with trio.fail_after(_PING_SECONDS), self.metrics.backend_call("ping"):
                await self.backend.ping()
        except trio.TooSlowError:
            return 503, _not_ready(
                "backend_unavailable", f"the backend did not answer within {_PING_SECONDS:g} s"
            )
        except Exception as exc:
            return 503, _not_ready(
                "backend_unavailable", f"the backend does not answer: {type(exc).__name__}"
            )
        return 200, _encode({"ok": True, "service": "bus-events", "backend": self.config.backend})

    # -- common checks -------------------------------------------------------

    def _authenticate(self, scope: Scope) -> Principal:
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

    def _authorize(self, principal: Principal, name: str, action: Action, *, pattern: bool) -> None:
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

    # -- publish -------------------------------------------------------------

    async def _publish(self, scope: Scope, receive: Receive, send: Send) -> int:
        try:
            principal = self._authenticate(scope)
        except HTTPError as error:
            # The token decides before the body is read: nothing of it is kept.  It
            # is drained briefly, so that closing the connection does not reset
            # it before the client has read the 401.
            if not await _discard_body(receive, _DRAIN_SECONDS):
                error.headers.append((b"connection", b"close"))
            raise
        limit = self.config.max_body_bytes
        seconds = self.config.body_timeout
        try:
            body = await _read_body(receive, limit, seconds)
        except _BodyTimeout:
            raise HTTPError(
                408,
                "request_timeout",
                f"the request body did not arrive within {seconds:g} s: send it at once",
                headers=[(b"connection", b"close")],
            ) from None
        if body is None:
            raise HTTPError(
                413, "payload_too_large", f"the request body exceeds the limit of {limit} bytes"
            )
        request = self._parse_publish(body)
        try:
            key = idempotency_key(scope["headers"])
        except InvalidIdempotencyKey as exc:
            raise HTTPError(400, "invalid_idempotency_key", str(exc)) from None
        try:
            name = check_name(request.name)
        except InvalidParameter as exc:
            raise _bad_request(str(exc)) from None
        identity = principal.subject
        if principal.internal and request.identity_id is not None:
            if not request.identity_id:
                raise _bad_request("invalid publish body: identity_id must not be empty")
            identity = request.identity_id
        self._authorize(principal, name, "send", pattern=False)
        metadata = request.metadata
        if metadata and not principal.internal:
            # Platform keys (bus.*) are stamped by services; an end user cannot forge them,
            # just as the identity_id an end user sends is ignored.
            metadata = {k: v for k, v in metadata.items() if not k.startswith("bus.")} or None
        draft = Draft(name, request.payload, identity, request.correlation_id, metadata)
        try:
            with self.metrics.backend_call("publish"):
                stored = await publish_or_replay(self.backend, draft, key)
        except BackendUnavailable as exc:
            raise _unavailable(exc) from None
        except Exception as exc:
            _log.exception("the backend failed to store an event")
            raise _unavailable(
                BackendUnavailable("the event store failed: try again later")
            ) from exc
        if isinstance(stored, bytes):  # a repeat within the window: nothing was stored
            await _send_response(send, 202, stored, [*_JSON_HEADERS, REPLAYED_HEADER])
            return 202
        self.metrics.published(name)
        accepted = accepted_body(stored.id, name, request.correlation_id, stored.time)
        await _send_response(send, 202, accepted, _JSON_HEADERS)
        return 202

    def _parse_publish(self, body: bytes) -> PublishRequest:
        if not body.strip():
            raise _bad_request("the publish body is empty: send a JSON object with a name")
        try:
            request = self._decoder.decode(body)
            # msgspec keeps the last of duplicate keys; an ambiguous body is refused
            # instead.  The stdlib parser also checks what msgspec leaves raw in the
            # payload: UTF-8 and integer sizes.
            json.loads(body, object_pairs_hook=_reject_duplicate_keys)
        except msgspec.ValidationError as exc:
            raise _bad_request(f"invalid publish body: {exc}") from None
        except msgspec.DecodeError as exc:
            raise _bad_request(f"the publish body is not valid JSON: {exc}") from None
        except RecursionError:
            raise _bad_request(
                "the publish body is nested too deeply: keep JSON under 1000 levels"
            ) from None
        except UnicodeDecodeError as exc:
            raise _bad_request(
                f"the publish body is not valid UTF-8 (byte {exc.start}): send UTF-8 JSON"
            ) from None
        except ValueError as exc:
            if "digits" in str(exc):
                raise _bad_request(
                    "the publish body holds an integer of more than 4300 digits: "
                    "send it as a string"
                ) from None
            raise _bad_request(f"the publish body is not valid JSON: {exc}") from None
        payload = bytes(request.payload)
        if b"\n" in payload or b"\r" in payload:
            # Whitespace between tokens would break the one-envelope-per-line framing.
            compact = msgspec.Raw(msgspec.json.format(payload, indent=-1))
            request = msgspec.structs.replace(request, payload=compact)
        return request

    # -- stream --------------------------------------------------------------

    async def _stream(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        principal = self._authenticate(scope)
        spec, after = self._parse_query(scope.get("query_string", b""))
        pattern = has_wildcard(spec.name)
        if pattern and not principal.internal:
            self.metrics.auth_failure("forbidden")
            raise HTTPError(
                403,
                "forbidden",
                f"wildcard streams need a service token (audience {INTERNAL_AUDIENCE})",
            )
        self._authorize(principal, spec.name, "listen", pattern=pattern)
        selector = Selector(
            spec.name,
            None if principal.internal else principal.subject,
            spec.delivery,
            spec.group or "default",
            spec.consumer or "default",
            pattern,
        )
        delivery = spec.delivery.value
        gauge = self.metrics.open_streams.labels(delivery)
        gauge.inc()
        try:
            await self._write_stream(receive, send, spec, selector, started, after)
        finally:
            gauge.dec()

    def _parse_query(self, query: bytes) -> tuple[StreamSpec, tuple[int, int] | None]:
        params: dict[str, str] = {}
        known = ("name", "delivery", "group", "consumer", "replay", "follow", "after")
        for key, value in parse_qsl(
            query.decode("latin-1"), keep_blank_values=True, errors="replace"
        ):
            if key in known and key in params:
                raise _bad_request(f"parameter {key} is given more than once")
            params[key] = value
        try:
            if "name" not in params:
                raise InvalidParameter("missing required parameter name (the event name)")
            name = check_name(params["name"], wildcards=self.config.allow_wildcards)
            delivery_text = params.get("delivery", "broadcast")
            delivery = _DELIVERIES.get(delivery_text)
            if delivery is None:
                raise InvalidParameter(
                    f"invalid delivery {delivery_text[:64]!r}: expected broadcast or unicast"
                )
            after = _event_key(params["after"]) if "after" in params else None
            if "after" in params and after is None:
                raise InvalidParameter(
                    f"invalid after {params['after'][:64]!r}: expected an event id "
                    "such as 1700000000000-0"
                )
            spec = StreamSpec(
                name=name,
                delivery=delivery,
                group=check_label(params.get("group", "default"), param="group"),
                consumer=check_label(params.get("consumer", "default"), param="consumer"),
                replay=check_flag(params.get("replay", "false"), param="replay"),
                follow=check_flag(params.get("follow", "true"), param="follow"),
            )
            if spec.replay and delivery is Delivery.UNICAST:
                # A group's consumers compete for each event; handing the history to
                # every consumer would deliver it many times (see docs/backends.md).
                raise InvalidParameter(
                    "replay=true is not supported with delivery=unicast: a group's "
                    "consumers share live events only; read history with a broadcast stream"
                )
            return spec, after
        except InvalidParameter as exc:
            raise _bad_request(str(exc)) from None

    async def _write_stream(
        self,
        receive: Receive,
        send: Send,
        spec: StreamSpec,
        selector: Selector,
        started: float,
        after: tuple[int, int] | None,
    ) -> None:
        sent = False

        async def send_once(message: Message) -> None:
            nonlocal sent
            sent = True
            await send(message)

        try:
            with single_error():
                await self._write_stream_body(receive, send_once, spec, selector, started, after)
        except BackendLimit as exc:
            if sent:
                raise
            await _send_error(send, HTTPError(429, "too_many_groups", str(exc)))
        except BackendUnavailable as exc:
            if not sent:
                await _send_error(send, _unavailable(exc))
                return
            # Ending without the final chunk tells the client the stream broke: it reconnects.
            _log.warning("stream of %s ended: %s", spec.name, exc)

    async def _write_stream_body(
        self,
        receive: Receive,
        send: Send,
        spec: StreamSpec,
        selector: Selector,
        started: float,
        after: tuple[int, int] | None,
    ) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": _STREAM_HEADERS}
        end = {"type": "http.response.body", "body": b"", "more_body": False}
        delivery = spec.delivery.value
        if not spec.follow:
            history = await self._snapshot(selector, after) if spec.replay else []
            self.metrics.request("stream", 200, time.perf_counter() - started)
            await send(start)
            await self._send_history(send, history, delivery)
            # No disconnect watcher here: cancelling hypercorn inside this final send
            # (it recycles or closes the connection there) would leave the
            # connection open for good.
            await send(end)
            return
        # Subscribe before taking the snapshot: nothing published in between is
        # missed, and anything in both is skipped on the live side by sequence.
        async with self.backend.subscribe(selector) as subscription:
            seen = 0
            history = await self._snapshot(selector) if spec.replay else []
            self.metrics.request("stream", 200, time.perf_counter() - started)
            await send(start)
            if history:
                seen = history[-1].seq
                history = _after(history, after)
            async with trio.open_nursery() as nursery:
                # A client that goes away ends the stream (and its subscription).
                nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
                await self._send_history(send, history, delivery)
                await self._follow(send, subscription, seen, spec)
                nursery.cancel_scope.cancel()
        await send(end)

    async def _snapshot(
        self, selector: Selector, after: tuple[int, int] | None = None
    ) -> list[StoredEvent]:
        try:
            with self.metrics.backend_call("snapshot"):
                return _after(await self.backend.snapshot(selector), after)
        except BackendUnavailable:
            raise
        except Exception as exc:
            _log.exception("the backend failed to read the history")
            raise BackendUnavailable("the event store failed: try again later") from exc

    async def _send_history(self, send: Send, history: list[StoredEvent], delivery: str) -> None:
        chunk: list[bytes] = []
        size = 0
        for event in history:
            chunk.append(event.line)
            size += len(event.line)
            if size >= _SNAPSHOT_CHUNK:
                await send(
                    {"type": "http.response.body", "body": b"".join(chunk), "more_body": True}
                )
                chunk, size = [], 0
        if chunk:
            await send({"type": "http.response.body", "body": b"".join(chunk), "more_body": True})
        counts: dict[str, int] = {}
        for event in history:
            counts[event.name] = counts.get(event.name, 0) + 1
        for name, count in counts.items():
            self.metrics.delivered(name, delivery, count)

    async def _follow(
        self, send: Send, subscription: Subscription, seen: int, spec: StreamSpec
    ) -> None:
        """Write live events until the backend ends the subscription or the app closes."""
        keepalive = self.config.keepalive or math.inf
        limit = _BATCH_LIMIT[spec.delivery]
        delivery = spec.delivery.value
        key = object()
        metrics = self.metrics
        try:
            while not self._closing:
                batch: list[StoredEvent] | None = None
                with trio.move_on_after(keepalive) as wait:
                    self._waits[key] = wait
                    batch = await subscription.receive_batch(limit)
                if batch is None:
                    if self._closing:
                        return
                    await send({"type": "http.response.body", "body": b"\n", "more_body": True})
                    continue
                if not batch:
                    metrics.slow_consumers.inc()
                    return
                if seen:
                    batch = [event for event in batch if event.seq > seen]
                    if not batch:
                        continue
                    seen = 0  # sequences only grow: later batches are all new
                body = batch[0].line if len(batch) == 1 else b"".join(e.line for e in batch)
                await send({"type": "http.response.body", "body": body, "more_body": True})
                metrics.delivered(spec.name, delivery, len(batch))
        finally:
            self._waits.pop(key, None)


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
        await _discard_body(receive, _DRAIN_SECONDS)
        path: str = scope["path"]
        try:
            _only(scope["method"], "GET", path)
            if path == "/metrics":
                body = self.events.metrics.exposition()
                await _send_response(send, 200, body, [(b"content-type", CONTENT_TYPE.encode())])
            elif path in ("/healthz", "/readyz"):
                await self.events._probe_or_document(path[1:], send)
            else:
                raise HTTPError(404, "not_found", "no such endpoint: use GET /metrics")
        except HTTPError as error:
            await _send_error(send, error)


def _event_key(event_id: str) -> tuple[int, int] | None:
    """``"<ms>-<seq>"`` as an integer pair (ids compare that way), or ``None``."""
    ms, sep, seq = event_id.partition("-")
    if not sep or not (ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit()):
        return None
    if len(ms) > 20 or len(seq) > 20:
        return None
    return int(ms), int(seq)


def _after(history: list[StoredEvent], after: tuple[int, int] | None) -> list[StoredEvent]:
    # The ``after`` extension: resume a replay behind a cursor.  Filtered here, so
    # every backend honours it; an id of another form is kept (never lose events).
    if after is None or not history:
        return history
    kept = []
    for event in history:
        key = _event_key(event.id)
        if key is None or key > after:
            kept.append(event)
    return kept


def _only(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise HTTPError(
            405,
            "method_not_allowed",
            f"use {allowed} on {path}",
            headers=[(b"allow", allowed.encode())],
        )


def _not_ready(code: str, message: str) -> bytes:
    return _encode({"ok": False, "service": "bus-events", "error": code, "message": message})


def create_app(config: ProviderConfig) -> EventsApp:
    """Build the provider's ASGI app with the backend named by ``config.backend``.

    Raises :class:`ValueError` for an unknown backend name.

    >>> app = create_app(ProviderConfig(secret=b"s" * 32))
    """
    return EventsApp(config, make_backend(config))
