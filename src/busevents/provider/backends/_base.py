"""The backend interface of the provider, and what every backend shares.

A backend stores accepted events (for replay) and fans them out to
subscriptions.  The HTTP layer only talks to the :class:`Backend` protocol, so
a durable backend (Redis Streams, PostgreSQL) can replace the in-memory one
without changing the public behaviour.  Each envelope is encoded to bytes once,
at publish time (:func:`encode_envelope`); listeners write those bytes as they are.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

import msgspec

from busevents import Delivery

__all__ = [
    "Backend",
    "BackendLimit",
    "BackendUnavailable",
    "Draft",
    "IdClock",
    "Selector",
    "StoredEvent",
    "Subscription",
    "encode_envelope",
    "encode_envelope_tail",
    "PageSize",
    "pages",
    "splice_id",
    "too_many_groups",
]


class _Envelope(
    msgspec.Struct,
    kw_only=True,
    omit_defaults=True,
    gc=False,
    rename={"correlation_id": "correlationId"},
):
    # Field order is the wire order of spec §1; payload is always present.
    id: str
    name: str
    correlation_id: str | None = None
    payload: msgspec.Raw
    identity_id: str
    metadata: dict[str, str] | None = None
    time: str


_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Draft:
    """An event accepted by the HTTP layer, before the backend assigns id and time."""

    name: str
    payload: msgspec.Raw
    identity_id: str
    correlation_id: str | None = None
    metadata: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as stored and delivered: ``line`` is the NDJSON line, ``\\n`` included."""

    #: Backend-wide sequence number; strictly increasing in publish order.
    seq: int
    id: str
    name: str
    identity_id: str
    time: str
    line: bytes


@dataclass(frozen=True, slots=True)
class Selector:
    """What a stream subscribes to.

    ``name`` may be a wildcard pattern when ``pattern`` is true.  ``identity``
    restricts delivery to events of that owner (``None``: all owners, for
    service tokens).  ``group`` applies to unicast only.
    """

    name: str
    identity: str | None
    delivery: Delivery = Delivery.BROADCAST
    group: str = "default"
    consumer: str = "default"
    pattern: bool = False


class BackendUnavailable(Exception):
    """The backend cannot be reached (or answered an error); the request may be retried.

    The message names the backend and its address, never a password.  The HTTP
    layer answers ``503 backend_unavailable`` (publish, stream not yet open) or
    ends an open stream without its final chunk, so the client reconnects.
    """


class BackendLimit(Exception):
    """A subscription would exceed a bound of the backend (e.g. too many unicast groups).

    The HTTP layer answers ``429``; the message says which bound and how to proceed.
    """


def too_many_groups(limit: int, *, per_identity: bool) -> BackendLimit:
    """The refusal of a unicast group beyond ``--max-groups`` (or the per-identity bound)."""
    holder = "this identity" if per_identity else "the provider"
    return BackendLimit(
        f"{holder} holds its maximum of {limit} unicast groups: reuse an existing group "
        "name, or wait for idle groups to expire"
    )


class Subscription(Protocol):
    """A live subscription; iterate with :meth:`receive_batch`."""

    async def receive_batch(self, limit: int) -> list[StoredEvent]:
        """Wait for at least one event, then return up to ``limit`` already waiting.

        An empty list means the backend ended the subscription (for example a
        slow broadcast listener); no more events will come.
        """
        ...


