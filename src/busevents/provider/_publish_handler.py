"""``POST …/events``: read, validate, authorize and store one event (``202``)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import msgspec

from busevents import PublishRequest, nesting_error

from ._asgi import (
    DRAIN_SECONDS,
    JSON_HEADERS,
    BodyTimeout,
    HTTPError,
    Receive,
    Scope,
    Send,
    bad_request,
    discard_body,
    read_body,
    send_response,
    unavailable,
)
from ._idempotency import (
    REPLAYED_HEADER,
    InvalidIdempotencyKey,
    accepted_body,
    idempotency_key,
    publish_or_replay,
)
from ._names import InvalidParameter, check_name
from .backends._base import BackendUnavailable, Draft

if TYPE_CHECKING:
    from ._app import EventsApp

__all__ = ["PublishHandler"]

_log = logging.getLogger("busevents.provider")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise bad_request(f"invalid publish body: duplicate key {key!r} in a JSON object")
        result[key] = value
    return result


class PublishHandler:
    """Publishes for one :class:`EventsApp`; :meth:`handle` answers one request."""

    def __init__(self, app: EventsApp) -> None:
        self.app = app
        self._decoder = msgspec.json.Decoder(PublishRequest)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> int:
        try:
            principal = self.app.authenticate(scope)
        except HTTPError as error:
            # The token decides before the body is read: nothing of it is kept.  It
            # is drained briefly, so that closing the connection does not reset
            # it before the client has read the 401.
            if not await discard_body(receive, DRAIN_SECONDS):
                error.headers.append((b"connection", b"close"))
            raise
        limit = self.app.config.max_body_bytes
        seconds = self.app.config.body_timeout
        try:
            body = await read_body(receive, limit, seconds)
        except BodyTimeout:
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
            raise bad_request(str(exc)) from None
        identity = principal.subject
        if principal.internal and request.identity_id is not None:
            if not request.identity_id:
                raise bad_request("invalid publish body: identity_id must not be empty")
            identity = request.identity_id
        self.app.authorize(principal, name, "send", pattern=False)
        metadata = request.metadata
        if metadata and not principal.internal:
            # Platform keys (bus.*) are stamped by services; an end user cannot forge them,
            # just as the identity_id an end user sends is ignored.
            metadata = {k: v for k, v in metadata.items() if not k.startswith("bus.")} or None
        draft = Draft(name, request.payload, identity, request.correlation_id, metadata)
        try:
            with self.app.metrics.backend_call("publish"):
                stored = await publish_or_replay(self.app.backend, draft, key)
        except BackendUnavailable as exc:
            raise unavailable(exc) from None
        except Exception as exc:
            _log.exception("the backend failed to store an event")
            raise unavailable(
                BackendUnavailable("the event store failed: try again later")
            ) from exc
        if isinstance(stored, bytes):  # a repeat within the window: nothing was stored
            await send_response(send, 202, stored, [*JSON_HEADERS, REPLAYED_HEADER])
            return 202
        self.app.metrics.published(name)
        accepted = accepted_body(stored.id, name, request.correlation_id, stored.time)
        await send_response(send, 202, accepted, JSON_HEADERS)
        return 202

    def _parse_publish(self, body: bytes) -> PublishRequest:
        if not body.strip():
            raise bad_request("the publish body is empty: send a JSON object with a name")
        if (too_deep := nesting_error(body)) is not None:
            raise bad_request(too_deep)
        try:
            request = self._decoder.decode(body)
            # msgspec keeps the last of duplicate keys; an ambiguous body is refused
            # instead.  The stdlib parser also checks what msgspec leaves raw in the
            # payload: UTF-8 and integer sizes.
            json.loads(body, object_pairs_hook=_reject_duplicate_keys)
        except msgspec.ValidationError as exc:
            raise bad_request(f"invalid publish body: {exc}") from None
        except msgspec.DecodeError as exc:
            raise bad_request(f"the publish body is not valid JSON: {exc}") from None
        except RecursionError:
            raise bad_request(
                "the publish body is nested too deeply: keep JSON under 1000 levels"
            ) from None
        except UnicodeDecodeError as exc:
            raise bad_request(
                f"the publish body is not valid UTF-8 (byte {exc.start}): send UTF-8 JSON"
            ) from None
        except ValueError as exc:
            if "digits" in str(exc):
                raise bad_request(
                    "the publish body holds an integer of more than 4300 digits: "
                    "send it as a string"
                ) from None
            raise bad_request(f"the publish body is not valid JSON: {exc}") from None
        payload = bytes(request.payload)
        if b"\n" in payload or b"\r" in payload:
            # Whitespace between tokens would break the one-envelope-per-line framing.
            compact = msgspec.Raw(msgspec.json.format(payload, indent=-1))
            request = msgspec.structs.replace(request, payload=compact)
        return request
