"""The worker loop: run a :class:`Worker`'s handler for each event it streams.

:func:`run_worker` opens one reconnecting stream per event name (see
:mod:`busevents._listener` for the retry and readiness policy) and runs the
handler for each event in its own task, at most ``worker.concurrency`` at a
time.  Policies:

* **Handler errors** are logged on the ``busevents.worker`` logger with the
  worker, the event name and id, and the traceback; the loop goes on.  With
  ``stop_on_error`` the first error stops the worker: no more events are
  read, in-flight handlers get the grace period, then :class:`HandlerError`
  is raised from the handler's exception.
* **Back-pressure**: while ``concurrency`` handlers run, the stream is not
  read further (the provider and TCP hold what comes next).
* **Cancellation**: when the worker is cancelled (or stops), its streams
  close at once; in-flight handlers get ``grace_period`` seconds to finish
  (they are shielded from the cancellation until then) and are cancelled
  after it.  Nothing is left running when :func:`run_worker` returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .._contracts import (
    EVENT_ORIGIN_KEYS,
    ORIGIN_PREFIX,
    Accepted,
    Delivery,
    Event,
    Handler,
    Publisher,
)
from .._errors import BusEventsError, ConfigError, HandlerError, bounded_text
from .._groups import single_error
from .._retry import RetryPolicy
from ._listener import Readiness, RecentIds, listen_with_retry
from ._observe import WorkerObserver, log_context, push_log_context

if TYPE_CHECKING:
    from .._client import EventsClient
    from .._stream import EventStream

__all__ = ["ClientPublisher", "Drain", "Worker", "run_worker"]

log = logging.getLogger("busevents.worker")


@dataclass(frozen=True, slots=True, init=False)
class Worker:
    """A worker declared as data: which events it handles, how, and with what.

    ``names``: one event name or several; one stream is opened per name.
    ``handler``: ``async def handle(event, publisher) -> None``.
    ``delivery``/``group``/``consumer``/``replay``: the stream options of
    :meth:`EventsClient.listen` (``group`` needs unicast delivery).
    ``concurrency``: most handlers running at once, across all names; the
    stream is not read further while that many are in flight.
    ``stop_on_error``: a handler exception stops the worker (``HandlerError``)
    instead of being logged and skipped.
    ``grace_period``: seconds in-flight handlers get to finish when the worker
    is cancelled or stops, before they are cancelled.
    ``dedup_window``: how many recent event ids are remembered, so that a
    listener reconnecting with ``replay`` never hands an event to the handler
    twice (used only with ``replay``).
    ``stall_timeout``: seconds without any byte after which a stream counts as
    dead and is reconnected (a few provider keep-alive intervals), ``None`` to
    rely on TCP keep-alive.
    ``retry``: the reconnect policy; ``None`` reads it from the environment
    when the worker starts (``RetryPolicy.from_env``).
    ``label``: the name used in logs (default: the handler's name).

    Raises :class:`ConfigError` for inconsistent values.

    >>> Worker("example.echo", echo, delivery="unicast", group="echo")  # doctest: +SKIP
    """

    names: tuple[str, ...]
    handler: Handler
    delivery: Delivery
    group: str | None
    consumer: str | None
    replay: bool
    concurrency: int
    stop_on_error: bool
    grace_period: float
    dedup_window: int
    stall_timeout: float | None
    retry: RetryPolicy | None
    label: str

    def __init__(
        self,
        names: str | Iterable[str],
        handler: Handler,
        *,
        delivery: Delivery | str = Delivery.BROADCAST,
        group: str | None = None,
        consumer: str | None = None,
        replay: bool = False,
        concurrency: int = 16,
        stop_on_error: bool = False,
        grace_period: float = 10.0,
        dedup_window: int = 10_000,
        stall_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        label: str | None = None,
    ) -> None:
        names = (names,) if isinstance(names, str) else tuple(names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError("a Worker needs at least one non-empty event name")
        if len(set(names)) != len(names):
            raise ConfigError(f"a Worker lists an event name twice: {', '.join(names)}")
        delivery = Delivery.parse(delivery)
        if group is not None and delivery is not Delivery.UNICAST:
            raise ConfigError("a Worker group needs delivery='unicast'")
        if concurrency < 1:
            raise ConfigError(f"Worker concurrency must be at least 1, not {concurrency}")
        if not grace_period >= 0:
            raise ConfigError(f"Worker grace_period must not be negative, not {grace_period}")
        if dedup_window < 0:
            raise ConfigError(f"Worker dedup_window must not be negative, not {dedup_window}")
        if stall_timeout is not None and not stall_timeout > 0:
            raise ConfigError(f"Worker stall_timeout must be positive, not {stall_timeout}")
        if not callable(handler):
            raise ConfigError(f"a Worker handler must be an async callable, not {handler!r}")
        if label is None:
            label = getattr(handler, "__qualname__", None) or type(handler).__name__
        values = {
            "names": names,
            "handler": handler,
            "delivery": delivery,
            "group": group,
            "consumer": consumer,
            "replay": replay,
            "concurrency": concurrency,
            "stop_on_error": stop_on_error,
            "grace_period": float(grace_period),
            "dedup_window": dedup_window,
            "stall_timeout": stall_timeout,
            "retry": retry,
            "label": label,
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)  # frozen: __setattr__ refuses


class ClientPublisher:
    """The :class:`Publisher` that handlers get: publishes through an :class:`EventsClient`.

    ``reply`` keeps the request's ``correlationId`` (its event id when it has
    none, so that a requester can still match it), copies its ``bus.origin.*``
    metadata and publishes on behalf of its ``identity_id`` (honoured for
    service tokens only).  ``reply_error`` publishes an error response: the
    payload ``{"error": code, "message": message, ...details}``.
    """

    __slots__ = ("client",)

    def __init__(self, client: EventsClient) -> None:
        self.client = client

    async def send(
        self,
        name: str,
        payload: Any = None,
        *,
        correlation_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Accepted:
        """Publish any event (see :meth:`EventsClient.send`)."""
        return await self.client.send(
            name, payload, correlation_id=correlation_id, metadata=metadata
        )

    async def reply(
        self,
        request: Event,
        name: str,
        payload: Any = None,
        *,
        metadata: dict[str, str] | None = None,
    ) -> Accepted:
        """Publish the response ``name`` to ``request``; ``metadata`` adds to the origin keys."""
        origin = {
            k: v
            for k, v in (request.metadata or {}).items()
            if k.startswith(ORIGIN_PREFIX) and k not in EVENT_ORIGIN_KEYS
        }
        merged = {**origin, **(metadata or {})}
        return await self.client.send(
            name,
            payload,
            correlation_id=request.correlation_id or request.id,
            metadata=merged or None,
            identity_id=request.identity_id,
        )

    async def reply_error(
        self,
        request: Event,
        name: str,
        code: str,
        message: str = "",
        *,
        details: Mapping[str, Any] | None = None,
    ) -> Accepted:
        """Publish an error response to ``request``: the requester raises ``ResponseError``.

        ``code`` is a short machine-readable error code (e.g. ``not_found``),
        ``message`` a human-readable explanation, ``details`` more members of
        the payload (``error`` and ``message`` always win).
        """
        if not code:
            raise ConfigError("an error response needs a non-empty error code")
        payload = {**(details or {}), "error": code}
        if message:
            payload["message"] = message
        return await self.reply(request, name, payload)


async def run_worker(
    client: EventsClient,
    worker: Worker,
    *,
    readiness: Readiness | None = None,
    task_status: trio.TaskStatus[Readiness] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``worker`` until cancelled: stream its events and run its handler for each.

    With ``await nursery.start(run_worker, client, worker)`` the start returns
    once every stream of the worker is established, with the worker's
    :class:`Readiness` (pass ``readiness`` to supply your own).  Runs until
    cancelled; returns by itself only when every listener stopped (retrying
    off and not required).

    Raises ``Unauthorized``/``Forbidden`` (and other answers that retrying
    cannot change) at once, :class:`ListenerUnavailable` for a required
    listener with retrying off (with it on, it waits for the provider), and
    :class:`HandlerError` after a handler failed with ``stop_on_error``.
    See the module documentation for the policies.

    Example::

        async def echo(event: Event, publisher: Publisher) -> None:
            await publisher.reply(event, "example.echo.reply", event.payload)

        worker = Worker("example.echo", echo, delivery="unicast", group="echo")
        async with trio.open_nursery() as nursery:
            await nursery.start(run_worker, client, worker)
            ...  # the worker is listening
    """
    await run_observed_worker(client, worker, readiness=readiness, task_status=task_status)


