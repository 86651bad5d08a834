"""The one backoff policy: publish retries, listener reconnects and the bench use it.

* The n-th consecutive retry waits a delay drawn uniformly between
  ``min_delay`` and ``min(max_delay, min_delay * 2**n)``: full jitter above a
  floor, so that clients cut off together do not come back together, and a
  flapping provider is never hammered faster than ``min_delay``.
* A provider's ``Retry-After`` (429, 503) is honoured as a minimum delay, but
  capped at ``max_retry_after``: a hostile or confused provider must not park
  a worker for days.
* The backoff **resets** after success, or (for a following stream, which
  never "returns") once a connection delivered an event or stayed up
  ``healthy_after`` seconds.
* What is worth retrying: network and stream failures, ``5xx``, ``408`` and
  ``429``.  ``400``, ``401``, ``403``, ``404``… are answers that retrying
  cannot change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

from ._config import parse_duration
from ._errors import (
    APIError,
    BusEventsError,
    ConfigError,
    RateLimited,
    ServerError,
    StreamError,
    TransportError,
)

if TYPE_CHECKING:
    import random

__all__ = ["PUBLISH_RETRY", "Backoff", "RetryPolicy", "is_retryable"]

RETRY_ENV: Final = "BUS_EVENTS_LISTENER_RETRY"
RETRY_MIN_ENV: Final = "BUS_EVENTS_LISTENER_RETRY_MIN"
RETRY_MAX_ENV: Final = "BUS_EVENTS_LISTENER_RETRY_MAX"
REQUIRED_ENV: Final = "BUS_EVENTS_LISTENER_REQUIRED"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def env_flag(env: Mapping[str, str], key: str, default: bool) -> bool:
    """``env[key]`` as a boolean; :class:`ConfigError` naming the variable otherwise."""
    text = env.get(key, "").strip().lower()
    if not text:
        return default
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"invalid {key}={text[:20]!r}: expected 1 or 0 (true/false, yes/no, on/off)")


def env_seconds(env: Mapping[str, str], key: str, default: float) -> float:
    """``env[key]`` as a Go duration in seconds; :class:`ConfigError` naming the variable."""
    text = env.get(key, "").strip()
    if not text:
        return default
    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def is_retryable(exc: BaseException) -> bool:
    """Whether retrying could change the outcome of ``exc`` (see the module documentation)."""
    if isinstance(exc, TransportError | StreamError):
        return True
    if isinstance(exc, APIError):
        return isinstance(exc, ServerError | RateLimited) or exc.status == 408
    return False


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How to back off between attempts (see the module documentation).

    ``enabled``: retry at all.  ``min_delay``/``max_delay``: the bounds of
    every delay, in seconds.  ``required``: with ``enabled=False``, a listener
    whose connection fails or whose stream ends raises
    :class:`ListenerUnavailable`; with retrying on it keeps trying (not ready
    meanwhile) until connected.  ``healthy_after``: seconds a connection
    must stay up for the backoff to reset even without events.
    ``max_retry_after``: the longest ``Retry-After`` honoured, in seconds.

    Raises :class:`ConfigError` for a non-positive ``min_delay`` or
    ``max_delay < min_delay``.

    >>> import random
    >>> RetryPolicy(min_delay=0.5, max_delay=10).delay(3, rng=random.Random(1)) <= 4.0
    True
    """

    enabled: bool = True
    min_delay: float = 1.0
    max_delay: float = 30.0
    required: bool = False
    healthy_after: float = 10.0
    max_retry_after: float = 300.0

    def __post_init__(self) -> None:
        if not self.min_delay > 0:
            raise ConfigError(f"the retry minimum delay must be positive, not {self.min_delay}")
        if not self.max_delay >= self.min_delay:
            raise ConfigError(
                f"the retry maximum delay ({self.max_delay}s) is below "
                f"its minimum ({self.min_delay}s)"
            )
        if not self.healthy_after >= 0:
            raise ConfigError(f"healthy_after must not be negative, not {self.healthy_after}")
        if not self.max_retry_after >= 0:
            raise ConfigError(f"max_retry_after must not be negative, not {self.max_retry_after}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> RetryPolicy:
        """The listener policy of the environment, with ``overrides`` applied.

        ``BUS_EVENTS_LISTENER_RETRY`` (default 1), ``BUS_EVENTS_LISTENER_RETRY_MIN``
        (default ``1s``), ``BUS_EVENTS_LISTENER_RETRY_MAX`` (default ``30s``; Go
        durations) and ``BUS_EVENTS_LISTENER_REQUIRED`` (default 0).  Raises
        :class:`ConfigError` naming the variable that holds an invalid value.
        """
        env = os.environ if env is None else env
        policy = cls(
            enabled=env_flag(env, RETRY_ENV, True),
            min_delay=env_seconds(env, RETRY_MIN_ENV, 1.0),
            max_delay=env_seconds(env, RETRY_MAX_ENV, 30.0),
            required=env_flag(env, REQUIRED_ENV, False),
        )
        return replace(policy, **overrides) if overrides else policy

    def delay(
        self,
        attempt: int,
        *,
        rng: random.Random | None = None,
        retry_after: float | None = None,
    ) -> float:
        """The delay before retry number ``attempt`` (1 for the first retry), in seconds.

        ``retry_after`` (the provider's ``Retry-After``) raises the delay to at
        least that, capped at ``max_retry_after``.
        """
        ceiling = min(self.max_delay, self.min_delay * 2.0 ** min(attempt, 64))
        if rng is None:
            import random  # at the first retry: a publish that succeeds need not load it

            uniform = random.uniform
        else:
            uniform = rng.uniform
        delay = uniform(self.min_delay, ceiling)
        if retry_after:
            delay = max(delay, min(retry_after, self.max_retry_after))
        return delay


#: The backoff of publish retries.
PUBLISH_RETRY: Final = RetryPolicy(min_delay=0.5, max_delay=10.0)


class Backoff:
    """The state of one retry loop under a :class:`RetryPolicy`.

    ``next_delay(error)`` counts a failure and gives the wait before the next
    attempt (honouring the error's ``retry_after``); ``reset()`` after a success.
    """

    __slots__ = ("failures", "policy", "rng")

    def __init__(self, policy: RetryPolicy, *, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.rng = rng
        self.failures = 0

    def next_delay(self, error: BusEventsError | None = None) -> float:
        self.failures += 1
        retry_after = error.retry_after if isinstance(error, APIError) else None
        return self.policy.delay(self.failures, rng=self.rng, retry_after=retry_after)

    def reset(self) -> None:
        self.failures = 0
