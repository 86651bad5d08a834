"""The one reconnect loop: a stream that comes back after a drop, without duplicates.

:func:`follow_stream` is what ``bus-events listen --retry``, the workers' and
requesters' listeners (:mod:`busevents.workers._listener`) and the bench's
listeners run; :class:`RecentIds` is its bounded de-duplication window.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

import trio

from ._contracts import Delivery
from ._errors import BusEventsError, ListenerUnavailable
from ._retry import Backoff, RetryPolicy, is_retryable

if TYPE_CHECKING:
    from ._client import EventsClient
    from ._stream import EventStream

__all__ = ["DEDUPE_WINDOW", "RecentIds", "follow_stream"]

#: Ids remembered by default to skip events seen before a reconnect: with the
#: ``after`` cursor doing the bulk of the work, the window only has to cover ids a
#: cursor cannot order, and a provider that re-sends a little around it.
DEDUPE_WINDOW: Final = 10_000


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


async def follow_stream(
    client: EventsClient,
    name: str,
    consume: Callable[[EventStream], Awaitable[object]],
    *,
    policy: RetryPolicy,
    delivery: Delivery | str = Delivery.BROADCAST,
    group: str | None = None,
    consumer: str | None = None,
    replay: bool = False,
    follow: bool = True,
    after: str | None = None,
    stall_timeout: float | None = None,
    correlation_id: str | None = None,
    dedupe: int = 0,
    max_retries: int | None = None,
    on_up: Callable[[EventStream], object] | None = None,
    on_down: Callable[[EventStream], object] | None = None,
    on_retry: Callable[[BusEventsError | None, float], object] | None = None,
    on_reconnect: Callable[[BusEventsError | None], object] | None = None,
    rng: random.Random | None = None,
) -> None:
    """Stream ``name``, handing each connection's :class:`EventStream` to ``consume``;
    reconnect after a drop under ``policy``.

    The loop, once per connection:

    * open ``client.listen(name, …)``, apply the filters (``correlation_id``; with
      ``dedupe`` > 0, a :class:`RecentIds` window of that many ids shared by every
      connection), call ``on_up(stream)``, then ``await consume(stream)``, then
      ``on_down(stream)`` (also when ``consume`` raised);
    * ``consume`` returned but the stream had not ended (it stopped reading: a
      count reached, an idle timeout): return;
    * the stream ended cleanly with ``follow=False`` (a snapshot): return;
    * otherwise (a clean end of a following stream, or an error that
      :func:`is_retryable` accepts), with ``policy.enabled``: call
      ``on_retry(error or None, delay)``, sleep the backoff's delay, call
      ``on_reconnect(error or None)`` and connect again.  With retrying off: the
      error is raised, a clean end returns.

    **Resuming**: with ``replay`` (or ``after``) and broadcast delivery, a
    reconnect asks for the events *after* the last one handed out (the
    ``after=`` cursor; the stream skips up to it itself if the provider ignores
    it), so nothing is handed out twice and nothing is missed; the window
    covers ids a cursor cannot order.  Memory stays flat however long it runs.
    Without ``replay``, events published while disconnected are missed.

    The backoff resets once a connection delivered an event or stayed up
    ``policy.healthy_after`` seconds.  ``max_retries``: raise
    :class:`ListenerUnavailable` after that many reconnects in a row that
    delivered nothing.  Errors that cannot be retried (``400``, ``403``,
    ``404``, a ``401`` that refresh did not cure) are raised at once.
    """
    backoff = Backoff(policy, rng=rng or random.Random())
    unseen = RecentIds(dedupe) if dedupe > 0 else None
    cursor = after
    resume = (replay or after is not None) and Delivery.parse(delivery) is Delivery.BROADCAST
    while True:
        error: BusEventsError | None = None
        since: float | None = None
        delivered = 0
        ended = False
        try:
            async with client.listen(
                name,
                delivery=delivery,
                group=group,
                consumer=consumer,
                replay=replay,
                follow=follow,
                after=cursor if resume else None,
                stall_timeout=stall_timeout,
                correlation_id=correlation_id,
            ) as stream:
                stream.filter(unseen=unseen)
                since = trio.current_time()
                if on_up is not None:
                    on_up(stream)
                try:
                    await consume(stream)
                finally:
                    delivered = stream.events_delivered
                    if delivered:
                        cursor = stream.last_id or cursor
                    ended = stream.ended
                    if on_down is not None:
                        on_down(stream)
        except BusEventsError as exc:
            if not policy.enabled or not is_retryable(exc):
                raise
            error = exc
        if since is not None and (delivered or trio.current_time() - since >= policy.healthy_after):
            backoff.reset()
        if error is None and (not ended or not follow or not policy.enabled):
            return  # the consumer stopped, a snapshot is complete, or retrying is off
        if max_retries is not None and backoff.failures >= max_retries:
            raise ListenerUnavailable(
                f"giving up after {max_retries} reconnect(s) in a row without an event: "
                f"{error or 'the stream ended'}",
                url=client.stream_url,
                name=name,
            ) from error
        delay = backoff.next_delay(error)
        if on_retry is not None:
            on_retry(error, delay)
        await trio.sleep(delay)
        if on_reconnect is not None:
            on_reconnect(error)