class Drain:
    """How a stop went: handlers in flight at the stop that ended by themselves
    within the grace period (``finished``) and those cancelled at its end.

    :meth:`cut` ends the grace period of every worker counted here at once.
    """

    __slots__ = ("_loops", "cancelled", "finished")

    def __init__(self) -> None:
        self.finished = 0
        self.cancelled = 0
        self._loops: list[_WorkerLoop] = []

    def cut(self) -> None:
        """Cancel every handler still running now, grace period or not."""
        for loop in self._loops:
            loop.cut()


async def run_observed_worker(
    client: EventsClient,
    worker: Worker,
    *,
    readiness: Readiness | None = None,
    observer: WorkerObserver | None = None,
    drain: Drain | None = None,
    task_status: trio.TaskStatus[Readiness] = trio.TASK_STATUS_IGNORED,
) -> None:
    """:func:`run_worker` reporting to ``observer`` (metrics, readiness per stream)
    and counting the handlers of its stop in ``drain``."""
    loop = _WorkerLoop(
        client, worker, readiness if readiness is not None else Readiness(), observer, drain
    )
    with single_error():
        await loop.run(task_status)


class _ObservedPublisher(ClientPublisher):
    """A :class:`ClientPublisher` that reports each publish to the worker's observer."""

    __slots__ = ("observer", "worker")

    def __init__(self, client: EventsClient, observer: WorkerObserver, worker: str) -> None:
        super().__init__(client)
        self.observer = observer
        self.worker = worker

    async def send(self, *args: Any, **kwargs: Any) -> Accepted:
        try:
            accepted = await super().send(*args, **kwargs)
        except BusEventsError as exc:
            self.observer.publish_failed(self.worker, exc)
            raise
        self.observer.published(self.worker, reply=False)
        return accepted

    async def reply(self, *args: Any, **kwargs: Any) -> Accepted:
        try:
            accepted = await super().reply(*args, **kwargs)
        except BusEventsError as exc:
            self.observer.publish_failed(self.worker, exc)
            raise
        self.observer.published(self.worker, reply=True)
        return accepted


