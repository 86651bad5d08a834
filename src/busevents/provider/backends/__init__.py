"""The provider's storage backends and the factory that picks one from the configuration.

``_base`` holds the protocol every backend implements (publish, stream, probe) and the
shared types; ``_memory`` is the embedded default, ``_redis`` and ``_postgres`` the
durable ones (imported only when chosen, so the memory provider never loads their
drivers).
"""

from __future__ import annotations

from typing import Any

from .._config import ProviderConfig
from ._base import Backend
from ._memory import MemoryBackend

__all__ = ["make_backend"]


def make_backend(config: ProviderConfig) -> Backend:
    """The backend named by ``config.backend``, not yet connected (see ``Backend.running``).

    Raises :class:`ValueError` for an unknown name or a setting the backend refuses.
    """
    if config.backend == "memory":
        return MemoryBackend(
            listener_queue=config.listener_queue,
            history_limit=config.history_limit,
            listener_queue_bytes=config.listener_queue_bytes,
            history_bytes=config.history_bytes,
            max_groups=config.max_groups,
            max_groups_per_identity=config.max_groups_per_identity,
            group_idle=config.group_idle,
            idempotency_window=config.idempotency_window,
            idempotency_keys=config.idempotency_keys,
        )
    if config.backend not in ("redis", "postgres"):
        raise ValueError(
            f"unknown provider backend {config.backend!r}: known backends: memory, redis, postgres"
        )
    if config.allow_wildcards:
        raise ValueError(
            f"wildcard streams are supported by the memory backend only, not {config.backend}"
        )
    # The same bounds, meaning the same, for either durable backend.
    limits: dict[str, Any] = {
        "history_limit": config.history_limit,
        "listener_queue": config.listener_queue,
        "listener_queue_bytes": config.listener_queue_bytes,
        "max_groups": config.max_groups,
        "max_groups_per_identity": config.max_groups_per_identity,
        "group_idle": config.group_idle,
        "idempotency_window": config.idempotency_window,
    }
    if config.backend == "redis":
        from ._redis import RedisBackend

        return RedisBackend(config.redis, **limits)
    from ._postgres import PostgresBackend

    return PostgresBackend(config.postgres, **limits)
