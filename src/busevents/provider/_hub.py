"""The subscription hub of one provider process: one reader per name, fan-out in process.

Every backend delivers live events through the same two pieces:

* :class:`Fanout` — the broadcast listeners of this process, indexed by name and
  owner.  :meth:`Fanout.offer` hands one event (its one encoded line, shared) to
  every matching listener's :class:`Buffer`, bounded in events and bytes; a
  listener whose buffer is full is a *slow consumer* and is cut at once.
* :class:`Feeds` — for the durable backends: one reader task per followed name,
  shared by every local stream of that name (and by the unicast groups of that
  name, which it wakes).  A stream therefore costs memory here, never a Redis or
  PostgreSQL connection; the reader stops when the name's last user leaves.

The memory backend calls :meth:`Fanout.offer` from ``publish``; the durable
ones call it from their name readers.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import trio

from busevents import Delivery

from ._names import compile_pattern
from .backends._base import BackendUnavailable, Selector, StoredEvent, Subscription

__all__ = [
    "Buffer",
    "FeedSource",
    "Feeds",
    "Fanout",
    "GroupSource",
    "Groups",
    "HubSubscriptions",
    "Listener",
]

_log = logging.getLogger("busevents.provider")

_Owner = str | None


def _always(_name: str) -> bool:
    return True


class Buffer:
    """A FIFO of events bounded in count and bytes; one reader side, closable."""

    __slots__ = (
        "_lot",
        "bytes",
        "closed",
        "demand",
        "error",
        "events",
        "max_bytes",
        "max_count",
    )

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.events: deque[StoredEvent] = deque()
        self.bytes = 0
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.closed = False
        self.error: BackendUnavailable | None = None
        #: Set when a reader finds the buffer empty (a group's claimer waits on it).
        self.demand: trio.Event | None = None
        self._lot = trio.lowlevel.ParkingLot()

    def offer(self, event: StoredEvent) -> bool:
        """Append ``event`` unless that would exceed a bound; ``False`` when full."""
        size = len(event.line)
        if len(self.events) >= self.max_count or self.bytes + size > self.max_bytes:
            return False
        self.events.append(event)
        self.bytes += size
        if self._lot:
            self._lot.unpark_all()
        return True

    def close(self, error: BackendUnavailable | None = None) -> None:
        """No more events: a waiting reader gets what is held, then ``[]`` (or ``error``)."""
        self.closed = True
        self.error = error
        self._lot.unpark_all()
        if self.demand is not None:
            self.demand.set()

    def clear(self) -> None:
        self.events.clear()
        self.bytes = 0

    async def receive_batch(self, limit: int) -> list[StoredEvent]:
        """Wait for an event, then take up to ``limit`` at once (``[]``: closed).

        One checkpoint per call, never two: a reader woken by :meth:`offer` has
        checkpointed in its wait and takes its batch at once.  With a hundred
        listeners per event, the extra trip through the scheduler was a third of
        each delivery's cost.  Cancellation can only hit before the batch is
        taken, so no event is lost to it.
        """
        if self.events or self.closed:
            await trio.lowlevel.checkpoint()  # nothing to wait for, still a checkpoint
        while not self.events:
            if self.closed:
                if self.error is not None:
                    raise self.error
                return []
            if self.demand is not None:
                self.demand.set()
            await self._lot.park()
        # Take the batch before the next schedule point: competing consumers of a
        # group share this buffer, and a batch taken is never given back.
        batch: list[StoredEvent] = []
        while self.events and len(batch) < limit:
            event = self.events.popleft()
            self.bytes -= len(event.line)
            batch.append(event)
        return batch


class Listener:
    """One broadcast stream: what it selects and its buffer."""

    __slots__ = ("buffer", "matches", "selector")

    def __init__(self, selector: Selector, count: int, size: int) -> None:
        self.selector = selector
        self.buffer = Buffer(count, size)
        self.matches = compile_pattern(selector.name) if selector.pattern else _always


class Fanout:
    """The broadcast listeners of one process; see the module docstring.

    ``count`` / ``size`` bound each listener's buffer (events, bytes).
    """

    def __init__(self, count: int, size: int, on_cut: Callable[[], None] | None = None) -> None:
        self._count = count
        self._size = size
        self._on_cut = on_cut
        # name -> owner filter (None: every owner) -> listeners
        self._listeners: dict[str, dict[_Owner, set[Listener]]] = {}
        self._patterns: set[Listener] = set()
        #: Listeners cut because their buffer was full.
        self.slow_disconnects = 0

    def add(self, selector: Selector) -> Listener:
        listener = Listener(selector, self._count, self._size)
        if selector.pattern:
            self._patterns.add(listener)
        else:
            by_owner = self._listeners.setdefault(selector.name, {})
            by_owner.setdefault(selector.identity, set()).add(listener)
        return listener

    def remove(self, listener: Listener) -> None:
        sel = listener.selector
        if sel.pattern:
            self._patterns.discard(listener)
            return
        by_owner = self._listeners.get(sel.name)
        listeners = by_owner.get(sel.identity) if by_owner else None
        if by_owner is None or listeners is None:
            return
        listeners.discard(listener)
        if not listeners:
            del by_owner[sel.identity]
            if not by_owner:
                del self._listeners[sel.name]

    @asynccontextmanager
    async def listening(self, selector: Selector) -> AsyncIterator[Buffer]:
        """Be a listener for the block's duration; yields its buffer."""
        listener = self.add(selector)
        try:
            yield listener.buffer
        finally:
            self.remove(listener)
            listener.buffer.close()
            listener.buffer.clear()

    def count(self, name: str) -> int:
        """Listeners of exactly ``name``."""
        return sum(len(s) for s in self._listeners.get(name, {}).values())

    def offer(self, event: StoredEvent) -> None:
        """Hand ``event`` to every matching listener; cut those whose buffer is full."""
        by_owner = self._listeners.get(event.name)
        if by_owner:
            for owner in (event.identity_id, None):
                listeners = by_owner.get(owner)
                if listeners:
                    self._offer_all(listeners, event, filtered=False)
        if self._patterns:
            self._offer_all(self._patterns, event, filtered=True)

    def fail(self, name: str, error: BackendUnavailable) -> None:
        """End every listener of ``name`` with ``error`` (their reader failed)."""
        for listeners in list(self._listeners.get(name, {}).values()):
            for listener in list(listeners):
                self.remove(listener)
                listener.buffer.close(error)

    def _offer_all(self, listeners: set[Listener], event: StoredEvent, *, filtered: bool) -> None:
        # ``filtered``: the set is not indexed by name and owner, so check both here.
        slow: list[Listener] = []
        for listener in listeners:
            if filtered:
                owner = listener.selector.identity
                if owner is not None and owner != event.identity_id:
                    continue
                if not listener.matches(event.name):
                    continue
            if not listener.buffer.offer(event):
                slow.append(listener)
        for listener in slow:
            self._cut(listener)

    def _cut(self, listener: Listener) -> None:
        self.remove(listener)
        listener.buffer.close()
        self.slow_disconnects += 1
        if self._on_cut is not None:
            self._on_cut()
        sel = listener.selector
        _log.warning(
            "slow consumer: broadcast listener %r on %r disconnected "
            "(buffer full: %d events, %d bytes)",
            sel.consumer,
            sel.name,
            len(listener.buffer.events),
            listener.buffer.bytes,
        )