class _WorkerLoop:
    """The state of one running worker."""

    def __init__(
        self,
        client: EventsClient,
        worker: Worker,
        readiness: Readiness,
        observer: WorkerObserver | None = None,
        drain: Drain | None = None,
    ) -> None:
        self.client = client
        self.worker = worker
        self.drain = drain if drain is not None else Drain()
        self.drain._loops.append(self)
        self.readiness = readiness
        # Without an observer the hooks are the base class's no-ops.
        self.observer = observer or WorkerObserver()
        self.publisher: Publisher = (  # the annotation checks it meets the protocol
            ClientPublisher(client)
            if observer is None
            else _ObservedPublisher(client, observer, worker.label)
        )
        self.limiter = trio.CapacityLimiter(worker.concurrency)
        self.in_flight: set[trio.CancelScope] = set()
        self.closing_deadline: float | None = None
        self.failure: tuple[Event, Exception] | None = None
        self.listening = 0
        self.start_scope = trio.CancelScope()
        self.listeners: trio.Nursery | None = None
        self.handlers: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus[Readiness]) -> None:
        worker = self.worker
        policy = worker.retry or RetryPolicy.from_env()
        # Every part exists before any stream connects: readiness never
        # flickers true while only some streams are up.
        parts = [self.readiness.child() for _ in worker.names]
        self.observer.declare(worker.label, worker.names)
        # run_worker may run in its caller's task: undo the context when it returns.
        context = push_log_context(worker=worker.label)
        try:
            await self._run(task_status, policy, parts)
        finally:
            log_context.reset(context)

    async def _run(
        self, task_status: trio.TaskStatus[Readiness], policy: RetryPolicy, parts: list[Readiness]
    ) -> None:
        worker = self.worker
        async with trio.open_nursery() as handlers:
            self.handlers = handlers
            try:
                async with trio.open_nursery() as listeners:
                    self.listeners = listeners
                    for name, part in zip(worker.names, parts, strict=True):
                        recent = RecentIds(worker.dedup_window) if worker.replay else None
                        consume = partial(self._consume, name=name, recent=recent)
                        listeners.start_soon(
                            partial(
                                self._listen,
                                name,
                                consume,
                                readiness=part,
                                policy=policy,
                                delivery=worker.delivery,
                                group=worker.group,
                                consumer=worker.consumer,
                                replay=worker.replay,
                                stall_timeout=worker.stall_timeout,
                                label=worker.label,
                                observer=self.observer,
                            )
                        )
                        self.listening += 1
                    with self.start_scope:
                        await self.readiness.wait()
                        task_status.started(self.readiness)
            finally:
                self._close()
                for part in parts:
                    part.detach()
        if self.failure is not None:
            event, exc = self.failure
            raise HandlerError(
                f"handler {worker.label} failed on {event.name} event {event.id}: "
                + bounded_text(f"{type(exc).__name__}: {exc}", 200),
                worker=worker.label,
                event_id=event.id,
                event_name=event.name,
            ) from exc

    async def _listen(self, name: str, *args: Any, **kwargs: Any) -> None:
        push_log_context(event_name=name)  # the listener's log records name the stream
        try:
            await listen_with_retry(self.client, name, *args, **kwargs)
        finally:
            self.listening -= 1
            if not self.listening:
                self.start_scope.cancel()  # nothing left that could become ready

    async def _consume(self, stream: EventStream, *, name: str, recent: RecentIds | None) -> None:
        handlers = self.handlers
        assert handlers is not None
        async for batch in stream.batches():
            for event in batch:
                if recent is not None and recent.seen(event.id):
                    self.observer.duplicate(self.worker.label, name)
                    log.debug(
                        "%s: skipped %s event %s: already handled",
                        self.worker.label,
                        event.name,
                        event.id,
                    )
                    continue
                token = object()  # the limiter's borrower: one per handler task
                await self.limiter.acquire_on_behalf_of(token)
                self.observer.received(self.worker.label, name)
                handlers.start_soon(self._handle, event, name, token)

    async def _handle(self, event: Event, name: str, token: object) -> None:
        # The handler's own log records carry the event too (see _observe.log_context).
        push_log_context(
            event_name=event.name, event_id=event.id, correlation_id=event.correlation_id
        )
        self.observer.handler_started(self.worker.label, name)
        started, ok = time.perf_counter(), False
        try:
            with trio.CancelScope(shield=True) as scope:
                # Shielded from the worker's cancellation; _close() gives it a deadline.
                if self.closing_deadline is not None:
                    scope.deadline = self.closing_deadline
                self.in_flight.add(scope)
                try:
                    await self.worker.handler(event, self.publisher)
                    ok = True
                except Exception as exc:
                    self._failed(event, exc)
                finally:
                    self.in_flight.discard(scope)
            if self.closing_deadline is not None:  # it ran into the stop
                if scope.cancelled_caught:
                    self.drain.cancelled += 1
                else:
                    self.drain.finished += 1
            if scope.cancelled_caught:
                log.warning(
                    "%s: handler cancelled on %s event %s: the %gs grace period ended",
                    self.worker.label,
                    event.name,
                    event.id,
                    self.worker.grace_period,
                )
        finally:
            self.observer.handler_finished(
                self.worker.label, name, time.perf_counter() - started, ok
            )
            self.limiter.release_on_behalf_of(token)

    def _failed(self, event: Event, exc: Exception) -> None:
        log.error(
            "%s: handler failed on %s event %s: %s",
            self.worker.label,
            event.name,
            event.id,
            bounded_text(f"{type(exc).__name__}: {exc}", 200),
            exc_info=exc,
        )
        if self.worker.stop_on_error and self.failure is None:
            self.failure = (event, exc)
            self.start_scope.cancel()
            if self.listeners is not None:
                self.listeners.cancel_scope.cancel()

    def cut(self) -> None:
        """End the grace period now: every handler still running is cancelled."""
        self.closing_deadline = now = trio.current_time()
        for scope in self.in_flight:
            scope.deadline = now

    def _close(self) -> None:
        """Stop taking events: in-flight handlers get the grace period, then are cancelled."""
        self.closing_deadline = deadline = trio.current_time() + self.worker.grace_period
        for scope in self.in_flight:
            scope.deadline = min(scope.deadline, deadline)
        if self.in_flight:
            log.info(
                "%s: stopping; %d handler(s) in flight get up to %gs to finish",
                self.worker.label,
                len(self.in_flight),
                self.worker.grace_period,
            )
