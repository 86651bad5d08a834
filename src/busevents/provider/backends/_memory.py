"""The ``memory`` backend: history and fan-out inside one process, nothing durable.

Delivery rules (the provider's documented behaviour):

* **Broadcast** — each listener has its own buffer of at most ``listener_queue``
  events and ``listener_queue_bytes`` bytes of lines.  When a publish finds it
  full, the listener is a *slow consumer*: it is unsubscribed at once (its
  stream writes what it already holds, then ends) and a warning is logged.
  Publishers and other listeners never wait.
* **Unicast** — one buffer per ``(name, owner, group)``, shared by the group's
  consumers, which compete for events.  The group is created by its first
  consumer and then outlives its consumers, buffering (within the same two
  bounds) while none is connected, so a worker that reconnects does not lose
  work.  When the buffer is full, new events for that group are dropped and
  counted (:attr:`MemoryStats.dropped`).  Delivery is at most once: an event
  handed to a consumer whose connection breaks at that moment is lost.
* **Group bounds** — at most ``max_groups`` groups in all and
  ``max_groups_per_identity`` per owner (service tokens count as one owner); a
  stream that would create one more is refused (:class:`BackendLimit`).  A group
  without consumers for ``group_idle`` seconds is freed with its buffer.
* **History** — the newest events of the whole backend, for replay: at most
  ``history_limit`` events and ``history_bytes`` bytes of lines; the oldest go
  first.  A replay returns exactly the retained events that match, in order.

Buffers hold references to the one encoded line of each event, so the byte
bounds are upper bounds per buffer, not copies: the process holds each line once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import trio

from busevents import Delivery

from .._hub import Buffer, Fanout
from .._idempotency import KeyMap, Replayed, accepted_body
from .._names import compile_pattern
from ._base import (
    Draft,
    IdClock,
    Selector,
    StoredEvent,
    Subscription,
    encode_envelope,
    pages,
    too_many_groups,
)

__all__ = ["MemoryBackend", "MemoryStats"]

_log = logging.getLogger("busevents.provider")

_Owner = str | None
#: How often (seconds, at most) a publish looks for idle unicast groups to free.
_SWEEP_EVERY = 1.0


@dataclass(slots=True)
class MemoryStats:
    """Counters of a :class:`MemoryBackend`, for logs and tests."""

    published: int = 0
    #: Broadcast listeners disconnected because their buffer was full.
    slow_disconnects: int = 0
    #: Unicast events dropped because their group's buffer was full.
    dropped: int = 0
    #: Unicast groups freed after ``group_idle`` seconds without a consumer.
    groups_expired: int = 0


def _always(_name: str) -> bool:
    return True


class _Group:
    """One unicast group's shared buffer."""

    __slots__ = (
        "buffer",
        "consumers",
        "dropped",
        "idle_since",
        "matches",
        "overflowing",
        "selector",
    )

    def __init__(self, selector: Selector, count: int, size: int) -> None:
        self.selector = selector
        self.buffer = Buffer(count, size)
        self.matches = compile_pattern(selector.name) if selector.pattern else _always
        self.consumers = 0
        self.dropped = 0
        self.overflowing = False
        self.idle_since = trio.current_time()


