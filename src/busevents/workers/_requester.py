"""Request/reply over events: publish a request, await the response with its correlation id.

One :class:`Requester` holds one broadcast listener on the response name,
opened (and established) before any request is sent, and routes the
responses that arrive on it to the waiting requests by ``correlationId``
(spec §6).  Many requests in flight share that one listener.

Convention for error responses (our choice): the payload has the shape of an
API error body, ``{"error": "<code>", "message": "<text>", ...details}``.  A
response whose payload is a JSON object with a non-empty string ``error`` is
an error response (:meth:`ClientPublisher.reply_error` publishes one) and
:meth:`Requester.request` raises it as :class:`ResponseError`.  The payload
carries the mark, not ``bus.*`` metadata, because providers drop the ``bus.*``
keys that end-user tokens publish.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from .._contracts import Delivery, Event
from .._errors import ConfigError, ListenerUnavailable, ReplyTimeout, ResponseError
from .._groups import single_error
from .._retry import RetryPolicy
from ._listener import Readiness, listen_with_retry

if TYPE_CHECKING:
    from .._client import EventsClient
    from .._stream import EventStream

__all__ = ["Requester", "open_requester"]

log = logging.getLogger("busevents.requester")

_decode_event = msgspec.json.Decoder(Event).decode


class _ErrorPayload(msgspec.Struct):
    error: Any = None
    message: Any = None


_decode_error_payload = msgspec.json.Decoder(_ErrorPayload).decode


def _check_response(response: Event) -> None:
    """Raise :class:`ResponseError` when ``response`` is an error response.

    That is: its payload is an object whose ``error`` is a non-empty string.
    """
    raw = bytes(response.payload)
    if b'"error"' not in raw:  # most responses: no decoding at all
        return
    try:
        body = _decode_error_payload(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return  # not an object: not an error response
    if isinstance(body.error, str) and body.error:
        raise ResponseError(
            body.error,
            body.message if isinstance(body.message, str) else "",
            response=response,
            correlation_id=response.correlation_id or "",
        )


class _Slot:
    """Where the response to one pending request lands."""

    __slots__ = ("done", "event", "line")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.event: Event | None = None
        self.line = b""


class Requester:
    """Sends requests and matches their responses; make one with :func:`open_requester`.

    ``unmatched`` counts responses that no pending request waited for (late,
    duplicated, or meant for another requester on the same name): they are
    dropped and logged at debug level.  ``readiness`` tells whether the
    response listener is connected.
    """

    def __init__(self, client: EventsClient, response_name: str, readiness: Readiness) -> None:
        self.client = client
        self.response_name = response_name
        self.readiness = readiness
        self.unmatched = 0
        self._pending: dict[str, _Slot] = {}

    #: Raise :class:`ResponseError` when a response is an error response (its
    #: payload is an object whose ``error`` is a non-empty string).
    check_response = staticmethod(_check_response)

    def __repr__(self) -> str:
        return (
            f"<Requester {self.response_name} pending={len(self._pending)} "
            f"unmatched={self.unmatched} {self.readiness!r}>"
        )

    @property
    def pending(self) -> int:
        """Requests waiting for their response."""
        return len(self._pending)

    async def request(
        self,
        name: str,
        payload: Any = None,
        *,
        # A convenience deadline, as STYLE.md allows for request(): a cancel scope inside.
        timeout: float | None = 30.0,  # noqa: ASYNC109
        metadata: dict[str, str] | None = None,
    ) -> Event:
        """Publish the request ``name`` and return its response.

        A new correlation id (uuid4 hex) is generated for each request.
        ``timeout`` (seconds, ``None`` for none) bounds the whole exchange,
        including waiting for the listener to be (re)connected.

        Raises :class:`ReplyTimeout` when no response came in time,
        :class:`ResponseError` for an error response, the client's errors
        when publishing fails, and :class:`ConfigError` when ``name`` is the
        response name (the request would answer itself).

        Example: ``response = await requester.request("example.echo", {"n": 1}, timeout=5)``
        """
        response, _ = await self.exchange(name, payload, timeout=timeout, metadata=metadata)
        self.check_response(response)
        return response

    async def exchange(
        self,
        name: str,
        payload: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: dict[str, str] | None = None,
        correlation_id: str | None = None,
    ) -> tuple[Event, bytes]:
        """Like :meth:`request`, but return the response even when it is an error response.

        Returns the response and its NDJSON line exactly as received (for
        pass-through output); check it with :meth:`check_response`.
        ``correlation_id`` replaces the generated one.
        """
        if name == self.response_name:
            raise ConfigError(
                f"the request name and the response name are both {name!r}: "
                "the request would be taken for its own response"
            )
        correlation_id = correlation_id or uuid.uuid4().hex
        slot = _Slot()
        # Registered before publishing: the response may beat send()'s return.
        self._pending[correlation_id] = slot
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await self.readiness.wait()
                await self.client.send(
                    name, payload, correlation_id=correlation_id, metadata=metadata
                )
                await slot.done.wait()
        finally:
            del self._pending[correlation_id]
        if slot.event is None:
            assert timeout is not None
            raise ReplyTimeout.waiting_for(
                name,
                self.response_name,
                timeout=timeout,
                correlation_id=correlation_id,
                url=self.client.url,
            )
        return slot.event, slot.line

    async def _consume(self, stream: EventStream) -> None:
        # The original line is kept for pass-through output (the CLI prints it).
        async for block in stream.raw_batches():
            for line in block.split(b"\n"):
                if line.strip():
                    self._dispatch(line)

    def _dispatch(self, line: bytes) -> None:
        try:
            event = _decode_event(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.unmatched += 1
            log.debug(
                "%s: dropped a response that is not an event envelope: %s", self.response_name, exc
            )
            return
        slot = self._pending.get(event.correlation_id or "")
        if slot is None or slot.event is not None:
            self.unmatched += 1
            log.debug(
                "%s: dropped response %s (correlation id %s): no request waits for it",
                self.response_name,
                event.id,
                event.correlation_id,
            )
            return
        slot.event, slot.line = event, bytes(line)
        slot.done.set()


@asynccontextmanager
async def open_requester(
    client: EventsClient,
    response_name: str,
    *,
    retry: RetryPolicy | None = None,
    stall_timeout: float | None = None,
    readiness: Readiness | None = None,
) -> AsyncIterator[Requester]:
    """Open a :class:`Requester` whose responses arrive on ``response_name``.

    The broadcast listener on ``response_name`` is established before the
    block starts, and reconnects under ``retry`` (default:
    :meth:`RetryPolicy.from_env`); requests wait while it reconnects, and a
    response published during that gap is missed (its request times out).
    Raises ``Unauthorized``/``Forbidden`` at once, and
    :class:`ListenerUnavailable` when the listener cannot run (retrying off,
    and required or stopped); with retrying on it waits for the provider.
    Leaving the block closes the listener.

    Example::

        async with open_requester(client, "example.echo.reply") as requester:
            response = await requester.request("example.echo", {"n": 1}, timeout=5)
            print(response.payload_obj())
    """
    policy = retry or RetryPolicy.from_env()
    readiness = readiness if readiness is not None else Readiness()
    requester = Requester(client, response_name, readiness)
    part = readiness.child()
    listen = partial(
        listen_with_retry,
        client,
        response_name,
        requester._consume,
        readiness=part,
        policy=policy,
        delivery=Delivery.BROADCAST,
        stall_timeout=stall_timeout,
        label="requester",
    )

    async def listener() -> None:
        await listen()
        # Only a listener with retrying off ends; without it no response can arrive.
        raise ListenerUnavailable(
            f"the response listener on {response_name} stopped and retrying is off",
            url=client.stream_url,
            name=response_name,
        )

    try:
        with single_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(listener)
                await readiness.wait()
                try:
                    yield requester
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        part.detach()
