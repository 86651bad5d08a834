"""What the provider's request handlers share: ASGI types, error responses, body reading."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec
import trio

from busevents import ErrorBody

from .backends._base import BackendUnavailable

__all__ = [
    "DRAIN_SECONDS",
    "JSON_HEADERS",
    "BodyTimeout",
    "HTTPError",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "bad_request",
    "cancel_on_disconnect",
    "discard_body",
    "encode",
    "only",
    "read_body",
    "send_error",
    "send_response",
    "unavailable",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
#: How long an unauthenticated request's body is read (and discarded) before the
#: 401, so that closing the connection does not reset it before the client reads
#: the answer.  Nothing of it is kept.
DRAIN_SECONDS = 1.0
encode = msgspec.json.Encoder().encode
#: Seconds a client should wait before retrying after ``503 backend_unavailable``.
RETRY_AFTER = b"1"


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


def bad_request(message: str) -> HTTPError:
    return HTTPError(400, "bad_request", message)


def unavailable(exc: BackendUnavailable) -> HTTPError:
    return HTTPError(503, "backend_unavailable", str(exc), headers=[(b"retry-after", RETRY_AFTER)])


class BodyTimeout(Exception):
    pass


async def read_body(receive: Receive, limit: int, seconds: float) -> bytes | None:
    """The whole request body, or ``None`` when it exceeds ``limit`` bytes.

    The body is read to its end even when too big (hypercorn's per-request
    queue is small and an unread body could stall the connection), keeping at
    most ``limit`` bytes.  Raises :class:`BodyTimeout` when it has not ended
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
        raise BodyTimeout
    return None if size > limit else b"".join(parts)


async def discard_body(receive: Receive, seconds: float) -> bool:
    """Read and drop the request body for up to ``seconds``; whether it ended."""
    with trio.move_on_after(seconds):
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return True
    return False


async def send_response(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: HTTPError) -> None:
    body = encode(
        ErrorBody(error=error.code, message=error.message, required_scopes=error.required_scopes)
    )
    await send_response(send, error.status, body, [*JSON_HEADERS, *error.headers])


async def cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


def only(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise HTTPError(
            405,
            "method_not_allowed",
            f"use {allowed} on {path}",
            headers=[(b"allow", allowed.encode())],
        )