class MemoryBackend:
    """In-process backend: see the module docstring for its delivery rules and bounds.

    ``listener_queue`` / ``listener_queue_bytes`` bound each broadcast listener
    and each unicast group; ``history_limit`` / ``history_bytes`` bound the events
    kept for replay; ``max_groups`` / ``max_groups_per_identity`` /
    ``group_idle`` bound the unicast groups.
    """

    def __init__(
        self,
        *,
        listener_queue: int = 10_000,
        history_limit: int = 100_000,
        listener_queue_bytes: int = 8 << 20,
        history_bytes: int = 64 << 20,
        max_groups: int = 1_000,
        max_groups_per_identity: int = 20,
        group_idle: float = 600.0,
        idempotency_window: float = 24 * 3600.0,
        idempotency_keys: int = 100_000,
    ) -> None:
        self.stats = MemoryStats()
        self._keys = KeyMap(idempotency_window, idempotency_keys)
        self._queue = listener_queue
        self._queue_bytes = listener_queue_bytes
        self._history_limit = history_limit
        self._history_bytes_limit = history_bytes
        self._max_groups = max_groups
        self._max_groups_per_owner = max_groups_per_identity
        self._group_idle = group_idle
        self._clock = IdClock()
        self._seq = 0
        self._history: deque[StoredEvent] = deque()
        self._history_bytes = 0
        self._by_name: dict[str, deque[StoredEvent]] = {}
        self._fanout = Fanout(listener_queue, listener_queue_bytes, self._count_cut)
        # name -> owner filter (None: every owner) -> groups
        self._groups: dict[str, dict[_Owner, list[_Group]]] = {}
        self._pattern_groups: list[_Group] = []
        self._group_index: dict[tuple[str, bool, _Owner, str], _Group] = {}
        self._groups_per_owner: dict[_Owner, int] = {}
        self._next_sweep = 0.0

    def _count_cut(self) -> None:
        self.stats.slow_disconnects += 1

    # -- lifecycle -----------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Nothing to connect: the memory backend is ready at once."""
        yield

    async def ping(self) -> None:
        """Always answers: the memory backend lives in this process."""
        await trio.lowlevel.checkpoint()

    # -- publish -------------------------------------------------------------

    async def publish(self, draft: Draft, idempotency_key: str | None = None) -> StoredEvent:
        """Store ``draft`` and hand it to every matching subscription without waiting.

        Raises :class:`Replayed` (storing nothing) for a key seen within the window.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if idempotency_key is not None:
            seen = self._keys.get(draft.identity_id, idempotency_key)
            if seen is not None:
                raise Replayed(seen)
        event_id, stamp = self._clock.next()
        self._seq += 1
        event = StoredEvent(
            self._seq,
            event_id,
            draft.name,
            draft.identity_id,
            stamp,
            encode_envelope(draft, event_id, stamp),
        )
        self.stats.published += 1
        if idempotency_key is not None:
            body = accepted_body(event_id, draft.name, draft.correlation_id, stamp)
            self._keys.put(draft.identity_id, idempotency_key, body)
        self._remember(event)
        self._fan_out(event)
        if self._group_index and trio.current_time() >= self._next_sweep:
            self._expire_groups()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return event

    def _remember(self, event: StoredEvent) -> None:
        if self._history_limit == 0 or len(event.line) > self._history_bytes_limit:
            return
        self._history.append(event)
        self._history_bytes += len(event.line)
        named = self._by_name.get(event.name)
        if named is None:
            named = self._by_name[event.name] = deque()
        named.append(event)
        while (
            len(self._history) > self._history_limit
            or self._history_bytes > self._history_bytes_limit
        ):
            oldest = self._history.popleft()
            self._history_bytes -= len(oldest.line)
            # Per-name order follows global order, so the oldest is first there too.
            bucket = self._by_name[oldest.name]
            bucket.popleft()
            if not bucket:
                del self._by_name[oldest.name]

    def _fan_out(self, event: StoredEvent) -> None:
        self._fanout.offer(event)
        groups_by_owner = self._groups.get(event.name)
        if groups_by_owner:
            for owner in (event.identity_id, None):
                for group in groups_by_owner.get(owner, ()):
                    self._offer_group(group, event)
        for group in self._pattern_groups:
            owner = group.selector.identity
            if (owner is None or owner == event.identity_id) and group.matches(event.name):
                self._offer_group(group, event)

    def _offer_group(self, group: _Group, event: StoredEvent) -> None:
        if group.buffer.offer(event):
            group.overflowing = False
            return
        group.dropped += 1
        self.stats.dropped += 1
        if not group.overflowing:
            group.overflowing = True
            sel = group.selector
            _log.warning(
                "unicast group %r of %r is full (%d events, %d bytes): dropping new events",
                sel.group,
                sel.name,
                len(group.buffer.events),
                group.buffer.bytes,
            )

    # -- subscribe -----------------------------------------------------------

    def subscribe(self, selector: Selector) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe for live events matching ``selector`` (see the module rules).

        Raises :class:`BackendLimit` when a new unicast group would exceed a bound.
        """
        if selector.delivery is Delivery.UNICAST:
            return self._subscribe_unicast(selector)
        return self._fanout.listening(selector)

    @asynccontextmanager
    async def _subscribe_unicast(self, selector: Selector) -> AsyncIterator[Subscription]:
        key = (selector.name, selector.pattern, selector.identity, selector.group)
        group = self._group_index.get(key)
        if group is None:
            group = self._create_group(key, selector)
        group.consumers += 1
        try:
            yield group.buffer
        finally:
            group.consumers -= 1
            if group.consumers == 0:
                group.idle_since = trio.current_time()

    def _create_group(self, key: tuple[str, bool, _Owner, str], selector: Selector) -> _Group:
        self._expire_groups()
        owner = selector.identity
        if len(self._group_index) >= self._max_groups:
            raise too_many_groups(self._max_groups, per_identity=False)
        if self._groups_per_owner.get(owner, 0) >= self._max_groups_per_owner:
            raise too_many_groups(self._max_groups_per_owner, per_identity=True)
        group = self._group_index[key] = _Group(selector, self._queue, self._queue_bytes)
        self._groups_per_owner[owner] = self._groups_per_owner.get(owner, 0) + 1
        if selector.pattern:
            self._pattern_groups.append(group)
        else:
            by_owner = self._groups.setdefault(selector.name, {})
            by_owner.setdefault(owner, []).append(group)
        return group

    def _expire_groups(self) -> None:
        """Free every group that has had no consumer for ``group_idle`` seconds."""
        now = trio.current_time()
        self._next_sweep = now + min(_SWEEP_EVERY, self._group_idle)
        deadline = now - self._group_idle
        idle = [
            (key, group)
            for key, group in self._group_index.items()
            if group.consumers == 0 and group.idle_since <= deadline
        ]
        for key, group in idle:
            del self._group_index[key]
            owner = group.selector.identity
            left = self._groups_per_owner[owner] - 1
            if left:
                self._groups_per_owner[owner] = left
            else:
                del self._groups_per_owner[owner]
            if group.selector.pattern:
                self._pattern_groups.remove(group)
            else:
                by_owner = self._groups[group.selector.name]
                groups = by_owner[owner]
                groups.remove(group)
                if not groups:
                    del by_owner[owner]
                    if not by_owner:
                        del self._groups[group.selector.name]
            group.buffer.close()
            group.buffer.clear()
            self.stats.groups_expired += 1

    # -- replay --------------------------------------------------------------

    async def snapshot(self, selector: Selector) -> list[StoredEvent]:
        """Retained events matching ``selector``'s name and owner, oldest first."""
        await trio.lowlevel.checkpoint()
        owner = selector.identity
        if selector.pattern:
            matches = compile_pattern(selector.name)
            source: deque[StoredEvent] | tuple[()] = self._history
        else:
            matches = _always
            source = self._by_name.get(selector.name, ())
        return [
            event
            for event in source
            if (owner is None or event.identity_id == owner) and matches(event.name)
        ]

    async def replay(
        self, selector: Selector, page_bytes: int
    ) -> AsyncGenerator[list[StoredEvent], None]:
        """The snapshot in pages of at most ``page_bytes`` (or one event); lines are shared."""
        for page in pages(await self.snapshot(selector), page_bytes):
            yield page

    # -- introspection -------------------------------------------------------

    def subscriber_count(self, name: str) -> int:
        """Connected broadcast listeners plus unicast consumers for exactly ``name``."""
        listeners = self._fanout.count(name)
        consumers = sum(
            group.consumers for groups in self._groups.get(name, {}).values() for group in groups
        )
        return listeners + consumers

    def group_count(self) -> int:
        """Unicast groups currently held (with or without consumers)."""
        return len(self._group_index)
