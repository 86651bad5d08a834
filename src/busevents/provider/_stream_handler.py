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
            await self._follow(send, subscription, seen, spec)
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
        self, send: Send, subscription: Subscription, seen: int, spec: StreamSpec
    ) -> None:
        """Write live events until the backend ends the subscription or the app closes."""
        keepalive = self.app.config.keepalive or math.inf
        limit = _BATCH_LIMIT[spec.delivery]
        delivery = spec.delivery.value
        key = object()
        metrics = self.app.metrics
        try:
            while not self.app.closing:
                batch: list[StoredEvent] | None = None
                with trio.move_on_after(keepalive) as wait:
                    self.app.waits[key] = wait
                    batch = await subscription.receive_batch(limit)
                if batch is None:
                    if self.app.closing:
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
            self.app.waits.pop(key, None)


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
