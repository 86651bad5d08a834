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
* **Replay** is ``XRANGE`` up to the last entry at the time of the request.
* **Broadcast follow** reads with blocking ``XREAD`` from the last entry id seen
  when the subscription started, so nothing falls between replay and follow.
  Each stream reads on demand: a slow reader lags in Redis, not in this
  process; if it lags more than ``MAXLEN`` behind, trimmed entries are gone.
* **Unicast** groups are consumer groups named ``<owner>|<group>`` on the name's
  stream, read with ``XREADGROUP … NOACK`` (at most once, as in memory): the
  consumers of one group on any process share its events.  The group read never
  blocks (a blocking one still in flight when a consumer leaves would take
  events nobody receives); consumers wait for new entries with a plain ``XREAD``.  A group starts at
  the stream's end when first created; if Redis lost it (restart without
  persistence) it is created again from the stream's start.
* **Redis unreachable**: publish raises :class:`BackendUnavailable` (``503``),
  open streams end with an error; both recover once Redis answers again.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, cast
from urllib.parse import urlsplit

import coredis
import coredis.exceptions
import trio
from coredis.commands.script import Script
from coredis.retry import NoRetryPolicy
from coredis.tokens import PureToken

from busevents import Delivery

from .._config import RedisOptions
from .._idempotency import REDIS_PUBLISH_SCRIPT, Replayed, accepted_parts, redis_key_suffix
from ._base import (
    BackendUnavailable,
    Draft,
    IdClock,
    Selector,
    StoredEvent,
    Subscription,
    encode_envelope_tail,
    splice_id,
)
from ._redis_cluster import check_cluster, cluster_client, cluster_location, is_cluster

__all__ = ["RedisBackend", "redis_location"]

_log = logging.getLogger("busevents.provider")

#: How long one blocking read waits (ms).  Reads are shielded from cancellation
#: (a cancelled blocking command would leave its connection mid-reply), so this
#: is also how long a closing stream may take to let go.
_BLOCK_MS = 1000
_RANGE_CHUNK = 1000
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


