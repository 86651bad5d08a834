"""A worker host's Prometheus metrics (``prometheus_client``), one registry per host.

Names, units and labels are stable; every label value comes from a bounded set
(``worker``: a worker's label; ``name``: a stream's event name as declared):

* ``busevents_worker_events_received_total{worker,name}`` — events handed to the handler;
* ``busevents_worker_events_handled_total{worker,name}`` — handlers that returned;
* ``busevents_worker_events_failed_total{worker,name}`` — handlers that raised
  (or were cancelled after the grace period);
* ``busevents_worker_handler_duration_seconds{worker,name}`` — handler run time;
* ``busevents_worker_handlers_in_flight{worker}`` — handlers running now;
* ``busevents_worker_duplicates_dropped_total{worker,name}`` — replayed events
  the de-duplication window had already seen;
* ``busevents_worker_reconnects_total{worker,name,reason}`` — reconnect
  attempts (after the backoff), ``reason`` one of :data:`RECONNECT_REASONS`;
* ``busevents_worker_stream_ready{worker,name}`` — 1 while the stream is established;
* ``busevents_worker_published_total{worker,kind}`` — events a handler's publisher
  published, ``kind`` ``reply`` or ``send``;
* ``busevents_worker_publish_errors_total{worker,status}`` — failed publishes,
  ``status`` the HTTP status or ``transport``/``other``;
* ``busevents_worker_token_refreshes_total`` — the client's token refreshes.

Importing this module needs ``prometheus_client`` (the ``health`` extra).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .._errors import APIError, TransportError
from ._observe import RECONNECT_REASONS, StreamStates, WorkerObserver, reconnect_reason

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["CONTENT_TYPE", "WorkerMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _TokenRefreshes(Collector):
    """Reads the client's refresh counter at scrape time (0 before clients count them)."""

    def __init__(self, client: object) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "busevents_worker_token_refreshes",
            "Times the client refreshed its token.",
        )
        family.add_metric([], float(getattr(self.client, "token_refreshes", 0) or 0))
        yield family


class _Stream(NamedTuple):
    """The labelled children of one ``(worker, name)``."""

    received: Any
    handled: Any
    failed: Any
    duration: Any
    in_flight: Any


