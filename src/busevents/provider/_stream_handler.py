"""``GET …/events/stream``: the NDJSON stream of matching events (replay and follow)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import trio

from busevents import Delivery, StreamSpec, single_error
from busevents import event_id_key as _event_key

from ._asgi import (
    HTTPError,
    Message,
    Receive,
    Scope,
    Send,
    bad_request,
    cancel_on_disconnect,
    send_error,
    unavailable,
)
from ._auth import INTERNAL_AUDIENCE
from ._h11server import BODY_WRITER, BodyWriter, chunk
from ._names import InvalidParameter, check_flag, check_label, check_name, has_wildcard
from .backends._base import BackendLimit, BackendUnavailable, Selector, StoredEvent, Subscription

if TYPE_CHECKING:
    from ._app import EventsApp

__all__ = ["StreamHandler"]

_log = logging.getLogger("busevents.provider")

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
_DELIVERIES = {d.value: d for d in Delivery}


class StreamHandler:
    """Streams for one :class:`EventsApp`; :meth:`handle` serves one request."""

    def __init__(self, app: EventsApp) -> None:
        self.app = app
        self._shared = _SharedChunk()
        config = app.config
        # Replay pages in flight, all streams together (see ``_replay``).
        self._budget = trio.CapacityLimiter(max(1, config.replay_bytes // config.replay_page_bytes))

    async def handle(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        principal = self.app.authenticate(scope)
        spec, after = self._parse_query(scope.get("query_string", b""))
        pattern = has_wildcard(spec.name)
        if pattern and not principal.internal:
            self.app.metrics.auth_failure("forbidden")
            raise HTTPError(
                403,
                "forbidden",
                f"wildcard streams need a service token (audience {INTERNAL_AUDIENCE})",
            )
        self.app.authorize(principal, spec.name, "listen", pattern=pattern)
        selector = Selector(
            spec.name,
            None if principal.internal else principal.subject,
            spec.delivery,
            spec.group or "default",
            spec.consumer or "default",
            pattern,
        )
        delivery = spec.delivery.value
        gauge = self.app.metrics.open_streams.labels(delivery)
        gauge.inc()
        # Under the provider's own server, live events go straight to the socket.
        writer: BodyWriter | None = scope.get("extensions", {}).get(BODY_WRITER)
        try:
            await self._write_stream(receive, send, spec, selector, started, after, writer)
        finally:
            gauge.dec()

    def _parse_query(self, query: bytes) -> tuple[StreamSpec, tuple[int, int] | None]:
        params: dict[str, str] = {}
        known = ("name", "delivery", "group", "consumer", "replay", "follow", "after")
        for key, value in parse_qsl(
            query.decode("latin-1"), keep_blank_values=True, errors="replace"
        ):
            if key in known and key in params:
                raise bad_request(f"parameter {key} is given more than once")
            params[key] = value
        try:
            if "name" not in params:
                raise InvalidParameter("missing required parameter name (the event name)")
            name = check_name(params["name"], wildcards=self.app.config.allow_wildcards)
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
            raise bad_request(str(exc)) from None

    async def _write_stream(
        self,
        receive: Receive,
        send: Send,
        spec: StreamSpec,
        selector: Selector,
        started: float,
        after: tuple[int, int] | None,
        writer: BodyWriter | None,
    ) -> None:
        sent = False

        async def send_once(message: Message) -> None:
            nonlocal sent
            sent = True
            await send(message)

        try:
            with single_error():
                await self._write_stream_body(
                    receive, send_once, spec, selector, started, after, writer
                )
        except BackendLimit as exc:
            if sent:
                raise
            await send_error(send, HTTPError(429, "too_many_groups", str(exc)))
        except BackendUnavailable as exc:
            if not sent:
                await send_error(send, unavailable(exc))
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
        writer: BodyWriter | None,
    ) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": _STREAM_HEADERS}
        end = {"type": "http.response.body", "body": b"", "more_body": False}
        delivery = spec.delivery.value
        began = False

        async def begin() -> None:
            nonlocal began
            if not began:
                began = True
                self.app.metrics.request("stream", 200, time.perf_counter() - started)
                await send(start)

        if not spec.follow:
            if spec.replay:
                await self._replay(send, selector, after, delivery, begin)
            await begin()
            # No disconnect watcher here: cancelling hypercorn inside this final send
            # (it recycles or closes the connection there) would leave the
            # connection open for good.
            await send(end)
            return
        # Subscribe before reading the history: nothing published in between is
        # missed, and anything in both is skipped on the live side by sequence.
        async with (
            self.app.backend.subscribe(selector) as subscription,
            trio.open_nursery() as nursery,
        ):
            # A client that goes away ends the stream (and its subscription).
            nursery.start_soon(cancel_on_disconnect, receive, nursery.cancel_scope)
            seen = 0
            if spec.replay:
                seen = await self._replay(send, selector, after, delivery, begin)
            await begin()
            out = _BodyOut(send) if writer is None else _DirectOut(send, writer, self._shared)
            await self._follow(out, subscription, seen, spec)
            nursery.cancel_scope.cancel()
        if began:
            await send(end)

    async def _replay(
        self,
        send: Send,
        selector: Selector,
        after: tuple[int, int] | None,
        delivery: str,
        begin: Callable[[], Awaitable[None]],
    ) -> int:
        """Send the history page by page (``begin`` before the first); the last ``seq`` read.

        Each page is read and sent under the app's replay budget, so a replay holds
        at most one page, and all replays together at most ``replay_bytes``.
        """
        seen = 0
        pages = self.app.backend.replay(selector, self.app.config.replay_page_bytes)
        async with contextlib.aclosing(pages):
            while True:
                async with self._budget:
                    try:
                        with self.app.metrics.backend_call("snapshot"):
                            page = await anext(pages, None)
                    except BackendUnavailable:
                        raise
                    except Exception as exc:
                        _log.exception("the backend failed to read the history")
                        raise BackendUnavailable("the event store failed: try again later") from exc
                    if page is None:
                        return seen
                    await begin()
                    seen = page[-1].seq
                    await self._send_history(send, _after(page, after), delivery)
                    del page

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
            self.app.metrics.delivered(name, delivery, count)

    async def _follow(
        self, out: _BodyOut, subscription: Subscription, seen: int, spec: StreamSpec
    ) -> None:
        """Write live events until the backend ends the subscription or the app closes.

        The hot path of fan-out: per batch, one wake-up and one write.  The wait
        for events runs in a cancel scope (shutdown, and the keep-alive
        deadline), entered once per keep-alive period rather than per batch: its
        deadline is the last write plus ``keepalive``, re-armed only when it
        passes.  Writes inside the scope never wait (:meth:`_BodyOut.put`), so
        neither a stop nor a keep-alive deadline can cut a chunk in half; what
        the socket does not take at once is sent after the scope, waiting.
        """
        keepalive = self.app.config.keepalive or math.inf
        limit = _BATCH_LIMIT[spec.delivery]
        counter = self.app.metrics.deliveries(spec.name, spec.delivery.value)
        key = object()
        last = trio.current_time()  # the last write: keep-alive lines follow silence
        try:
            while not self.app.closing:
                rest, ended = b"", False
                with trio.CancelScope(deadline=last + keepalive) as wait:
                    self.app.waits[key] = wait
                    while not rest:
                        batch = await subscription.receive_batch(limit)
                        if not batch:
                            ended = True
                            break
                        if seen:
                            batch = [event for event in batch if event.seq > seen]
                            if not batch:
                                continue
                            seen = 0  # sequences only grow: later batches are all new
                        if len(batch) == 1:
                            rest = out.put(batch[0].line, shared=True)
                        else:
                            rest = out.put(b"".join([e.line for e in batch]))
                        counter.inc(len(batch))
                        last = trio.current_time()
                if ended:
                    self.app.metrics.slow_consumers.inc()
                    return
                if rest:
                    await out.flush(rest)
                elif wait.cancelled_caught:
                    if self.app.closing:
                        return
                    if trio.current_time() >= last + keepalive:
                        await out.flush(out.put(b"\n"))
                        last = trio.current_time()
                    # else events were written since the deadline was set: re-arm it
        finally:
            self.app.waits.pop(key, None)


class _BodyOut:
    """A following stream's body: :meth:`put` writes what goes out without waiting,
    :meth:`flush` the rest.  This one sends ASGI messages (any ASGI server); see
    :class:`_DirectOut` for the provider's own server."""

    __slots__ = ("_send",)

    def __init__(self, send: Send) -> None:
        self._send = send

    def put(self, body: bytes, *, shared: bool = False) -> bytes:
        """Write what can go out now; return the rest, for :meth:`flush`.

        ``shared``: the same ``body`` object goes to many streams (one event).
        """
        return body

    async def flush(self, rest: bytes) -> None:
        """Write what :meth:`put` left, waiting for the peer."""
        await self._send({"type": "http.response.body", "body": rest, "more_body": True})


class _SharedChunk:
    """The chunk of the last single-event body framed: the streams of one event,
    woken one after another, frame its line once and share the bytes."""

    __slots__ = ("body", "chunk")

    def __init__(self) -> None:
        self.body = b""
        self.chunk = chunk(b"")

    def of(self, body: bytes) -> bytes:
        if body is not self.body:
            self.chunk = chunk(body)
            self.body = body  # held, so that its id is not reused while cached
        return self.chunk


class _DirectOut(_BodyOut):
    """Body bytes straight to the socket, through the lean server's :class:`BodyWriter`."""

    __slots__ = ("_chunked", "_shared", "_writer")

    def __init__(self, send: Send, writer: BodyWriter, shared: _SharedChunk) -> None:
        super().__init__(send)
        self._writer = writer
        self._chunked = writer.chunked
        self._shared = shared

    def put(self, body: bytes, *, shared: bool = False) -> bytes:
        if self._chunked:
            body = self._shared.of(body) if shared else chunk(body)
        return self._writer.write_now(body)

    async def flush(self, rest: bytes) -> None:
        await self._writer.write(rest)


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
