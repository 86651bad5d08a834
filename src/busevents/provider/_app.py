"""The provider's ASGI 3 application: routing, auth, validation, publish and stream.

Routes (any prefix, so ``/api/v1/events`` and ``/local/v1/events`` both work):

* ``POST …/events`` — publish one event (``202``);
* ``GET …/events/stream`` — NDJSON stream of matching events (``200``, chunked).

Every refusal is a JSON error body, decided in the order auth (``401``), body
size (``413``), validation (``400``), scope (``403``), and always before a
stream opens.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

import msgspec
import trio

from busevents import Delivery, ErrorBody, PublishRequest, StreamSpec

from ._auth import INTERNAL_AUDIENCE, AuthError, Principal, TokenVerifier
from ._backend import (
    Backend,
    BackendLimit,
    BackendUnavailable,
    Draft,
    Selector,
    StoredEvent,
    Subscription,
)
from ._config import ProviderConfig
from ._memory import MemoryBackend
from ._names import (
    InvalidParameter,
    check_flag,
    check_label,
    check_name,
    has_wildcard,
    literal_prefix,
)
from ._policy import Action

__all__ = ["EventsApp", "HTTPError", "create_app"]

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
#: How long a refused request's body is read (and discarded) before answering.
_DRAIN_SECONDS = 10.0
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


class _AcceptedBody(msgspec.Struct, omit_defaults=True, rename={"correlation_id": "correlationId"}):
    accepted: bool
    id: str
    name: str
    correlation_id: str | None = None
    time: str | None = None


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


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or ``None`` when it exceeds ``limit`` bytes.

    The body is always read to its end (within a time bound), even when too big:
    hypercorn's per-request queue is small and an unread body could otherwise
    stall the connection.
    """
    parts: list[bytes] = []
    size = 0
    with trio.move_on_after(_DRAIN_SECONDS):
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # http.disconnect
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                parts.append(chunk)
            if not message.get("more_body", False):
                break
    return None if size > limit else b"".join(parts)


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
        self._verifier = TokenVerifier(config.secret)
        self._decoder = msgspec.json.Decoder(PublishRequest)

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
        try:
            if path.endswith("/events"):
                if method != "POST":
                    await _read_body(receive, 0)
                    raise HTTPError(
                        405,
                        "method_not_allowed",
                        f"use POST on {path}",
                        headers=[(b"allow", b"POST")],
                    )
                await self._publish(scope, receive, send)
                return
            await _read_body(receive, 0)
            if not path.endswith("/events/stream"):
                raise HTTPError(
                    404,
                    "not_found",
                    "no such endpoint: use POST .../events or GET .../events/stream",
                )
            if method != "GET":
                raise HTTPError(
                    405, "method_not_allowed", f"use GET on {path}", headers=[(b"allow", b"GET")]
                )
            await self._stream(scope, receive, send)
        except HTTPError as error:
            await _send_error(send, error)

    # -- common checks -------------------------------------------------------

    def _authenticate(self, scope: Scope) -> Principal:
        values = [v for k, v in scope["headers"] if k.lower() == b"authorization"]
        try:
            if len(values) > 1:
                raise AuthError("more than one Authorization header")
            return self._verifier.verify_header(values[0] if values else None)
        except AuthError as exc:
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
            raise HTTPError(
                403, "forbidden", f"{name} is in a reserved namespace: no token may {verb} it"
            )
        missing = principal.missing(required)
        if missing:
            noun = "scope" if len(missing) == 1 else "scopes"
            raise HTTPError(
                403,
                "forbidden",
                f"token lacks {noun} {' '.join(missing)} required to {verb} {name}",
                required_scopes=list(required),
            )

    # -- publish -------------------------------------------------------------

    async def _publish(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.config.max_body_bytes
        body = await _read_body(receive, limit)
        principal = self._authenticate(scope)
        if body is None:
            raise HTTPError(
                413, "payload_too_large", f"the request body exceeds the limit of {limit} bytes"
            )
        request = self._parse_publish(body)
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
        try:
            stored = await self.backend.publish(
                Draft(name, request.payload, identity, request.correlation_id, metadata)
            )
        except BackendUnavailable as exc:
            raise _unavailable(exc) from None
        accepted = _AcceptedBody(True, stored.id, name, request.correlation_id, stored.time)
        await _send_response(send, 202, _encode(accepted), _JSON_HEADERS)

    def _parse_publish(self, body: bytes) -> PublishRequest:
        if not body.strip():
            raise _bad_request("the publish body is empty: send a JSON object with a name")
        try:
            request = self._decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise _bad_request(f"invalid publish body: {exc}") from None
        except msgspec.DecodeError as exc:
            raise _bad_request(f"the publish body is not valid JSON: {exc}") from None
        # msgspec keeps the last of duplicate keys; an ambiguous body is refused instead.
        try:
            json.loads(body, object_pairs_hook=_reject_duplicate_keys)
        except RecursionError:
            raise _bad_request("invalid publish body: JSON nested too deeply") from None
        payload = bytes(request.payload)
        if b"\n" in payload or b"\r" in payload:
            # Whitespace between tokens would break the one-envelope-per-line framing.
            compact = msgspec.Raw(msgspec.json.format(payload, indent=-1))
            request = msgspec.structs.replace(request, payload=compact)
        return request

    # -- stream --------------------------------------------------------------

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = self._authenticate(scope)
        spec = self._parse_query(scope.get("query_string", b""))
        pattern = has_wildcard(spec.name)
        if pattern and not principal.internal:
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
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            await self._write_stream(send, spec, selector)
            nursery.cancel_scope.cancel()

    def _parse_query(self, query: bytes) -> StreamSpec:
        params: dict[str, str] = {}
        known = ("name", "delivery", "group", "consumer", "replay", "follow")
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
            return spec
        except InvalidParameter as exc:
            raise _bad_request(str(exc)) from None

    async def _write_stream(self, send: Send, spec: StreamSpec, selector: Selector) -> None:
        sent = False

        async def send_once(message: Message) -> None:
            nonlocal sent
            sent = True
            await send(message)

        try:
            await self._write_stream_body(send_once, spec, selector)
        # Answered here, not raised: this runs inside the disconnect watcher's nursery.
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

    async def _write_stream_body(self, send: Send, spec: StreamSpec, selector: Selector) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": _STREAM_HEADERS}
        if not spec.follow:
            history = await self.backend.snapshot(selector) if spec.replay else []
            await send(start)
            await self._send_history(send, history)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        # Subscribe before taking the snapshot: nothing published in between is
        # missed, and anything in both is skipped on the live side by sequence.
        async with self.backend.subscribe(selector) as subscription:
            await send(start)
            seen = 0
            if spec.replay:
                history = await self.backend.snapshot(selector)
                await self._send_history(send, history)
                if history:
                    seen = history[-1].seq
            await self._follow(send, subscription, seen, _BATCH_LIMIT[spec.delivery])
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_history(self, send: Send, history: list[StoredEvent]) -> None:
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

    async def _follow(self, send: Send, subscription: Subscription, seen: int, limit: int) -> None:
        """Write live events until the backend ends the subscription."""
        keepalive = self.config.keepalive or math.inf
        while True:
            batch: list[StoredEvent] | None = None
            with trio.move_on_after(keepalive):
                batch = await subscription.receive_batch(limit)
            if batch is None:
                await send({"type": "http.response.body", "body": b"\n", "more_body": True})
                continue
            if not batch:
                return
            if seen:
                batch = [event for event in batch if event.seq > seen]
                if not batch:
                    continue
                seen = 0  # sequences only grow: later batches are all new
            body = batch[0].line if len(batch) == 1 else b"".join(e.line for e in batch)
            await send({"type": "http.response.body", "body": body, "more_body": True})


def create_app(config: ProviderConfig) -> EventsApp:
    """Build the provider's ASGI app with the backend named by ``config.backend``.

    Raises :class:`ValueError` for an unknown backend name.

    >>> app = create_app(ProviderConfig(secret=b"s" * 32))
    """
    return EventsApp(config, make_backend(config))


def make_backend(config: ProviderConfig) -> Backend:
    """The backend named by ``config.backend``, not yet connected (see ``Backend.running``).

    Raises :class:`ValueError` for an unknown name or a setting the backend refuses.
    """
    if config.backend == "memory":
        return MemoryBackend(
            listener_queue=config.listener_queue,
            history_limit=config.history_limit,
            listener_queue_bytes=config.listener_queue_bytes,
            history_bytes=config.history_bytes,
            max_groups=config.max_groups,
            max_groups_per_identity=config.max_groups_per_identity,
            group_idle=config.group_idle,
        )
    if config.backend not in ("redis", "postgres"):
        raise ValueError(
            f"unknown provider backend {config.backend!r}: known backends: memory, redis, postgres"
        )
    if config.allow_wildcards:
        raise ValueError(
            f"wildcard streams are supported by the memory backend only, not {config.backend}"
        )
    if config.backend == "redis":
        from ._redis import RedisBackend

        return RedisBackend(config.redis, history_limit=config.history_limit)
    from ._postgres import PostgresBackend

    return PostgresBackend(config.postgres, history_limit=config.history_limit)
