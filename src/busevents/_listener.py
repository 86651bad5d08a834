"""Listener retry and readiness: a stream that reconnects, and a way to tell it is up.

The policy (spec §6), shared by workers and requesters:

* **Reconnect** after the stream ends or the network fails.  The n-th
  consecutive retry waits a delay drawn uniformly between ``min_delay`` and
  ``min(max_delay, min_delay * 2**n)``: full jitter above a floor, so that
  listeners cut off together do not come back together, and a flapping
  provider is never hammered faster than ``min_delay``.
* The backoff **resets** once a connection has delivered an event or stayed
  up ``healthy_after`` seconds: a following stream never "returns", so a
  backoff that reset only on success would never reset.
* **Fail fast** on answers that retrying cannot change: ``401``, ``403``,
  ``400``, ``404``… propagate at once.  ``5xx``, ``408``, ``429`` and every
  transport or stream error are retried; a ``429``'s ``Retry-After`` is
  honoured as a minimum delay.
* **Readiness** is false until the stream is established (its response
  headers arrived: the provider has subscribed it), and false again as soon
  as the stream ends, before any reconnect.
* **Required** listeners (``BUS_EVENTS_LISTENER_REQUIRED=1``) raise
  :class:`ListenerUnavailable` when their first connection fails, or when
  their stream ends with retrying turned off.  Other listeners log and keep
  trying (or, with retrying off, stop quietly).
"""

from __future__ import annotations

import logging
import os
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

import trio

from ._config import parse_duration
from ._contracts import Delivery
from ._errors import (
    APIError,
    BusEventsError,
    ConfigError,
    ListenerUnavailable,
    RateLimited,
    ServerError,
    StreamError,
    TransportError,
)

if TYPE_CHECKING:
    from ._client import EventsClient, EventStream

__all__ = ["Readiness", "RetryPolicy", "listen_with_retry"]

log = logging.getLogger("busevents.worker")

RETRY_ENV: Final = "BUS_EVENTS_LISTENER_RETRY"
RETRY_MIN_ENV: Final = "BUS_EVENTS_LISTENER_RETRY_MIN"
RETRY_MAX_ENV: Final = "BUS_EVENTS_LISTENER_RETRY_MAX"
REQUIRED_ENV: Final = "BUS_EVENTS_LISTENER_REQUIRED"
#: The longest ``Retry-After`` honoured, in seconds: a hostile or confused
#: provider must not park a worker for days.
MAX_RETRY_AFTER: Final = 3600.0

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _parse_flag(env: Mapping[str, str], key: str, default: bool) -> bool:
    text = env.get(key, "").strip().lower()
    if not text:
        return default
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"invalid {key}={text[:20]!r}: expected 1 or 0 (true/false, yes/no, on/off)")


