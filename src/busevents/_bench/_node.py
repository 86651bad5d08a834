"""The participants of a bench run in one process: publisher and listener tasks.

:class:`Node` holds one process's share of a run's publishers and listeners
and the counters they keep; :mod:`busevents._bench` drives it in this
process, :mod:`busevents._bench._procs` in worker processes.

Each payload carries the run id, the publisher id, a per-publisher sequence
number and the wall-clock send time (``time.time_ns()``, so that processes
agree), padded to the plan's ``payload_size`` bytes::

    {"run":"5f0c2a9e1b7d","pub":3,"seq":41,"sent_ns":1712345678901234567,"warmup":false,"pad":"…"}

Each listener tallies every (publisher, sequence) it gets — a unicast group's
consumers share one tally — which after the run gives loss and duplication;
re-ordering is counted per consumer as it happens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Final

import msgspec
import trio

from .._client import EventsClient
from .._contracts import Delivery, Event, PublishRequest
from .._errors import APIError, StreamError, TransportError
from .._reconnect import follow_stream
from .._retry import Backoff, RetryPolicy, is_retryable
from .._stream import EventStream
from ._report import BenchPlan, ListenerResult, PartResult, PublisherResult
from ._stats import Recorder, Tally

__all__ = ["Node", "Progress"]

#: Statuses below 500 after which publishing again can succeed; any other
#: (a redirect, 400, 401, 403, 404, 413, …) would fail every time: the run stops.
#: A load generator pauses briefly after a failure: it measures, it must not hammer.
PUBLISH_BACKOFF: Final = RetryPolicy(min_delay=0.05, max_delay=1.0)
#: A bench listener does not reconnect: a broken stream is a result of the run.
NO_RECONNECT: Final = RetryPolicy(enabled=False)


class Progress(msgspec.Struct, kw_only=True):
    """A snapshot of a running bench, for the live progress line and for draining.

    ``sent``/``received`` include warmup events; ``receivers`` holds the
    distinct events each receiver has (one entry per broadcast listener, one
    for a unicast group), ``ended`` the receivers that can get no more.
    ``last_receive_ns`` is the wall-clock time of the latest arrival.
    """

    phase: str = "opening"
    sent: int = 0
    errors: int = 0
    received: int = 0
    receivers: list[int] = msgspec.field(default_factory=list)
    ended: int = 0
    in_doubt: int = 0
    last_receive_ns: int = 0


class _Probe(msgspec.Struct, gc=False):
    """The part of a bench payload a listener reads (the padding is skipped)."""

    run: str
    pub: int
    seq: int
    sent_ns: int
    warmup: bool = False


class _Publisher:
    __slots__ = ("budget", "id", "latency", "result")

    def __init__(self, id: int, budget: int | None) -> None:
        self.id = id
        self.budget = budget
        self.latency = Recorder()
        self.result = PublisherResult(id=id)


class _Listener:
    __slots__ = ("id", "last_seq", "latency", "result", "tally")

    def __init__(self, id: int, tally: Tally) -> None:
        self.id = id
        self.tally = tally
        self.last_seq: dict[int, int] = {}
        self.latency = Recorder()
        self.result = ListenerResult(id=id)


def _share(total: int, index: int, parts: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


class Node:
    """The publishers and listeners of one process: all of them, or a worker's share.

    Participant ``i`` belongs to part ``i % parts``.  Drive it in this order:
    :meth:`run_listeners` (``nursery.start``: returns once every stream is
    open), :meth:`publish`, then :meth:`stop_listeners`; :meth:`progress` and
    :meth:`result` may be called at any time (a partial result after a cancel).
    """

    def __init__(self, plan: BenchPlan, run_id: str, part: int = 0, parts: int = 1) -> None:
        self.plan = plan
        self.run_id = run_id
        self.part = part
        self.phase = "opening"
        self.measure_start_ns = 0
        self.publish_end_ns = 0
        events = plan.events
        self.publishers = [
            _Publisher(i, None if events is None else _share(events, i, plan.publishers))
            for i in range(part, plan.publishers, parts)
        ]
        unicast = plan.delivery is Delivery.UNICAST
        self.group_tally = Tally() if unicast else None
        self.listeners = [
            _Listener(i, self.group_tally or Tally()) for i in range(part, plan.listeners, parts)
        ]
        self._listeners_scope: trio.CancelScope | None = None
        self._last_receive_ns = 0
        self._decode_probe = msgspec.json.Decoder(_Probe).decode
        self._pad = b"x" * plan.payload_size

    # -- listening -----------------------------------------------------------

    async def run_listeners(
        self, client: EventsClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open every listener's stream, report started, then receive until stopped."""
        opened = 0
        all_open = trio.Event()

        def one_open() -> None:
            nonlocal opened
            opened += 1
            if opened == len(self.listeners):
                all_open.set()

        async with trio.open_nursery() as nursery:
            self._listeners_scope = nursery.cancel_scope
            for listener in self.listeners:
                nursery.start_soon(self._listen, client, listener, one_open)
            if self.listeners:
                await all_open.wait()
            task_status.started()

    def stop_listeners(self) -> None:
        """End every stream (the events still on their way are not waited for)."""
        if self._listeners_scope is not None:
            self._listeners_scope.cancel()

    async def _listen(
        self, client: EventsClient, listener: _Listener, opened: Callable[[], None]
    ) -> None:
        plan = self.plan
        up: list[bool] = []

        def on_up(_stream: EventStream) -> None:
            up.append(True)
            opened()

        try:
            # The one listen loop of the SDK, with retrying off: a bench measures the
            # stream it opened, and a stream that breaks ends the listener.
            await follow_stream(
                client,
                plan.name,
                partial(self._receive, listener=listener),
                policy=NO_RECONNECT,
                delivery=plan.delivery,
                group=plan.group,
                consumer=f"bench-{listener.id}",
                on_up=on_up,
            )
        except (StreamError, TransportError) as exc:
            if not up:
                raise  # the stream could not be opened: the run cannot measure
            listener.result.ended_early = f"its stream broke: {exc}"
        else:
            listener.result.ended_early = (
                "the provider ended its stream (a slow consumer disconnected?)"
            )

    async def _receive(self, stream: EventStream, listener: _Listener) -> None:
        decode, run_id, delay = self._decode_probe, self.run_id, self.plan.listener_delay
        result, tally, last_seq = listener.result, listener.tally, listener.last_seq
        record = listener.latency.append
        batch: list[Event]
        async for batch in stream.batches():
            now = time.time_ns()
            self._last_receive_ns = now
            for event in batch:
                try:
                    probe = decode(event.payload)
                except msgspec.MsgspecError:
                    result.foreign += 1
                    continue
                if probe.run != run_id or probe.seq < 0:  # a negative seq would index from the end
                    result.foreign += 1
                    continue
                pub, seq = probe.pub, probe.seq
                seen = tally.note(pub, seq)
                # Re-ordering is per consumer: in unicast each gets a subsequence.
                if seq > last_seq.get(pub, -1):
                    last_seq[pub] = seq
                elif not seen:
                    result.out_of_order += 1
                if probe.warmup:
                    result.warmup_received += 1
                else:
                    result.received += 1
                    result.last_ns = now
                    record((now - probe.sent_ns) // 1000)
            listener.latency.maybe_flush()
            if delay:
                await trio.sleep(delay)

    # -- publishing ----------------------------------------------------------

    async def publish(self, client: EventsClient, start: float, start_ns: int) -> None:
        """Publish from every publisher, from trio time ``start`` (wall clock ``start_ns``).

        Returns when every publisher has spent its budget or the deadline
        passed.  A 5xx or a network failure is counted and publishing goes on
        (the event is *in doubt*: it may have been stored); a 408 or 429 is
        counted and the event tried again after a pause (``Retry-After``).
        Any other error status would fail every time: its :class:`APIError`
        is raised.
        """
        plan = self.plan
        warmup_end = start + plan.warmup
        self.measure_start_ns = start_ns + int(plan.warmup * 1e9)
        deadline = warmup_end + plan.duration if plan.duration is not None else float("inf")
        await trio.sleep_until(start)
        self.phase = "warmup" if plan.warmup else "measuring"
        try:
            async with trio.open_nursery() as nursery:
                for publisher in self.publishers:
                    nursery.start_soon(
                        self._publish_one, client, publisher, start, warmup_end, deadline
                    )
                if plan.warmup:
                    await trio.sleep_until(warmup_end)
                    self.phase = "measuring"
        finally:
            self.publish_end_ns = time.time_ns()
        self.phase = "draining"

    async def _publish_one(
        self,
        client: EventsClient,
        publisher: _Publisher,
        start: float,
        warmup_end: float,
        deadline: float,
    ) -> None:
        plan, result = self.plan, publisher.result
        head = b'{"run":"%s","pub":%d,"seq":%%d,"sent_ns":%%d,"warmup":%%s,"pad":"' % (
            self.run_id.encode(),
            publisher.id,
        )
        interval = 0.0
        next_send = start
        if plan.rate is not None:
            # Publishers take turns so that together they send evenly, not in bursts.
            interval = plan.publishers / plan.rate
            next_send = start + publisher.id / plan.rate
        record = publisher.latency.append
        backoff = Backoff(PUBLISH_BACKOFF)
        key_prefix = f"{self.run_id}.{publisher.id}."
        # An event whose publish failed ambiguously (5xx, network failure) is sent again,
        # with the same Idempotency-Key, until it is accepted: a provider that honours
        # keys stores it once.  ``retry`` holds it meanwhile: (seq, body, warmup, began).
        retry: tuple[int, bytes, bool, int] | None = None
        # result.next_seq is the sequence number of the next event: it moves on
        # when an event was (or may have been) stored, so a partial result is exact.
        try:
            while True:
                if interval:
                    await trio.sleep_until(min(next_send, deadline))
                    next_send += interval
                now = trio.current_time()
                if retry is not None:
                    seq, body, warmup, began = retry
                    if now >= deadline:
                        break
                else:
                    warmup = now < warmup_end
                    if now >= deadline or (not warmup and result.attempted == publisher.budget):
                        break
                    seq = result.next_seq
                    sent_ns = time.time_ns()
                    body = head % (seq, sent_ns, b"true" if warmup else b"false")
                    body += self._pad[: max(0, plan.payload_size - len(body) - 2)] + b'"}'
                    if not warmup:
                        result.attempted += 1
                    began = time.perf_counter_ns()
                request = PublishRequest(plan.name, msgspec.Raw(body))
                try:
                    await client.publish(request, idempotency_key=key_prefix + str(seq))
                except APIError as exc:
                    if not is_retryable(exc):
                        raise
                    _count(result.errors, str(exc.status))
                    if exc.status >= 500:  # it may have been stored before the failure
                        retry = (seq, body, warmup, began)
                    # 408, 429: not stored, so the number is used again
                    await trio.sleep(backoff.next_delay(exc))
                    continue
                except TransportError as exc:
                    _count(result.errors, type(exc).__name__.lower())
                    retry = (seq, body, warmup, began)
                    await trio.sleep(backoff.next_delay(exc))  # a refused connection fails at once
                    continue
                retry = None
                backoff.reset()
                result.next_seq += 1
                if warmup:
                    result.warmup_accepted += 1
                else:
                    result.accepted += 1
                    result.last_ns = time.time_ns()
                    record((time.perf_counter_ns() - began) // 1000)
                    publisher.latency.maybe_flush()
        finally:
            if retry is not None:  # never answered: it may or may not be stored
                result.in_doubt.append(retry[0])
                result.next_seq += 1

    # -- state ---------------------------------------------------------------

    @property
    def accepted(self) -> int:
        """Events this part's publishers got accepted, warmup included."""
        return sum(p.result.accepted + p.result.warmup_accepted for p in self.publishers)

    def progress(self) -> Progress:
        """The current counts."""
        pubs = [p.result for p in self.publishers]
        listeners = [li.result for li in self.listeners]
        if self.group_tally is not None:
            receivers = [self.group_tally.unique] if self.listeners else []
            ended = int(bool(listeners) and all(li.ended_early for li in listeners))
        else:
            receivers = [li.tally.unique for li in self.listeners]
            ended = sum(1 for li in listeners if li.ended_early)
        return Progress(
            phase=self.phase,
            sent=sum(p.accepted + p.warmup_accepted for p in pubs),
            errors=sum(sum(p.errors.values()) for p in pubs),
            received=sum(li.received + li.warmup_received for li in listeners),
            receivers=receivers,
            ended=ended,
            in_doubt=sum(len(p.in_doubt) for p in pubs),
            last_receive_ns=self._last_receive_ns,
        )

    def result(self) -> PartResult:
        """Everything this part measured, ready to merge (partial if still running)."""
        for publisher in self.publishers:
            publisher.result.latency = publisher.latency.encode()
            publisher.result.latency_sum_us = publisher.latency.total
        for listener in self.listeners:
            listener.result.latency = listener.latency.encode()
            listener.result.latency_sum_us = listener.latency.total
            if self.group_tally is None:
                listener.result.tally = listener.tally.packed()
        return PartResult(
            part=self.part,
            publishers=[p.result for p in self.publishers],
            listeners=[li.result for li in self.listeners],
            group_tally=self.group_tally.packed() if self.group_tally is not None else None,
            measure_start_ns=self.measure_start_ns,
            publish_end_ns=self.publish_end_ns,
        )


def _count(counter: dict[str, int], key: str) -> None:
    counter[key] = counter.get(key, 0) + 1
