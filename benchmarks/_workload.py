"""The workload: a stream of 200-byte event envelopes, built fast and deterministically.

Every line is exactly :data:`LINE_SIZE` bytes (newline included), so the body of
``n`` events is ``n * LINE_SIZE`` bytes and any event can be located by offset.
Event ``k`` (0-based) has the id ``1732900000000-<k as 9 digits>``; a block of
:data:`BLOCK_EVENTS` events is one template with the block number patched in
(one ``bytes.replace``), so building a gigabyte of body takes well under a second.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from functools import lru_cache

__all__ = [
    "BLOCK_EVENTS",
    "EVENT_NAME",
    "LINE_SIZE",
    "block",
    "body",
    "body_digest",
    "event_id",
    "iter_body",
    "last_id",
]

EVENT_NAME = "bench.tick"
BLOCK_EVENTS = 10_000  # events per template block; 4 digits of the sequence
_MARK = b"BBBBB"  # 5 digits of block number: up to 10**9 events
_LINE = (
    b'{"id":"1732900000000-BBBBB%04d","name":"bench.tick","correlationId":"corr-BBBBB%04d",'
    b'"identity_id":"user-0042","time":"2024-11-29T18:32:00.123456Z",'
    b'"payload":{"seq":"BBBBB%04d","ok":true,"tag":"ab"}}\n'
)
LINE_SIZE = len(_LINE % (0, 0, 0))
assert LINE_SIZE == 200, LINE_SIZE
MAX_EVENTS = BLOCK_EVENTS * 10**5


@lru_cache(maxsize=1)
def _template() -> bytes:
    return b"".join(_LINE % (i, i, i) for i in range(BLOCK_EVENTS))


def block(index: int, events: int = BLOCK_EVENTS) -> bytes:
    """The first ``events`` lines of block ``index`` (events ``index * BLOCK_EVENTS`` on)."""
    data = _template()
    if events < BLOCK_EVENTS:
        data = data[: events * LINE_SIZE]
    return data.replace(_MARK, b"%05d" % index)


def iter_body(n: int) -> Iterator[bytes]:
    """The body of ``n`` events, block by block."""
    if not 0 <= n <= MAX_EVENTS:
        raise ValueError(f"events must be between 0 and {MAX_EVENTS}")
    full, rest = divmod(n, BLOCK_EVENTS)
    for index in range(full):
        yield block(index)
    if rest:
        yield block(full, rest)


def body(n: int) -> bytes:
    """The whole body of ``n`` events."""
    return b"".join(iter_body(n))


def event_id(k: int) -> str:
    """The id of event ``k`` (0-based)."""
    return f"1732900000000-{k:09d}"


def last_id(n: int) -> str | None:
    """The id of the last of ``n`` events."""
    return event_id(n - 1) if n else None


def body_digest(n: int) -> str:
    """SHA-256 of the body of ``n`` events (what a pass-through must write)."""
    digest = hashlib.sha256()
    for data in iter_body(n):
        digest.update(data)
    return digest.hexdigest()
