"""Idempotency keys on publish: a retried publish is stored once.

A client may send ``Idempotency-Key: <1-255 printable ASCII bytes>`` with
``POST …/events``.  The backend stores the key with the event, atomically
(Redis: one Lua script that checks the key, ``XADD``s and sets the key with the
window as its TTL; PostgreSQL: a row in ``bus_event_keys`` with a unique
``(identity_id, key)``, inserted in the event's transaction; memory: a bounded
map), scoped per identity (the token's subject, or the ``identity_id`` a
service publishes for).  A repeat of the key within the window stores nothing:
the backend raises :class:`Replayed` with the original acceptance body, which
the app sends as ``202`` with ``Idempotent-Replayed: true``.

This module holds what the backends share: the key's validation, the 202 body
(built here so the replay is byte for byte the original), the memory map, the
Redis script and the PostgreSQL statements.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING

import msgspec
import trio

if TYPE_CHECKING:
    from .backends._base import Backend, Draft, StoredEvent

__all__ = [
    "REDIS_PUBLISH_SCRIPT",
    "REPLAYED_HEADER",
    "InvalidIdempotencyKey",
    "KeyMap",
    "Replayed",
    "accepted_body",
    "accepted_parts",
    "idempotency_key",
    "publish_or_replay",
    "redis_key_suffix",
]

MAX_KEY_BYTES = 255
_HEADER = b"idempotency-key"
REPLAYED_HEADER = (b"idempotent-replayed", b"true")


class InvalidIdempotencyKey(ValueError):
    """The ``Idempotency-Key`` header is not 1-255 printable ASCII bytes (``400``)."""


class Replayed(Exception):
    """Raised by ``Backend.publish``: the key was seen within the window; nothing stored.

    ``body`` is the acceptance body sent the first time.
    """

    def __init__(self, body: bytes) -> None:
        super().__init__("idempotent replay")
        self.body = body


async def publish_or_replay(backend: Backend, draft: Draft, key: str | None) -> StoredEvent | bytes:
    """``backend.publish``; for a key seen within the window, the original 202 body instead."""
    try:
        return await backend.publish(draft, idempotency_key=key)
    except Replayed as replay:
        return replay.body


def idempotency_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The request's ``Idempotency-Key`` (``None`` without one); validated.

    Raises :class:`InvalidIdempotencyKey` with what is wrong and what to send.
    """
    found = [value for name, value in headers if name.lower() == _HEADER]
    if not found:
        return None
    if len(found) > 1:
        raise InvalidIdempotencyKey("send one Idempotency-Key header, not several")
    raw = found[0]
    if not 1 <= len(raw) <= MAX_KEY_BYTES:
        raise InvalidIdempotencyKey(
            f"the Idempotency-Key header is {len(raw)} bytes: "
            f"send 1 to {MAX_KEY_BYTES} printable ASCII characters (e.g. a random UUID)"
        )
    for index, byte in enumerate(raw):
        if not 0x20 <= byte <= 0x7E:
            raise InvalidIdempotencyKey(
                f"the Idempotency-Key header holds byte 0x{byte:02x} at offset {index}: "
                "send printable ASCII characters only (e.g. a random UUID)"
            )
    return raw.decode("ascii")


class _Accepted(msgspec.Struct, omit_defaults=True, rename={"correlation_id": "correlationId"}):
    accepted: bool
    id: str
    name: str
    correlation_id: str | None = None
    time: str | None = None


_encode = msgspec.json.Encoder().encode


def accepted_body(event_id: str, name: str, correlation_id: str | None, time: str) -> bytes:
    """The JSON body of ``202 Accepted`` for a publish."""
    return _encode(_Accepted(True, event_id, name, correlation_id, time))


_ID_MARK = '"id":"'


def accepted_parts(name: str, correlation_id: str | None, time: str) -> tuple[bytes, bytes]:
    """``(head, tail)`` such that ``head + id + tail`` is :func:`accepted_body`.

    For a store that assigns the id itself (a Redis stream entry id).
    """
    whole = accepted_body("", name, correlation_id, time)
    cut = whole.index(_ID_MARK.encode()) + len(_ID_MARK)
    return whole[:cut], whole[cut:]


def redis_key_suffix(identity: str, key: str) -> bytes:
    """A fixed-length name for ``(identity, key)``: neither part can run into the other."""
    ident = identity.encode()
    # 128 bits of SHA-256: collisions are out of reach, and each stored key is shorter.
    digest = hashlib.sha256(b"%d:" % len(ident) + ident + key.encode()).digest()
    return digest[:16].hex().encode()


#: KEYS: the name's stream, the idempotency key.  ARGV: owner, envelope tail, MAXLEN,
#: window in ms, acceptance head and tail.  Returns ``{1, id}`` when stored, ``{0, body}``
#: when the key was seen (nothing stored).  One script: Redis runs it atomically.
REDIS_PUBLISH_SCRIPT = """
local seen = redis.call('GET', KEYS[2])
if seen then return {0, seen} end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'i', ARGV[1], 't', ARGV[2])
redis.call('SET', KEYS[2], ARGV[5] .. id .. ARGV[6], 'PX', ARGV[4])
return {1, id}
"""


class KeyMap:
    """The memory backend's keys: at most ``limit``, each kept ``window`` seconds.

    Entries are in insertion order, which is expiry order (one window for all),
    so pruning looks at the oldest only; beyond ``limit`` the oldest is forgotten.
    """

    __slots__ = ("_entries", "_limit", "_window")

    def __init__(self, window: float, limit: int) -> None:
        self._window = window
        self._limit = limit
        self._entries: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, identity: str, key: str) -> bytes | None:
        """The acceptance body stored for ``(identity, key)`` within the window."""
        self._prune(trio.current_time())
        found = self._entries.get((identity, key))
        return None if found is None else found[1]

    def put(self, identity: str, key: str, body: bytes) -> None:
        """Remember ``body`` for ``(identity, key)`` from now for one window."""
        now = trio.current_time()
        self._entries[(identity, key)] = (now + self._window, body)
        self._entries.move_to_end((identity, key))
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def _prune(self, now: float) -> None:
        entries = self._entries
        while entries:
            expires, _ = next(iter(entries.values()))
            if expires > now:
                return
            entries.popitem(last=False)


#: PostgreSQL: the keys table (created with the events table) and its statements.
POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS bus_event_keys (
    identity_id text NOT NULL,
    key text NOT NULL,
    body bytea NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (identity_id, key)
);
CREATE INDEX IF NOT EXISTS bus_event_keys_expires ON bus_event_keys (expires_at);
"""
POSTGRES_SEEN = (
    "SELECT body FROM bus_event_keys"
    " WHERE identity_id = %s AND key = %s AND expires_at > clock_timestamp()"
)
#: An expired row of the same key is replaced (the unique key is ``(identity_id, key)``).
POSTGRES_REMEMBER = (
    "INSERT INTO bus_event_keys (identity_id, key, body, expires_at)"
    " VALUES (%s, %s, %s, clock_timestamp() + make_interval(secs => %s))"
    " ON CONFLICT (identity_id, key) DO UPDATE"
    " SET body = excluded.body, expires_at = excluded.expires_at"
)
POSTGRES_PRUNE = "DELETE FROM bus_event_keys WHERE expires_at <= clock_timestamp()"
