"""Listener retry and readiness: a stream that reconnects, and a way to tell it is up.

The policy (spec §6), shared by workers and requesters:

* **Reconnect** after the stream ends or the network fails, with the one
  backoff policy of :mod:`busevents._retry` (full jitter above a floor, a cap,
  ``Retry-After`` honoured but capped).
* The backoff **resets** once a connection has delivered an event or stayed
  up ``healthy_after`` seconds: a following stream never "returns", so a
  backoff that reset only on success would never reset.
* **Fail fast** on answers that retrying cannot change: ``400``, ``403``,
  ``404``…, and a ``401`` that token refresh could not cure (refresh off, a
  token that cannot be re-read, or a re-read token that did not change; the
  client itself renews and re-sends once, see ``BUS_EVENTS_TOKEN_REFRESH``)
  propagate at once.  ``5xx``, ``408``, ``429`` and every transport or stream
  error are retried.
* **Readiness** is false until the stream is established (its response
  headers arrived: the provider has subscribed it), and false again as soon
  as the stream ends, before any reconnect.
* **Required** (``BUS_EVENTS_LISTENER_REQUIRED=1``) decides what happens when
  the stream cannot be had, depending on retrying:

  - with retrying on (``BUS_EVENTS_LISTENER_RETRY=1``, upstream's production
    pair): start-up order does not matter.  A listener whose Events API is
    not up yet keeps trying with the backoff, reports not ready meanwhile,
    becomes ready once connected and stays up; only a fatal answer ends it.
  - with retrying off: :class:`ListenerUnavailable` as soon as the first
    connection fails or the stream ends (fail fast).

  Listeners that are not required behave the same with retrying on; with it
  off they log and stop quietly.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from .._contracts import Delivery
from .._errors import BusEventsError, ListenerUnavailable
from .._reconnect import RecentIds, follow_stream
from .._retry import REQUIRED_ENV, RETRY_ENV, RetryPolicy, is_retryable

if TYPE_CHECKING:
    from .._client import EventsClient
    from .._stream import EventStream
    from ._observe import WorkerObserver

__all__ = ["Readiness", "RecentIds", "listen_with_retry"]

log = logging.getLogger("busevents.worker")


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

    def child(self) -> Readiness:
        """A new component; this readiness is ready only when all its components are."""
        part = Readiness()
        part._parent = self
        self._parts.append(part)
        self._update()
        return part

    def detach(self) -> None:
        """Stop counting this component in its parent (its listener is gone for good)."""
        parent, self._parent = self._parent, None
        if parent is not None:
            parent._parts.remove(self)
            parent._update()

    def set_up(self, up: bool) -> None:
        """Report a leaf's own stream as established (True) or not (False)."""
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


def _why(error: BaseException | None) -> str:
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
    observer: WorkerObserver | None = None,
) -> None:
    """Stream ``name`` for ever, handing each connection's stream to ``consume``.

    ``readiness`` (a leaf) is set while a stream is open.  Returns only when
    retrying is off and the listener is not required; raises what cannot be
    retried (see the module documentation) and :class:`ListenerUnavailable`.
    ``observer`` hears of the stream going up and down and of each reconnect.
    The loop itself is :func:`busevents.follow_stream`'s; this adds readiness,
    logs and the ``required`` rule of retrying off.
    """
    who = f"listener {name}" + (f" ({label})" if label else "")
    connected_once = False

    def up(stream: EventStream) -> None:
        readiness.set_up(True)
        if observer is not None:
            observer.stream_up(label, name, True)
        log.info("%s: %s", who, "reconnected" if connected_once else "connected")

    def down(stream: EventStream) -> None:
        nonlocal connected_once
        connected_once = True
        readiness.set_up(False)
        if observer is not None:
            observer.stream_up(label, name, False)

    def retrying(error: BusEventsError | None, delay: float) -> None:
        log.warning(
            "%s: %s; %s in %.2fs",
            who,
            _why(error),
            "reconnecting" if connected_once else "not connected yet, retrying",
            delay,
        )
        if observer is not None:
            observer.backing_off(label, name, error, delay)

    def reconnecting(error: BusEventsError | None) -> None:
        if observer is not None:
            observer.reconnecting(label, name, error)

    error: BusEventsError | None = None
    try:
        await follow_stream(
            client,
            name,
            consume,
            policy=policy,
            delivery=delivery,
            group=group,
            consumer=consumer,
            replay=replay,
            stall_timeout=stall_timeout,
            on_up=up,
            on_down=down,
            on_retry=retrying,
            on_reconnect=reconnecting,
            rng=rng,
        )
    except BusEventsError as exc:
        if policy.enabled or not is_retryable(exc):
            raise
        error = exc
    # Retrying is off and the stream ended or failed.
    if policy.required:
        raise ListenerUnavailable(
            f"{who}: {_why(error)}; retrying is off ({RETRY_ENV}=0) and the "
            f"listener is required ({REQUIRED_ENV}=1)",
            url=client.stream_url,
            name=name,
        ) from error
    log.warning("%s: %s; retrying is off (%s=0): not reconnecting", who, _why(error), RETRY_ENV)
