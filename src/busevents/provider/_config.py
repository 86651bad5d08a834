"""Provider configuration and the helper that reads a signing secret from the environment."""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field

from ._policy import ScopePolicy

__all__ = ["PostgresOptions", "ProviderConfig", "RedisOptions", "secret_from_env"]

_BASE64_PREFIX = "base64:"


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """Where the ``redis`` backend keeps events (see ``docs/backends.md``).

    ``addr`` is ``host:port`` or a ``redis://`` / ``rediss://`` URL; ``prefix``
    starts every key, so several deployments can share one Redis.  The password
    never appears in ``repr`` or in messages.
    """

    addr: str = "127.0.0.1:6379"
    password: str | None = field(default=None, repr=False)
    prefix: str = "bus-events:"


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    """Where the ``postgres`` backend keeps events (see ``docs/backends.md``).

    ``dsn`` is a libpq connection string or URL (it may hold a password: it is
    kept out of ``repr`` and messages).  ``poll_interval`` is how long a
    listener waits for a ``NOTIFY`` before it looks at the table anyway.
    ``pool_size`` is the number of connections (each used by one worker thread).
    """

    dsn: str = field(default="postgresql://postgres@127.0.0.1:5432/postgres", repr=False)
    poll_interval: float = 1.0
    pool_size: int = 8


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """How a reference provider behaves; immutable, shared by the app and its backend.

    Arguments:
        secret: the HS256 key that signs and verifies bearer tokens.
        policy: which scope each event name needs (spec §3); the default table
            unless given.
        max_body_bytes: largest accepted publish body; larger → ``413``.
        listener_queue: per-listener buffer, in events.  A broadcast listener
            whose buffer is full is disconnected; a unicast group whose buffer is
            full drops new events (see :mod:`busevents.provider`).
        listener_queue_bytes: the same buffers' bound in bytes of encoded events.
        history_limit: events kept for ``replay`` (oldest dropped first); 0 keeps
            none.  For ``redis`` it is the streams' approximate ``MAXLEN``, for
            ``postgres`` the rows kept.
        history_bytes: the memory backend's history bound in bytes (oldest first).
        max_groups: unicast groups the provider holds at most (on ``redis`` and
            ``postgres``: in the store, for every process together).
        max_groups_per_identity: the same bound per owner (all service tokens
            count as one owner).
        group_idle: seconds after which a unicast group without consumers is
            freed (with its Redis consumer group or PostgreSQL cursor row).
        replay_page_bytes: how much of the history one replay reads (and holds)
            at a time, in bytes of events (at least one event).
        replay_bytes: bytes of history pages held by all replays together; a
            replay waits for room before reading its next page.
        idempotency_window: seconds a publish's ``Idempotency-Key`` is remembered:
            a repeat within it stores nothing and answers the original ``202``.
        idempotency_keys: keys the memory backend remembers at most (oldest
            forgotten first); Redis and PostgreSQL keep every key for the window.
        keepalive: seconds of silence after which a following stream writes a
            blank line; ``None`` disables keep-alive lines.
        allow_wildcards: accept ``*`` / ``>`` in stream names (service tokens only).
        body_timeout: seconds a publish body may take to arrive; slower → ``408``.
        shutdown_grace: seconds a graceful stop waits for open connections after
            ending the streams; then the remaining sockets are closed hard.
        backend: ``"memory"`` (default), ``"redis"`` or ``"postgres"``.
        redis: options of the ``redis`` backend.
        postgres: options of the ``postgres`` backend.

    Raises :class:`ValueError` for an empty secret or a non-positive limit.
    """

    secret: bytes
    policy: ScopePolicy = field(default_factory=ScopePolicy.default)
    max_body_bytes: int = 1024 * 1024
    listener_queue: int = 10_000
    history_limit: int = 100_000
    keepalive: float | None = 15.0
    allow_wildcards: bool = False
    backend: str = "memory"
    body_timeout: float = 10.0
    shutdown_grace: float = 3.0
    listener_queue_bytes: int = 8 << 20
    history_bytes: int = 64 << 20
    max_groups: int = 1_000
    max_groups_per_identity: int = 20
    group_idle: float = 600.0
    replay_page_bytes: int = 1 << 20
    replay_bytes: int = 64 << 20
    redis: RedisOptions = field(default_factory=RedisOptions)
    postgres: PostgresOptions = field(default_factory=PostgresOptions)
    idempotency_window: float = 24 * 3600.0
    idempotency_keys: int = 100_000

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or not self.secret:
            raise ValueError("ProviderConfig.secret must be non-empty bytes")
        if self.max_body_bytes < 1:
            raise ValueError("ProviderConfig.max_body_bytes must be at least 1")
        if self.listener_queue < 1:
            raise ValueError("ProviderConfig.listener_queue must be at least 1")
        if self.history_limit < 0:
            raise ValueError("ProviderConfig.history_limit must not be negative")
        for name in (
            "listener_queue_bytes",
            "history_bytes",
            "max_groups",
            "replay_page_bytes",
            "replay_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ProviderConfig.{name} must be at least 1")
        if self.max_groups_per_identity < 1:
            raise ValueError("ProviderConfig.max_groups_per_identity must be at least 1")
        if not (self.group_idle > 0 and math.isfinite(self.group_idle)):
            raise ValueError("ProviderConfig.group_idle must be a positive number of seconds")
        if not (0.001 <= self.idempotency_window <= 10 * 365 * 86400):
            raise ValueError("ProviderConfig.idempotency_window must be between 1 ms and 10 years")
        if self.idempotency_keys < 1:
            raise ValueError("ProviderConfig.idempotency_keys must be at least 1")
        if self.keepalive is not None and not (
            self.keepalive > 0 and math.isfinite(self.keepalive)
        ):
            raise ValueError(
                "ProviderConfig.keepalive must be a positive number of seconds or None"
            )
        if not (self.body_timeout > 0 and math.isfinite(self.body_timeout)):
            raise ValueError("ProviderConfig.body_timeout must be a positive number of seconds")
        if not (self.shutdown_grace >= 0 and math.isfinite(self.shutdown_grace)):
            raise ValueError("ProviderConfig.shutdown_grace must be zero or more seconds")


def secret_from_env(value: str) -> bytes:
    """Turn the text of a secret setting into key bytes.

    Plain text is used as its UTF-8 bytes; ``base64:<data>`` is base64-decoded
    (standard or URL-safe alphabet, padding optional).

    Raises :class:`ValueError` when the value (or the decoded key) is empty or the
    base64 data is invalid; the message never repeats the value.

    >>> secret_from_env("base64:c2VjcmV0")
    b'secret'
    """
    if not value:
        raise ValueError("the provider secret is empty: set it to text or to base64:<data>")
    if not value.startswith(_BASE64_PREFIX):
        return value.encode("utf-8")
    data = value[len(_BASE64_PREFIX) :].strip()
    data = data.replace("-", "+").replace("_", "/")
    data += "=" * (-len(data) % 4)
    try:
        key = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "the provider secret starts with base64: but is not valid base64"
        ) from None
    if not key:
        raise ValueError("the provider secret decodes to zero bytes: give base64:<data>")
    return key