def _parse_seconds(env: Mapping[str, str], key: str, default: float) -> float:
    text = env.get(key, "").strip()
    if not text:
        return default
    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a listener reconnects (see the module documentation).

    ``enabled``: reconnect at all.  ``min_delay``/``max_delay``: the bounds of
    every delay, in seconds.  ``required``: the listener must connect (its
    first attempt must succeed, and with ``enabled=False`` its stream must not
    end), else :class:`ListenerUnavailable`.  ``healthy_after``: seconds a
    connection must stay up for the backoff to reset even without events.

    Raises :class:`ConfigError` for a non-positive ``min_delay`` or
    ``max_delay < min_delay``.

    >>> RetryPolicy(min_delay=0.5, max_delay=10).delay(3, rng=random.Random(1)) <= 4.0
    True
    """

    enabled: bool = True
    min_delay: float = 1.0
    max_delay: float = 30.0
    required: bool = False
    healthy_after: float = 10.0

    def __post_init__(self) -> None:
        if not self.min_delay > 0:
            raise ConfigError(f"the listener retry minimum must be positive, not {self.min_delay}")
        if not self.max_delay >= self.min_delay:
            raise ConfigError(
                f"the listener retry maximum ({self.max_delay}s) is below "
                f"its minimum ({self.min_delay}s)"
            )
        if not self.healthy_after >= 0:
            raise ConfigError(f"healthy_after must not be negative, not {self.healthy_after}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> RetryPolicy:
        """The policy of the environment contract (spec §6), with ``overrides`` applied.

        ``BUS_EVENTS_LISTENER_RETRY`` (default 1), ``BUS_EVENTS_LISTENER_RETRY_MIN``
        (default ``1s``), ``BUS_EVENTS_LISTENER_RETRY_MAX`` (default ``30s``; Go
        durations) and ``BUS_EVENTS_LISTENER_REQUIRED`` (default 0).  Raises
        :class:`ConfigError` naming the variable that holds an invalid value.
        """
        env = os.environ if env is None else env
        policy = cls(
            enabled=_parse_flag(env, RETRY_ENV, True),
            min_delay=_parse_seconds(env, RETRY_MIN_ENV, 1.0),
            max_delay=_parse_seconds(env, RETRY_MAX_ENV, 30.0),
            required=_parse_flag(env, REQUIRED_ENV, False),
        )
        return replace(policy, **overrides) if overrides else policy

    def delay(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """The delay before retry number ``attempt`` (1 for the first retry), in seconds."""
        ceiling = min(self.max_delay, self.min_delay * 2.0 ** min(attempt, 64))
        uniform = rng.uniform if rng is not None else random.uniform
        return uniform(self.min_delay, ceiling)


class Readiness:
    """Whether listeners are connected: ``is_ready``, ``await wait()``.

    Like a :class:`trio.Event` that can be cleared: false until every listener
    it covers has established its stream, false again while any of them
    reconnects.  A worker's readiness covers its streams, a host's its
    workers'.  Readiness objects are made by the functions that take them
    (:func:`run_worker`, :class:`WorkerHost`, :func:`open_requester`); pass one
    in to observe them.
    """

    __slots__ = ("_changed", "_parent", "_parts", "_ready", "_up")

    def __init__(self) -> None:
        self._up = False  # a leaf's own state, set by its listener
        self._ready = False
        self._parts: list[Readiness] = []
        self._parent: Readiness | None = None
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return f"<Readiness {'ready' if self._ready else 'not ready'}>"

    @property
    def is_ready(self) -> bool:
        """True while every covered stream is established."""
        return self._ready

    async def wait(self) -> None:
        """Return once ready (at once if ready now)."""
        await trio.lowlevel.checkpoint()
        while not self._ready:
            await self._changed.wait()

    async def wait_not_ready(self) -> None:
        """Return once not ready (at once if not ready now)."""
        await trio.lowlevel.checkpoint()
        while self._ready:
            await self._changed.wait()

    def _part(self) -> Readiness:
        """A new component; this readiness is ready only when all its components are."""
        part = Readiness()
        part._parent = self
        self._parts.append(part)
        self._update()
        return part

    def _remove(self) -> None:
        """Stop counting this component in its parent (its listener is gone for good)."""
        parent, self._parent = self._parent, None
        if parent is not None:
            parent._parts.remove(self)
            parent._update()

    def _set(self, up: bool) -> None:
        self._up = up
        self._update()

    def _update(self) -> None:
        ready = all(p._ready for p in self._parts) if self._parts else self._up
        if ready == self._ready:
            return
        self._ready = ready
        # A trio.Event cannot be cleared: wake the waiters and start a new one.
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        if self._parent is not None:
            self._parent._update()


class RecentIds:
    """The last ``size`` event ids seen: a bounded de-duplication window."""

    __slots__ = ("_ids", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def seen(self, event_id: str) -> bool:
        """Remember ``event_id``; True when it was already in the window."""
        if event_id in self._ids:
            return True
        if self.size:
            self._ids[event_id] = None
            if len(self._ids) > self.size:
                self._ids.popitem(last=False)
        return False


def _retryable(exc: BusEventsError) -> bool:
    if isinstance(exc, TransportError | StreamError):
        return True
    if isinstance(exc, APIError):
        return isinstance(exc, ServerError | RateLimited) or exc.status == 408
    return False


def _reason(error: BaseException | None) -> str:
    return str(error) if error is not None else "the stream ended"


async def listen_with_retry(
    client: EventsClient,
    name: str,
    consume: Callable[[EventStream], Awaitable[None]],
    *,
    readiness: Readiness,
    policy: RetryPolicy,
    delivery: Delivery = Delivery.BROADCAST,
    group: str | None = None,
    consumer: str | None = None,
    replay: bool = False,
    stall_timeout: float | None = None,
    label: str = "",
    rng: random.Random | None = None,
) -> None:
    """Stream ``name`` for ever, handing each connection's stream to ``consume``.

    ``readiness`` (a leaf) is set while a stream is open.  Returns only when
    retrying is off and the listener is not required; raises what cannot be
    retried (see the module documentation) and :class:`ListenerUnavailable`.
    """
    rng = rng or random.Random()
    who = f"listener {name}" + (f" ({label})" if label else "")
    failures = 0
    connected_once = False
    while True:
        error: BusEventsError | None = None
        since: float | None = None
        delivered = 0
        try:
            async with client.listen(
                name,
                delivery=delivery,
                group=group,
                consumer=consumer,
                replay=replay,
                stall_timeout=stall_timeout,
            ) as stream:
                since = trio.current_time()
                readiness._set(True)
                log.info("%s: %s", who, "reconnected" if connected_once else "connected")
                try:
                    await consume(stream)
                finally:
                    readiness._set(False)
                    delivered = stream.events_received
        except BusEventsError as exc:
            if not _retryable(exc):
                raise
            error = exc
        if since is not None:
            connected_once = True
            if delivered or trio.current_time() - since >= policy.healthy_after:
                failures = 0
        if not policy.enabled:
            if policy.required:
                raise ListenerUnavailable(
                    f"{who}: {_reason(error)}; retrying is off ({RETRY_ENV}=0) and the "
                    f"listener is required ({REQUIRED_ENV}=1)",
                    url=client.stream_url,
                    name=name,
                ) from error
            log.warning(
                "%s: %s; retrying is off (%s=0): not reconnecting", who, _reason(error), RETRY_ENV
            )
            return
        if not connected_once and policy.required:
            raise ListenerUnavailable(
                f"{who}: cannot connect ({_reason(error)}) and the listener is required "
                f"({REQUIRED_ENV}=1)",
                url=client.stream_url,
                name=name,
            ) from error
        failures += 1
        delay = policy.delay(failures, rng=rng)
        if isinstance(error, RateLimited) and error.retry_after:
            delay = max(delay, min(error.retry_after, MAX_RETRY_AFTER))
        log.warning("%s: %s; reconnecting in %.2fs", who, _reason(error), delay)
        await trio.sleep(delay)