class FeedSource(Protocol):
    """How a durable backend reads one name for :class:`Feeds`."""

    async def end(self, name: str) -> Any:
        """The position of the name's newest stored event (what a new reader starts after)."""
        ...

    async def read(self, name: str, position: Any) -> tuple[list[StoredEvent], Any]:
        """Events after ``position`` and the new position; may wait about a second for some.

        Raises :class:`BackendUnavailable` when the store cannot be read.
        """
        ...


class _Feed:
    __slots__ = ("error", "name", "ready", "scope", "tick", "users")

    def __init__(self, name: str) -> None:
        self.name = name
        self.users = 0
        self.ready = trio.Event()
        self.error: BackendUnavailable | None = None
        self.scope = trio.CancelScope()
        #: Set (and replaced) whenever the reader found new events: unicast groups wait on it.
        self.tick = trio.Event()


class Feeds:
    """One reader task per followed name; see the module docstring."""

    def __init__(self, fanout: Fanout, source: FeedSource) -> None:
        self.fanout = fanout
        self._source = source
        self._feeds: dict[str, _Feed] = {}
        self._nursery: trio.Nursery | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the name readers for the block's duration."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    def readers(self) -> int:
        """Name readers running now."""
        return len(self._feeds)

    @asynccontextmanager
    async def following(self, name: str) -> AsyncIterator[_Feed]:
        """Keep a reader on ``name`` for the block; it has started when the block begins.

        Raises :class:`BackendUnavailable` when the reader cannot start.
        """
        feed = self._feeds.get(name)
        if feed is None:
            if self._nursery is None:
                raise BackendUnavailable("the provider is not running")
            feed = self._feeds[name] = _Feed(name)
            self._nursery.start_soon(self._run, feed)
        feed.users += 1
        try:
            await feed.ready.wait()
            if feed.error is not None:
                raise feed.error
            yield feed
        finally:
            feed.users -= 1
            if feed.users == 0:
                feed.scope.cancel()
                if self._feeds.get(name) is feed:
                    del self._feeds[name]

    @asynccontextmanager
    async def listening(self, selector: Selector) -> AsyncIterator[Buffer]:
        """A broadcast stream of one name: a listener fed by the name's shared reader."""
        async with self.following(selector.name), self.fanout.listening(selector) as buffer:
            yield buffer

    async def _run(self, feed: _Feed) -> None:
        with feed.scope:
            try:
                position = await self._source.end(feed.name)
            except BackendUnavailable as exc:
                feed.error = exc
                feed.ready.set()
                self._drop(feed)
                return
            feed.ready.set()
            while True:
                try:
                    events, position = await self._source.read(feed.name, position)
                except BackendUnavailable as exc:
                    # Followers end with the error (their clients reconnect); the
                    # next stream of this name starts a fresh reader.
                    self._drop(feed)
                    self.fanout.fail(feed.name, exc)
                    feed.error = exc
                    feed.tick.set()
                    return
                if events:
                    offer = self.fanout.offer
                    for event in events:
                        offer(event)
                    tick, feed.tick = feed.tick, trio.Event()
                    tick.set()

    def _drop(self, feed: _Feed) -> None:
        if self._feeds.get(feed.name) is feed:
            del self._feeds[feed.name]