class WorkerMetrics(WorkerObserver):
    """The metrics of one host; :meth:`exposition` renders them in the text format.

    ``registry`` is this host's own :class:`CollectorRegistry` (never the
    global one, so that several hosts in one process do not collide); register
    your own metrics there to have them served on ``/metrics`` too.
    """

    __slots__ = (
        "_children",
        "_duplicates",
        "_duration",
        "_failed",
        "_handled",
        "_in_flight",
        "_per_stream",
        "_publish_errors",
        "_published",
        "_ready",
        "_received",
        "_reconnects",
        "registry",
        "states",
        "streams",
    )

    def __init__(self, client: object | None = None) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        wn = ["worker", "name"]
        self._received = Counter(
            "busevents_worker_events_received",
            "Events handed to a worker's handler.",
            wn,
            registry=r,
        )
        self._handled = Counter(
            "busevents_worker_events_handled",
            "Handlers that returned.",
            wn,
            registry=r,
        )
        self._failed = Counter(
            "busevents_worker_events_failed",
            "Handlers that raised, or were cancelled after the grace period.",
            wn,
            registry=r,
        )
        self._duration = Histogram(
            "busevents_worker_handler_duration_seconds",
            "How long handlers ran.",
            wn,
            registry=r,
        )
        self._in_flight = Gauge(
            "busevents_worker_handlers_in_flight",
            "Handlers running now.",
            ["worker"],
            registry=r,
        )
        self._duplicates = Counter(
            "busevents_worker_duplicates_dropped",
            "Replayed events dropped because the de-duplication window had seen them.",
            wn,
            registry=r,
        )
        self._reconnects = Counter(
            "busevents_worker_reconnects",
            "Reconnect attempts (after the backoff), by reason: "
            + ", ".join(RECONNECT_REASONS)
            + ".",
            [*wn, "reason"],
            registry=r,
        )
        self._ready = Gauge(
            "busevents_worker_stream_ready",
            "1 while the stream is established, else 0.",
            wn,
            registry=r,
        )
        self._published = Counter(
            "busevents_worker_published",
            "Events published by handlers, by kind (reply or send).",
            ["worker", "kind"],
            registry=r,
        )
        self._publish_errors = Counter(
            "busevents_worker_publish_errors",
            "Failed publishes by handlers, by HTTP status (or transport, other).",
            ["worker", "status"],
            registry=r,
        )
        if client is not None:
            r.register(_TokenRefreshes(client))
        #: Whether each declared stream is up: ``(worker, name) -> bool``.
        self.streams: dict[tuple[str, str], bool] = {}
        #: What each stream that is not up is doing, and why (``/readyz``).
        self.states = StreamStates()
        # Labelled children, looked up once: ``labels()`` takes a lock per call.
        self._children: dict[tuple[object, ...], Any] = {}
        # Per stream, the children an event touches: one dict look-up per hook.
        self._per_stream: dict[tuple[str, str], _Stream] = {}

    def _stream(self, worker: str, name: str) -> _Stream:
        found = self._per_stream.get((worker, name))
        if found is None:
            found = self._per_stream[worker, name] = _Stream(
                self._child(self._received, worker, name),
                self._child(self._handled, worker, name),
                self._child(self._failed, worker, name),
                self._child(self._duration, worker, name),
                self._child(self._in_flight, worker),
            )
        return found

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (``prometheus_client``'s own)."""
        return generate_latest(self.registry)

    def not_ready(self) -> list[dict[str, object]]:
        """The declared streams that are not established now, with their state and reason."""
        return self.states.not_ready()

    # -- WorkerObserver ----------------------------------------------------

    def declare(self, worker: str, names: tuple[str, ...]) -> None:
        self._child(self._in_flight, worker).set(0)
        for name in names:
            self.streams[worker, name] = False
            self.states.set(worker, name, "connecting")
            self._child(self._ready, worker, name).set(0)
            # Present from the start (at 0), so that rate() sees the first event.
            self._stream(worker, name)
            self._child(self._duplicates, worker, name)

    def stream_up(self, worker: str, name: str, up: bool) -> None:
        self.streams[worker, name] = up
        self.states.set(worker, name, "ready" if up else "down")
        self._child(self._ready, worker, name).set(1 if up else 0)

    def backing_off(
        self, worker: str, name: str, error: BaseException | None, delay: float
    ) -> None:
        self.states.set(worker, name, "backoff", error=error, ended=error is None, delay=delay)

    def reconnecting(self, worker: str, name: str, error: BaseException | None) -> None:
        # The state stays "backoff": it reads as "connecting" once next_attempt passed.
        self._child(self._reconnects, worker, name, reconnect_reason(error)).inc()

    def received(self, worker: str, name: str) -> None:
        self._stream(worker, name).received.inc()

    def duplicate(self, worker: str, name: str) -> None:
        self._child(self._duplicates, worker, name).inc()

    def handler_started(self, worker: str, name: str) -> None:
        self._stream(worker, name).in_flight.inc()

    def handler_finished(self, worker: str, name: str, seconds: float, ok: bool) -> None:
        stream = self._stream(worker, name)
        stream.in_flight.dec()
        stream.duration.observe(seconds)
        (stream.handled if ok else stream.failed).inc()

    def published(self, worker: str, reply: bool) -> None:
        self._child(self._published, worker, "reply" if reply else "send").inc()

    def publish_failed(self, worker: str, error: BaseException) -> None:
        if isinstance(error, APIError):
            status = str(error.status)
        elif isinstance(error, TransportError):
            status = "transport"
        else:
            status = "other"
        self._child(self._publish_errors, worker, status).inc()
