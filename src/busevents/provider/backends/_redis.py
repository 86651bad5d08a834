"""The ``redis`` backend: events in Redis Streams, shared by every provider process.

Layout: **one stream per event name**, key ``<prefix>s:<name>``, each entry
holding the owner (``i``) and the envelope without its id (``t``; the line is
rebuilt around the entry id, so the id a client sees is the one Redis gave).
Why per name rather than one stream with the name as a field:

* replay of a name is one ``XRANGE`` of exactly its events, not a scan of all;
* unicast groups are Redis consumer groups, and a group on a per-name stream
  receives only that name's events: with one stream, every group would have to
  read (and skip) every event of every name;
* ids (``<ms>-<seq>``) are still strictly increasing per stream, which is
  the order a listener of one name sees.

The price: wildcard streams would need to read many streams at once, so the
durable backends refuse ``allow_wildcards`` (memory only).

Semantics:

* **Publish** is one ``XADD … MAXLEN ~ history_limit``; the provider answers
  ``202`` only after Redis acknowledged it.  The client does not retry a
  failed ``XADD`` (a lost reply could otherwise store the event twice).
* **Replay** is ``XRANGE`` up to the last entry at the time of the request, in
  pages of a bounded number of bytes, each read when the previous one was sent.
* **Broadcast follow**: each process runs one reader per followed name (see
  :mod:`busevents.provider._hub`), a blocking ``XREAD`` on its own connection of
  the *reader* pool, and fans the entries out to every local stream of that
  name in process, each through a buffer bounded in events and bytes (a stream
  whose buffer is full is cut as a slow consumer, as on memory).  Publishes,
  replays and group claims use the separate *command* pool (a few multiplexed
  connections), so they never wait behind readers.  Connections per process:
  the names followed plus that pool, whatever the number of streams.
* **Unicast** groups are consumer groups named ``<owner>|<group>`` on the name's
  stream, claimed with non-blocking ``XREADGROUP … NOACK`` (at most once, as in
  memory) by one claimer per group and process, woken by the name's reader: the
  consumers of one group on any process share its events.  A group starts at
  the stream's end when first created (or at its start when the stream did not
  exist yet: nothing is created for a name nobody published to); if Redis lost
  it (restart without persistence) it is created again from the stream's start.
* **Group bounds**: a registry (sorted sets ``<prefix>groups`` and
  ``<prefix>groups:<owner>``, scored by last use) bounds the groups in all and
  per owner; a group without consumers on any process for ``group_idle``
  seconds is destroyed with its registry entries.
* **Redis unreachable**: publish raises :class:`BackendUnavailable` (``503``),
  open streams end with an error; both recover once Redis answers again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, cast
from urllib.parse import urlsplit

import coredis
import coredis.exceptions
import trio
from coredis.commands.script import Script
from coredis.retry import NoRetryPolicy
from coredis.tokens import PureToken

from .._config import RedisOptions
from .._hub import Fanout, Feeds, Groups, HubSubscriptions
from .._idempotency import REDIS_PUBLISH_SCRIPT, Replayed, accepted_parts, redis_key_suffix
from ._base import (
    BackendUnavailable,
    Draft,
    IdClock,
    PageSize,
    Selector,
    StoredEvent,
    encode_envelope_tail,
    splice_id,
    too_many_groups,
)
from ._redis_cluster import check_cluster, cluster_client, cluster_location, is_cluster

__all__ = ["RedisBackend", "redis_location"]

_log = logging.getLogger("busevents.provider")

#: How long one blocking read waits (ms).  Reads are shielded from cancellation
#: (a cancelled blocking command would leave its connection mid-reply), so this
#: is also how long a closing stream may take to let go.
_BLOCK_MS = 1000
#: Entries one reader takes per ``XREAD`` (shared by every local stream of the name)
#: at most, and the bytes it aims at (the count follows the events' mean size).
_READ_COUNT = 256
_READ_BYTES = 1 << 20
#: Connections of the command pool (publish, replay, claims, probes; multiplexed).
_COMMAND_CONNECTIONS = 8
#: Most names followed at once per process (one reader connection each).
_MAX_READERS = 4096
_CONNECT_TIMEOUT = 3.0
_STREAM_TIMEOUT = 10.0
_FAILURES = (coredis.exceptions.RedisError, OSError, trio.TooSlowError)


def redis_location(addr: str) -> str:
    """``host:port`` of a Redis address (``host:port`` or URL), without any credentials."""
    if is_cluster(addr):
        return cluster_location(addr)
    if "://" in addr:
        parts = urlsplit(addr)
        host = parts.hostname or "localhost"
        return f"{host}:{parts.port or 6379}"
    return addr


def _host_port(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or len(port) > 5 or not host:
        raise ValueError(
            f"Redis address {addr!r}: expected HOST:PORT, a redis:// URL "
            "or a redis+cluster://HOST:PORT[,HOST:PORT] cluster"
        )
    return host.strip("[]"), int(port)


def _seq(entry_id: str) -> int:
    ms, _, n = entry_id.partition("-")
    return (int(ms) << 64) | int(n)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisBackend(HubSubscriptions):
    """Events in Redis Streams; see the module docstring for layout and semantics.

    Not connected until :meth:`running` is entered (the app's lifespan does it).
    The bounds (``listener_queue*``, ``max_groups*``, ``group_idle``) mean what
    they mean for the memory backend.
    """

    def __init__(
        self,
        options: RedisOptions,
        *,
        history_limit: int = 100_000,
        listener_queue: int = 10_000,
        listener_queue_bytes: int = 8 << 20,
        max_groups: int = 1_000,
        max_groups_per_identity: int = 20,
        group_idle: float = 600.0,
        idempotency_window: float = 24 * 3600.0,
    ) -> None:
        self._options = options
        self._cluster = is_cluster(options.addr)
        if self._cluster and ("{" in options.prefix or "}" in options.prefix):
            raise ValueError(
                f"Redis key prefix {options.prefix!r}: on a Redis Cluster it must not hold "
                "'{' or '}' (the backend puts each name's keys on one slot with a hash tag)"
            )
        if self._cluster:
            check_cluster(options.addr)  # a malformed address fails now, not at start-up
        elif "://" not in options.addr:
            _host_port(options.addr)
        self._window_ms = max(1, round(idempotency_window * 1000))
        self._where = f"Redis at {redis_location(options.addr)}"
        # A stream must keep what followers have not read yet: never MAXLEN 0.
        self._maxlen = max(history_limit, 1)
        self._history = history_limit > 0
        self._prefix = options.prefix.encode()
        self._clock = IdClock()
        self._max_groups = max_groups
        self._max_groups_per_owner = max_groups_per_identity
        self._group_idle = group_idle
        #: The name this process's connections give Redis (``CLIENT LIST`` shows it).
        self.client_name = f"bus-events:{os.getpid()}"
        self._client: coredis.Redis[bytes] | None = None
        self._reader: coredis.Redis[bytes] | None = None
        self.fanout = Fanout(listener_queue, listener_queue_bytes)
        self._read_size = PageSize(_READ_BYTES, _READ_COUNT, first=8)
        self._feeds = Feeds(self.fanout, self)
        self._groups = Groups(self._feeds, self, poll=_BLOCK_MS / 1000)
        self._publish_script: Script[bytes] = Script(script=REDIS_PUBLISH_SCRIPT)

    def _client_or_raise(self) -> coredis.Redis[bytes]:
        if self._client is None:
            raise BackendUnavailable(f"{self._where} is not connected")
        return self._client

    def _make_client(self, max_connections: int) -> coredis.Redis[bytes]:
        common: dict[str, Any] = {
            "retry_policy": NoRetryPolicy(),
            "connect_timeout": _CONNECT_TIMEOUT,
            "stream_timeout": _STREAM_TIMEOUT,
            "max_connections": max_connections,
        }
        if not self._cluster:  # coredis' cluster client takes no connection name
            common["client_name"] = self.client_name
        if self._options.password is not None:
            common["password"] = self._options.password
        addr = self._options.addr
        if self._cluster:
            # The cluster client has the same command methods this backend uses.
            return cast("coredis.Redis[bytes]", cluster_client(addr, common))
        if "://" in addr:
            return coredis.Redis.from_url(addr, **common)
        host, port = _host_port(addr)
        return coredis.Redis(host=host, port=port, **common)

    def _unavailable(self, exc: BaseException) -> BackendUnavailable:
        reason = type(exc).__name__
        text = str(exc)
        if text and self._options.password is not None:
            text = text.replace(self._options.password, "***")
        return BackendUnavailable(f"{self._where} is unavailable ({reason}: {text[:200]})")

    def _key(self, name: str) -> bytes:
        if self._cluster:
            # A hash tag: every key of one name on one slot (its stream, its
            # idempotency keys), so one script can touch them all.
            return self._prefix + b"s:{" + name.encode() + b"}"
        return self._prefix + b"s:" + name.encode()

    def _registry(self, owner_tag: str | None = None) -> bytes:
        """The registry of all groups, or (``owner_tag``: ``*`` or ``=<id>``) of one owner's."""
        if owner_tag is None:
            return self._prefix + b"groups"
        return self._prefix + b"groups:" + owner_tag.encode()

    def _idempotency_key(self, draft: Draft, key: str) -> bytes:
        tag = b"{" + draft.name.encode() + b"}:" if self._cluster else b""
        return self._prefix + b"k:" + tag + redis_key_suffix(draft.identity_id, key)

    # -- lifecycle -----------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Connect for the app's lifetime; :class:`BackendUnavailable` if Redis does not answer."""
        client = self._make_client(_COMMAND_CONNECTIONS)
        reader = self._make_client(_MAX_READERS)
        try:
            async with client, reader:
                self._client = client
                self._reader = reader
                await self.ping()
                try:
                    async with self._feeds.running(), trio.open_nursery() as nursery:
                        nursery.start_soon(self._keep_groups)
                        try:
                            yield
                        finally:
                            nursery.cancel_scope.cancel()
                finally:
                    self._client = None
                    self._reader = None
        except* _FAILURES as group:
            raise self._unavailable(group.exceptions[0]) from None

    async def ping(self) -> None:
        """Return when Redis answers ``PING``; raise :class:`BackendUnavailable` otherwise."""
        client = self._client_or_raise()
        try:
            with trio.fail_after(_CONNECT_TIMEOUT):
                await client.ping()
        except _FAILURES as exc:
            raise self._unavailable(exc) from None

    # -- publish -------------------------------------------------------------

    async def publish(self, draft: Draft, idempotency_key: str | None = None) -> StoredEvent:
        """``XADD`` the event; return it once Redis acknowledged the write.

        With ``idempotency_key``: one script checks the key, adds the event and
        sets the key (expiring after the window) atomically; a key already there
        stores nothing and raises :class:`Replayed` with the original ``202`` body.
        """
        client = self._client_or_raise()
        _, stamp = self._clock.next()
        tail = encode_envelope_tail(draft, stamp)
        raw_id: bytes | str | None
        try:
            # Shielded: once sent, wait for the answer rather than leave it unknown.
            with trio.CancelScope(shield=True):
                if idempotency_key is not None:
                    raw_id = await self._publish_once(client, draft, idempotency_key, tail, stamp)
                else:
                    raw_id = await client.xadd(
                        self._key(draft.name),
                        {b"i": draft.identity_id.encode(), b"t": tail},
                        trim_strategy=PureToken.MAXLEN,
                        threshold=self._maxlen,
                        trim_operator=PureToken.APPROXIMATELY,
                    )
        except _FAILURES as exc:
            raise self._unavailable(exc) from None
        entry_id = _text(raw_id or b"")
        return StoredEvent(
            _seq(entry_id),
            entry_id,
            draft.name,
            draft.identity_id,
            stamp,
            splice_id(entry_id, tail),
        )

    async def _publish_once(
        self, client: coredis.Redis[bytes], draft: Draft, key: str, tail: bytes, stamp: str
    ) -> bytes:
        head, rest = accepted_parts(draft.name, draft.correlation_id, stamp)
        result: Any = await self._publish_script(
            keys=[self._key(draft.name), self._idempotency_key(draft, key)],
            args=[draft.identity_id, tail, self._maxlen, self._window_ms, head, rest],
            client=client,
        )
        stored, value = cast("tuple[int, bytes]", result)
        if not stored:
            raise Replayed(value)
        return value

    # -- read ----------------------------------------------------------------

    def _event(self, name: str, entry_id: bytes | str, fields: Mapping[Any, Any]) -> StoredEvent:
        ident = _text(fields[b"i"])
        eid = _text(entry_id)
        return StoredEvent(_seq(eid), eid, name, ident, "", splice_id(eid, fields[b"t"]))

    async def replay(
        self, selector: Selector, page_bytes: int
    ) -> AsyncGenerator[list[StoredEvent], None]:
        """``XRANGE`` of the name's stream up to its current end, in pages, filtered by owner.

        Each ``XRANGE`` asks for as many entries as fit ``page_bytes`` at the sizes
        seen so far (one at first), so a page stays near the bound whatever the
        events weigh.
        """
        if not self._history:
            await trio.lowlevel.checkpoint()
            return
        client = self._client_or_raise()
        key = self._key(selector.name)
        owner = selector.identity
        try:
            last = await client.xrevrange(key, "+", "-", count=1)
            if not last:
                return
            end = _text(last[0].identifier)
            start = "-"
            size = PageSize(page_bytes, _READ_COUNT)
            while True:
                count = size.count()
                chunk = await client.xrange(key, start, end, count=count)
                events = [
                    self._event(selector.name, entry.identifier, entry.field_values)
                    for entry in chunk
                ]
                size.saw(events)
                page = [e for e in events if owner is None or e.identity_id == owner]
                del events
                if page:
                    yield page
                if len(chunk) < count:
                    return
                start = "(" + _text(chunk[-1].identifier)
        except _FAILURES as exc:
            raise self._unavailable(exc) from None

    # -- the hub's reads (see busevents.provider._hub) ----------------------------

    async def end(self, name: str) -> str:
        """The id of the name's newest entry (``0-0`` when there is none)."""
        client = self._client_or_raise()
        try:
            last = await client.xrevrange(self._key(name), "+", "-", count=1)
        except _FAILURES as exc:
            raise self._unavailable(exc) from None
        return _text(last[0].identifier) if last else "0-0"

    async def read(self, name: str, position: str) -> tuple[list[StoredEvent], str]:
        """One blocking ``XREAD`` after ``position`` on the reader pool (every owner)."""
        reader = self._reader
        if reader is None:
            raise BackendUnavailable(f"{self._where} is not connected")
        try:
            # Shielded: a blocking command cancelled half-way would cost its
            # connection; it returns within _BLOCK_MS anyway.
            with trio.CancelScope(shield=True):
                result = await reader.xread(
                    {self._key(name): position}, count=self._read_size.count(), block=_BLOCK_MS
                )
        except _FAILURES as exc:
            raise self._unavailable(exc) from None
        events: list[StoredEvent] = []
        for entries in (result or {}).values():
            for entry in entries:
                events.append(self._event(name, entry.identifier, entry.field_values))
        if events:
            position = events[-1].id
            self._read_size.saw(events)
        await trio.lowlevel.checkpoint()
        return events, position

    async def claim(self, selector: Selector, limit: int) -> list[StoredEvent]:
        """The group's next events (``XREADGROUP … NOACK``, not blocking), owner-filtered."""
        client = self._client_or_raise()
        key = self._key(selector.name)
        group = _group_name(selector)
        consumer = selector.consumer.encode()
        try:
            try:
                result = await client.xreadgroup(
                    group, consumer, {key: ">"}, count=limit, noack=True
                )
            except coredis.exceptions.StreamConsumerError:
                # No group: the stream did not exist when the group was opened, or
                # Redis lost it (a restart without persistence).  Everything in the
                # stream now came after, so start from its beginning.
                if not await client.exists([key]):
                    return []
                await self._create_group(client, key, group, "0")
                result = await client.xreadgroup(
                    group, consumer, {key: ">"}, count=limit, noack=True
                )
        except _FAILURES as exc:
            raise self._unavailable(exc) from None
        owner = selector.identity
        events: list[StoredEvent] = []
        for entries in (result or {}).values():
            for entry in entries:
                event = self._event(selector.name, entry.identifier, entry.field_values)
                if owner is None or event.identity_id == owner:
                    events.append(event)
        return events

    # -- subscribe -----------------------------------------------------------

    async def _open_group(self, selector: Selector) -> None:
        client = self._client_or_raise()
        member = _member(selector)
        everyone, mine = self._registry(), self._registry(_owner_tag(selector))
        now = time.time() * 1000
        try:
            if await client.zscore(everyone, member) is None:
                if await client.zcard(everyone) >= self._max_groups:
                    raise too_many_groups(self._max_groups, per_identity=False)
                if await client.zcard(mine) >= self._max_groups_per_owner:
                    raise too_many_groups(self._max_groups_per_owner, per_identity=True)
                key = self._key(selector.name)
                if await client.exists([key]):
                    await self._create_group(client, key, _group_name(selector), "$")
            await client.zadd(everyone, {member: now})
            await client.zadd(mine, {member: now})
        except _FAILURES as exc:
            raise self._unavailable(exc) from None

    async def _create_group(
        self, client: coredis.Redis[bytes], key: bytes, group: bytes, start: str
    ) -> None:
        with contextlib.suppress(coredis.exceptions.StreamDuplicateConsumerGroupError):
            await client.xgroup_create(key, group, start)

    async def _keep_groups(self) -> None:
        """Mark this process's groups as used, and free groups idle for ``group_idle``."""
        every = min(self._group_idle / 3, 10.0)
        while True:
            await trio.sleep(every)
            with contextlib.suppress(BackendUnavailable, *_FAILURES):
                await self._touch_and_sweep()

    async def _touch_and_sweep(self) -> None:
        client = self._client_or_raise()
        now = time.time() * 1000
        for selector in self._groups.active():
            member = _member(selector)
            await client.zadd(self._registry(), {member: now})
            await client.zadd(self._registry(_owner_tag(selector)), {member: now})
        cutoff = now - self._group_idle * 1000
        stale = await client.zrangebyscore(self._registry(), float("-inf"), cutoff)
        for item in stale:
            raw = item if isinstance(item, bytes) else item.member
            if not await client.zrem(self._registry(), [raw]):
                continue  # another process freed it
            owner_tag, group, name = _text(raw).split("\n", 2)
            await client.zrem(self._registry(owner_tag), [raw])
            with contextlib.suppress(coredis.exceptions.ResponseError):
                await client.xgroup_destroy(self._key(name), f"{owner_tag}|{group}".encode())

    # -- introspection -------------------------------------------------------

    def readers(self) -> int:
        """Name readers (reader-pool connections in use) in this process."""
        return self._feeds.readers()


def _owner_tag(selector: Selector) -> str:
    return "*" if selector.identity is None else "=" + selector.identity


def _group_name(selector: Selector) -> bytes:
    return f"{_owner_tag(selector)}|{selector.group}".encode()


def _member(selector: Selector) -> bytes:
    return f"{_owner_tag(selector)}\n{selector.group}\n{selector.name}".encode()