class Backend(Protocol):
    """Storage and fan-out of events; one instance per provider app."""

    async def publish(self, draft: Draft, idempotency_key: str | None = None) -> StoredEvent:
        """Assign id and time, store the event for replay and deliver it to subscriptions.

        With ``idempotency_key``, the key is stored with the event atomically; a key
        of the same identity seen within the window stores nothing and raises
        ``provider._idempotency.Replayed`` with the original acceptance body.
        """
        ...

    def subscribe(self, selector: Selector) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe for live events; leaving the context unsubscribes."""
        ...

    def replay(
        self, selector: Selector, page_bytes: int
    ) -> AsyncGenerator[list[StoredEvent], None]:
        """The stored events matching ``selector``, oldest first, in pages.

        A page holds at most ``page_bytes`` bytes of lines (or one bigger event);
        the next page is read only when the caller asks for it, so a replay holds
        one page at a time however long the history.
        """
        ...

    async def ping(self) -> None:
        """Return when the backend answers; raise :class:`BackendUnavailable` otherwise.

        The provider's ``/readyz`` probe calls it, under its own time limit.
        """
        ...

    def running(self) -> AbstractAsyncContextManager[None]:
        """Connect (and run background tasks) for the app's lifetime.

        Entered once by the app's ASGI lifespan startup; raises
        :class:`BackendUnavailable` when the backend cannot be reached.
        """
        ...


class IdClock:
    """Event ids in Redis-stream form, ``"<unix-ms>-<seq>"``, with RFC 3339 times.

    Ids are unique and strictly increasing when compared as ``(ms, seq)``
    integer pairs: ``seq`` counts events within one millisecond, and ``ms``
    never goes backwards even if the wall clock does.
    """

    __slots__ = ("_last_ms", "_second", "_second_text", "_seq")

    def __init__(self) -> None:
        self._last_ms = -1
        self._seq = 0
        self._second = -1
        self._second_text = ""

    def next(self) -> tuple[str, str]:
        """A fresh ``(id, time)`` pair; time is UTC with microseconds and ``Z``."""
        now_ns = time.time_ns()
        ms = now_ns // 1_000_000
        if ms > self._last_ms:
            self._last_ms = ms
            self._seq = 0
        else:
            self._seq += 1
        seconds, rest_ns = divmod(now_ns, 1_000_000_000)
        if seconds != self._second:  # the calendar part, formatted once a second
            t = time.gmtime(seconds)
            self._second = seconds
            self._second_text = (
                f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
                f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
            )
        return f"{self._last_ms}-{self._seq}", f"{self._second_text}.{rest_ns // 1000:06d}Z"


def encode_envelope(draft: Draft, event_id: str, stamp: str) -> bytes:
    """The NDJSON line of an event: its envelope encoded once, plus ``\\n``."""
    envelope = _Envelope(
        id=event_id,
        name=draft.name,
        correlation_id=draft.correlation_id,
        payload=draft.payload,
        identity_id=draft.identity_id,
        metadata=draft.metadata,
        time=stamp,
    )
    return _encode(envelope) + b"\n"


#: ``{"id":"",`` — what :func:`encode_envelope_tail` cuts off an envelope with an empty id.
_EMPTY_ID_HEAD = b'{"id":"",'


def encode_envelope_tail(draft: Draft, stamp: str) -> bytes:
    """The envelope line without its id: what a durable backend stores.

    Backends whose store assigns the id (a Redis stream entry id, a PostgreSQL
    sequence) keep this tail and rebuild the line with :func:`splice_id`, so
    the id in the line is always the store's.
    """
    line = encode_envelope(draft, "", stamp)
    return line[len(_EMPTY_ID_HEAD) :]


def splice_id(event_id: str, tail: bytes) -> bytes:
    """The full NDJSON line from an id and the tail made by :func:`encode_envelope_tail`."""
    return b'{"id":"' + event_id.encode("ascii") + b'",' + tail


def pages(events: Iterable[StoredEvent], page_bytes: int) -> Iterator[list[StoredEvent]]:
    """``events`` cut into lists of at most ``page_bytes`` bytes of lines (or one event)."""
    page: list[StoredEvent] = []
    size = 0
    for event in events:
        if page and size + len(event.line) > page_bytes:
            yield page
            page, size = [], 0
        page.append(event)
        size += len(event.line)
    if page:
        yield page


class PageSize:
    """How many events to ask a store for, so that one read holds about ``budget`` bytes.

    Starts at ``first`` and then follows the mean size of the events seen, within
    ``1 … most``: a read of big events asks for few, one of small events for many.
    """

    __slots__ = ("_bytes", "_events", "_first", "budget", "most")

    def __init__(self, budget: int, most: int, first: int = 1) -> None:
        self.budget = budget
        self.most = most
        self._first = first
        self._bytes = 0
        self._events = 0

    def count(self) -> int:
        if not self._events:
            return self._first
        return max(1, min(self.most, self.budget * self._events // max(self._bytes, 1)))

    def saw(self, events: list[StoredEvent]) -> None:
        self._events += len(events)
        self._bytes += sum(len(event.line) for event in events)