class GroupSource(Protocol):
    """How a durable backend hands a unicast group's next events to one process."""

    async def claim(self, selector: Selector, limit: int) -> list[StoredEvent]:
        """Take up to ``limit`` events for the group (never waiting); ``[]`` when none.

        Events taken are this process's to deliver (at most once).
        """
        ...


class _Group:
    __slots__ = ("buffer", "consumers", "selector")

    def __init__(self, selector: Selector, count: int, size: int) -> None:
        self.selector = selector
        self.buffer = Buffer(count, size)
        self.consumers = 0


#: Events one claim takes for a group: small, so that an idle peer elsewhere gets work.
CLAIM_LIMIT = 16


class Groups:
    """The unicast groups this process has consumers of, for a durable backend.

    One claimer task per group: whenever the local buffer is empty it claims the
    group's next events from the store and hands them to the local consumers,
    who compete for them; with nothing to claim, it waits for the name's reader
    to see new events (or ``poll`` seconds).  Keyed by ``(name, owner, group)``.
    """

    def __init__(self, feeds: Feeds, source: GroupSource, poll: float) -> None:
        self._feeds = feeds
        self._source = source
        self._poll = poll
        self._groups: dict[tuple[str, _Owner, str], _Group] = {}

    def active(self) -> list[Selector]:
        """The groups with consumers in this process now."""
        return [group.selector for group in self._groups.values()]

    @asynccontextmanager
    async def consuming(self, selector: Selector) -> AsyncIterator[Buffer]:
        """Be a consumer of the group for the block; yields the buffer shared locally."""
        key = (selector.name, selector.identity, selector.group)
        async with self._feeds.following(selector.name) as feed:
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(selector, 1 << 30, 1 << 62)
                nursery = self._feeds._nursery
                assert nursery is not None
                nursery.start_soon(self._claim, key, group, feed)
            group.consumers += 1
            try:
                yield group.buffer
            finally:
                group.consumers -= 1
                if group.consumers == 0:
                    # What was claimed and not delivered is lost: at most once.
                    group.buffer.close()
                    if self._groups.get(key) is group:
                        del self._groups[key]

    async def _claim(self, key: tuple[str, _Owner, str], group: _Group, feed: _Feed) -> None:
        buffer = group.buffer
        while not buffer.closed:
            if buffer.events:
                demand = buffer.demand = trio.Event()
                await demand.wait()
                continue
            tick = feed.tick
            try:
                events = await self._source.claim(group.selector, CLAIM_LIMIT)
                if not events:
                    with trio.move_on_after(self._poll):
                        await tick.wait()
                    if feed.error is not None:
                        raise feed.error
            except BackendUnavailable as exc:
                buffer.close(exc)
                if self._groups.get(key) is group:
                    del self._groups[key]
                return
            if buffer.closed:
                return
            for event in events:
                buffer.offer(event)


class HubSubscriptions:
    """``subscribe`` of a durable backend: streams follow through this process's hub.

    A broadcast listener joins the name's feed; a unicast consumer first opens its
    group in the shared store (:meth:`_open_group`, which enforces the bounds), then
    consumes through the group's local claimer.
    """

    _feeds: Feeds
    _groups: Groups

    def subscribe(self, selector: Selector) -> AbstractAsyncContextManager[Subscription]:
        """Follow the name through this process's hub: a listener, or a group's consumer.

        Raises :class:`BackendLimit` when a new unicast group would exceed a bound.
        """
        if selector.delivery is Delivery.UNICAST:
            return self._consume(selector)
        return self._feeds.listening(selector)

    @asynccontextmanager
    async def _consume(self, selector: Selector) -> AsyncIterator[Subscription]:
        await self._open_group(selector)
        async with self._groups.consuming(selector) as buffer:
            yield buffer

    async def _open_group(self, selector: Selector) -> None:
        raise NotImplementedError
