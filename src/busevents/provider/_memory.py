"""The ``memory`` backend: history and fan-out inside one process, nothing durable.

Delivery rules (the provider's documented behaviour):

* **Broadcast** — each listener has its own buffer of ``listener_queue``
  events.  When a publish finds it full, the listener is a *slow consumer*: it
  is unsubscribed at once (its stream writes what it already holds, then ends)
  and a warning is logged.  Publishers and other listeners never wait.
* **Unicast** — one buffer per ``(name, owner, group)``, shared by the group's
  consumers, which compete for events.  The group is created by its first
  consumer and then outlives its consumers, buffering up to ``listener_queue``
  events while none is connected, so a worker that reconnects does not lose
  work.  When the buffer is full, new events for that group are dropped and
  counted (:attr:`MemoryStats.dropped`).  Delivery is at most once: an event
  handed to a consumer whose connection breaks at that moment is lost.
* **History** — the last ``history_limit`` events of the whole backend, for replay.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import trio

from busevents import Delivery

from ._backend import Draft, IdClock, Selector, StoredEvent, Subscription, encode_envelope
from ._names import compile_pattern

__all__ = ["MemoryBackend", "MemoryStats"]

_log = logging.getLogger("busevents.provider")

_Owner = str | None


@dataclass(slots=True)
class MemoryStats:
    """Counters of a :class:`MemoryBackend`, for logs and tests."""

    published: int = 0
    #: Broadcast listeners disconnected because their buffer was full.
    slow_disconnects: int = 0
    #: Unicast events dropped because their group's buffer was full.
    dropped: int = 0


def _always(_name: str) -> bool:
    return True


class _Listener:
    """One broadcast stream's buffer."""

    __slots__ = ("matches", "receive", "selector", "send")

    def __init__(self, selector: Selector, size: int) -> None:
        self.selector = selector
        self.send, self.receive = trio.open_memory_channel[StoredEvent](size)
        self.matches = compile_pattern(selector.name) if selector.pattern else _always


class _Group:
    """One unicast group's shared buffer."""

    __slots__ = ("consumers", "dropped", "matches", "overflowing", "receive", "selector", "send")

    def __init__(self, selector: Selector, size: int) -> None:
        self.selector = selector
        self.send, self.receive = trio.open_memory_channel[StoredEvent](size)
        self.matches = compile_pattern(selector.name) if selector.pattern else _always
        self.consumers = 0
        self.dropped = 0
        self.overflowing = False


async def _receive_batch(
    receive: trio.MemoryReceiveChannel[StoredEvent], limit: int
) -> list[StoredEvent]:
    try:
        batch = [await receive.receive()]
    except (trio.EndOfChannel, trio.ClosedResourceError):
        return []
    while len(batch) < limit:
        try:
            batch.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    return batch


class _ListenerSubscription:
    __slots__ = ("_receive",)

    def __init__(self, receive: trio.MemoryReceiveChannel[StoredEvent]) -> None:
        self._receive = receive

    async def receive_batch(self, limit: int) -> list[StoredEvent]:
        return await _receive_batch(self._receive, limit)