class RedisBackend:
    """Events in Redis Streams; see the module docstring for layout and semantics.

    Not connected until :meth:`running` is entered (the app's lifespan does it).
    """

    def __init__(
        self,
        options: RedisOptions,
        *,
        history_limit: int = 100_000,
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
        self._client: coredis.Redis[bytes] | None = None
        self._publish_script: Script[bytes] = Script(script=REDIS_PUBLISH_SCRIPT)

    def _client_or_raise(self) -> coredis.Redis[bytes]:
        if self._client is None:
            raise BackendUnavailable(f"{self._where} is not connected")
        return self._client

    def _make_client(self) -> coredis.Redis[bytes]:
        common: dict[str, Any] = {
            "retry_policy": NoRetryPolicy(),
            "connect_timeout": _CONNECT_TIMEOUT,
            "stream_timeout": _STREAM_TIMEOUT,
        }
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

    def _idempotency_key(self, draft: Draft, key: str) -> bytes:
        tag = b"{" + draft.name.encode() + b"}:" if self._cluster else b""
        return self._prefix + b"k:" + tag + redis_key_suffix(draft.identity_id, key)

    # -- lifecycle -----------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Connect for the app's lifetime; :class:`BackendUnavailable` if Redis does not answer."""
        client = self._make_client()
        try:
            async with client:
                self._client = client
                await self.ping()
                try:
                    yield
                finally:
                    self._client = None
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

    async def snapshot(self, selector: Selector) -> list[StoredEvent]:
        """``XRANGE`` of the name's stream up to its current end, filtered by owner."""
        if not self._history:
            await trio.lowlevel.checkpoint()
            return []
        client = self._client_or_raise()
        key = self._key(selector.name)
        owner = selector.identity
        events: list[StoredEvent] = []
        try:
            last = await client.xrevrange(key, "+", "-", count=1)
            if not last:
                return []
            end = _text(last[0].identifier)
            start = "-"
            while True:
                chunk = await client.xrange(key, start, end, count=_RANGE_CHUNK)
                for entry in chunk:
                    event = self._event(selector.name, entry.identifier, entry.field_values)
                    if owner is None or event.identity_id == owner:
                        events.append(event)
                if len(chunk) < _RANGE_CHUNK:
                    return events
                start = "(" + _text(chunk[-1].identifier)
        except _FAILURES as exc:
            raise self._unavailable(exc) from None

    def subscribe(self, selector: Selector) -> AbstractAsyncContextManager[Subscription]:
        """Follow the name's stream: ``XREAD`` (broadcast) or ``XREADGROUP`` (unicast)."""
        return self._subscribe(selector)

    @asynccontextmanager
    async def _subscribe(self, selector: Selector) -> AsyncIterator[Subscription]:
        client = self._client_or_raise()
        key = self._key(selector.name)
        try:
            if selector.delivery is Delivery.UNICAST:
                owner = "*" if selector.identity is None else "=" + selector.identity
                group = f"{owner}|{selector.group}".encode()
                await self._create_group(client, key, group, "$")
                yield _GroupReader(self, client, key, selector, group)
            else:
                last = await client.xrevrange(key, "+", "-", count=1)
                position = _text(last[0].identifier) if last else "0-0"
                yield _StreamReader(self, client, key, selector, position)
        except* _FAILURES as group_error:
            raise self._unavailable(group_error.exceptions[0]) from None

    async def _create_group(
        self, client: coredis.Redis[bytes], key: bytes, group: bytes, start: str
    ) -> None:
        with contextlib.suppress(coredis.exceptions.StreamDuplicateConsumerGroupError):
            await client.xgroup_create(key, group, start, mkstream=True)


class _Reader:
    """What both subscription kinds share: a pending batch kept across cancellation."""

    def __init__(
        self,
        backend: RedisBackend,
        client: coredis.Redis[bytes],
        key: bytes,
        selector: Selector,
    ) -> None:
        self._backend = backend
        self._client = client
        self._key = key
        self._selector = selector
        self._pending: deque[StoredEvent] = deque()

    async def _read(self, limit: int) -> Any:
        raise NotImplementedError

    async def receive_batch(self, limit: int) -> list[StoredEvent]:
        owner = self._selector.identity
        name = self._selector.name
        while not self._pending:
            try:
                # Shielded: a blocking command cancelled half-way would leave its
                # connection waiting for a reply; it returns within _BLOCK_MS anyway.
                with trio.CancelScope(shield=True):
                    result = await self._read(limit)
            except _FAILURES as exc:
                raise self._backend._unavailable(exc) from None
            for entries in (result or {}).values():
                for entry in entries:
                    event = self._backend._event(name, entry.identifier, entry.field_values)
                    self._advance(event.id)
                    if owner is None or event.identity_id == owner:
                        self._pending.append(event)
            # The cancellation point: what was read stays pending for the next call.
            await trio.lowlevel.checkpoint()
        batch: list[StoredEvent] = []
        while self._pending and len(batch) < limit:
            batch.append(self._pending.popleft())
        return batch

    def _advance(self, entry_id: str) -> None:
        pass


class _StreamReader(_Reader):
    def __init__(
        self,
        backend: RedisBackend,
        client: coredis.Redis[bytes],
        key: bytes,
        selector: Selector,
        position: str,
    ) -> None:
        super().__init__(backend, client, key, selector)
        self._position = position

    def _advance(self, entry_id: str) -> None:
        self._position = entry_id

    async def _read(self, limit: int) -> Any:
        return await self._client.xread(
            {self._key: self._position}, count=max(limit, 64), block=_BLOCK_MS
        )


class _GroupReader(_Reader):
    def __init__(
        self,
        backend: RedisBackend,
        client: coredis.Redis[bytes],
        key: bytes,
        selector: Selector,
        group: bytes,
    ) -> None:
        super().__init__(backend, client, key, selector)
        self._group = group
        self._consumer = selector.consumer.encode()

    async def _read(self, limit: int) -> Any:
        # Never a *blocking* XREADGROUP: one still in flight when its stream closes
        # (reads are shielded) would take events that no consumer then receives.
        # So: note the stream's end, take what the group has without blocking, and
        # if nothing, wait for a newer entry with a plain XREAD, which takes nothing.
        last = await self._client.xrevrange(self._key, "+", "-", count=1)
        position = _text(last[0].identifier) if last else "0-0"
        try:
            result = await self._xreadgroup(limit)
        except coredis.exceptions.StreamConsumerError:
            # Redis lost the group (a restart without persistence): everything in the
            # stream now was published after that restart, so start from its beginning.
            _log.warning(
                "unicast group %r of %r is gone: creating it again", self._group, self._key
            )
            await self._backend._create_group(self._client, self._key, self._group, "0")
            result = await self._xreadgroup(limit)
        if result:
            return result
        await self._client.xread({self._key: position}, count=1, block=_BLOCK_MS)
        return None

    async def _xreadgroup(self, limit: int) -> Any:
        return await self._client.xreadgroup(
            self._group, self._consumer, {self._key: ">"}, count=limit, noack=True
        )