class MemoryBackend:
    """In-process backend: see the module docstring for its delivery rules.

    ``listener_queue`` bounds each broadcast listener and each unicast group;
    ``history_limit`` bounds the events kept for replay.
    """

    def __init__(self, *, listener_queue: int = 10_000, history_limit: int = 100_000) -> None:
        self.stats = MemoryStats()
        self._queue = listener_queue
        self._history_limit = history_limit
        self._clock = IdClock()
        self._seq = 0
        self._history: deque[StoredEvent] = deque()
        self._by_name: dict[str, deque[StoredEvent]] = {}
        # name -> owner filter (None: every owner) -> listeners / groups
        self._listeners: dict[str, dict[_Owner, set[_Listener]]] = {}
        self._groups: dict[str, dict[_Owner, list[_Group]]] = {}
        self._pattern_listeners: set[_Listener] = set()
        self._pattern_groups: list[_Group] = []
        self._group_index: dict[tuple[str, bool, _Owner, str], _Group] = {}

    # -- publish -------------------------------------------------------------

    async def publish(self, draft: Draft) -> StoredEvent:
        """Store ``draft`` and hand it to every matching subscription without waiting."""
        await trio.lowlevel.checkpoint_if_cancelled()
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
        self._remember(event)
        self._fan_out(event)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return event

    def _remember(self, event: StoredEvent) -> None:
        if self._history_limit == 0:
            return
        self._history.append(event)
        named = self._by_name.get(event.name)
        if named is None:
            named = self._by_name[event.name] = deque()
        named.append(event)
        if len(self._history) > self._history_limit:
            oldest = self._history.popleft()
            # Per-name order follows global order, so the oldest is first there too.
            bucket = self._by_name[oldest.name]
            bucket.popleft()
            if not bucket:
                del self._by_name[oldest.name]

    def _fan_out(self, event: StoredEvent) -> None:
        owners: tuple[_Owner, _Owner] = (event.identity_id, None)
        by_owner = self._listeners.get(event.name)
        if by_owner:
            for owner in owners:
                listeners = by_owner.get(owner)
                if listeners:
                    self._offer_all(listeners, event, filtered=False)
        if self._pattern_listeners:
            self._offer_all(self._pattern_listeners, event, filtered=True)
        groups_by_owner = self._groups.get(event.name)
        if groups_by_owner:
            for owner in owners:
                for group in groups_by_owner.get(owner, ()):
                    self._offer_group(group, event)
        for group in self._pattern_groups:
            owner = group.selector.identity
            if (owner is None or owner == event.identity_id) and group.matches(event.name):
                self._offer_group(group, event)

    def _offer_all(self, listeners: set[_Listener], event: StoredEvent, *, filtered: bool) -> None:
        # ``filtered``: the set is not indexed by name and owner, so check both here.
        slow: list[_Listener] = []
        for listener in listeners:
            if filtered:
                owner = listener.selector.identity
                if owner is not None and owner != event.identity_id:
                    continue
                if not listener.matches(event.name):
                    continue
            try:
                listener.send.send_nowait(event)
            except trio.WouldBlock:
                slow.append(listener)
        for listener in slow:
            self._disconnect_slow(listener)

    def _offer_group(self, group: _Group, event: StoredEvent) -> None:
        try:
            group.send.send_nowait(event)
        except trio.WouldBlock:
            group.dropped += 1
            self.stats.dropped += 1
            if not group.overflowing:
                group.overflowing = True
                sel = group.selector
                _log.warning(
                    "unicast group %r of %r is full (%d events): dropping new events",
                    sel.group,
                    sel.name,
                    self._queue,
                )
        else:
            group.overflowing = False

    def _disconnect_slow(self, listener: _Listener) -> None:
        self._unregister(listener)
        listener.send.close()
        self.stats.slow_disconnects += 1
        sel = listener.selector
        _log.warning(
            "slow consumer: broadcast listener %r on %r disconnected (buffer of %d events full)",
            sel.consumer,
            sel.name,
            self._queue,
        )

    # -- subscribe -----------------------------------------------------------

    def subscribe(self, selector: Selector) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe for live events matching ``selector`` (see the module rules)."""
        if selector.delivery is Delivery.UNICAST:
            return self._subscribe_unicast(selector)
        return self._subscribe_broadcast(selector)

    @asynccontextmanager
    async def _subscribe_broadcast(self, selector: Selector) -> AsyncIterator[Subscription]:
        listener = _Listener(selector, self._queue)
        if selector.pattern:
            self._pattern_listeners.add(listener)
        else:
            by_owner = self._listeners.setdefault(selector.name, {})
            by_owner.setdefault(selector.identity, set()).add(listener)
        try:
            yield _ListenerSubscription(listener.receive)
        finally:
            self._unregister(listener)
            listener.send.close()
            listener.receive.close()

    def _unregister(self, listener: _Listener) -> None:
        sel = listener.selector
        if sel.pattern:
            self._pattern_listeners.discard(listener)
            return
        by_owner = self._listeners.get(sel.name)
        if by_owner is None:
            return
        listeners = by_owner.get(sel.identity)
        if listeners is None:
            return
        listeners.discard(listener)
        if not listeners:
            del by_owner[sel.identity]
            if not by_owner:
                del self._listeners[sel.name]

    @asynccontextmanager
    async def _subscribe_unicast(self, selector: Selector) -> AsyncIterator[Subscription]:
        key = (selector.name, selector.pattern, selector.identity, selector.group)
        group = self._group_index.get(key)
        if group is None:
            group = self._group_index[key] = _Group(selector, self._queue)
            if selector.pattern:
                self._pattern_groups.append(group)
            else:
                by_owner = self._groups.setdefault(selector.name, {})
                by_owner.setdefault(selector.identity, []).append(group)
        group.consumers += 1
        try:
            yield _ListenerSubscription(group.receive)
        finally:
            group.consumers -= 1

    # -- replay --------------------------------------------------------------

    async def snapshot(self, selector: Selector) -> list[StoredEvent]:
        """Stored events matching ``selector``'s name and owner, oldest first."""
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

    # -- introspection -------------------------------------------------------

    async def ping(self) -> None:
        """Always answers: the memory backend lives in this process."""
        await trio.lowlevel.checkpoint()

    def subscriber_count(self, name: str) -> int:
        """Connected broadcast listeners plus unicast consumers for exactly ``name``."""
        listeners = sum(len(s) for s in self._listeners.get(name, {}).values())
        consumers = sum(
            group.consumers for groups in self._groups.get(name, {}).values() for group in groups
        )
        return listeners + consumers
