"""The provider's Prometheus metrics (``prometheus_client``), one registry per app.

Names and labels are stable; every label has a bounded set of values:

* ``busevents_provider_publishes_total{prefix}`` — events accepted;
* ``busevents_provider_deliveries_total{prefix,delivery}`` — events written to streams;
* ``busevents_provider_open_streams{delivery}`` — streams open now;
* ``busevents_provider_slow_consumer_disconnects_total`` — streams the backend
  ended because their listener fell behind;
* ``busevents_provider_auth_failures_total{reason}`` — ``401`` by reason,
  ``403`` as ``forbidden`` / ``reserved``;
* ``busevents_provider_request_duration_seconds{route,status}`` — until the
  response starts (for a stream: until its headers are sent);
* ``busevents_provider_backend_seconds{operation}`` and
  ``busevents_provider_backend_errors_total{operation}``.

``prefix`` is the first two dot-separated words of the event name; after
:data:`MAX_PREFIXES` distinct values every new one is counted as ``other``, so a
publisher inventing names cannot grow the exposition without bound.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "MAX_PREFIXES", "ProviderMetrics", "name_prefix"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Distinct ``prefix`` label values before new ones become ``other``.
MAX_PREFIXES = 256
_OTHER = "other"
_ROUTES = ("publish", "stream", "healthz", "readyz", "openapi", "metrics", "other")


def name_prefix(name: str) -> str:
    """The first two dot-separated words of ``name`` (wildcard words kept as written)."""
    first, _, rest = name.partition(".")
    second = rest.partition(".")[0]
    return f"{first}.{second}" if second else first


class ProviderMetrics:
    """The counters one provider app updates; :meth:`exposition` renders them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._publishes = Counter(
            "busevents_provider_publishes",
            "Events accepted by POST, by event-name prefix.",
            ["prefix"],
            registry=r,
        )
        self._deliveries = Counter(
            "busevents_provider_deliveries",
            "Events written to streams (replay and live), by prefix and delivery mode.",
            ["prefix", "delivery"],
            registry=r,
        )
        self.open_streams = Gauge(
            "busevents_provider_open_streams",
            "Streams open now, by delivery mode.",
            ["delivery"],
            registry=r,
        )
        self.slow_consumers = Counter(
            "busevents_provider_slow_consumer_disconnects",
            "Streams ended by the backend because their listener fell behind.",
            registry=r,
        )
        self._auth_failures = Counter(
            "busevents_provider_auth_failures",
            "Refused requests: 401 by reason, 403 as forbidden or reserved.",
            ["reason"],
            registry=r,
        )
        self._durations = Histogram(
            "busevents_provider_request_duration_seconds",
            "Time until the response starts (streams: until their headers are sent).",
            ["route", "status"],
            registry=r,
        )
        self._backend_seconds = Histogram(
            "busevents_provider_backend_seconds",
            "Latency of backend operations.",
            ["operation"],
            registry=r,
        )
        self._backend_errors = Counter(
            "busevents_provider_backend_errors",
            "Backend operations that raised.",
            ["operation"],
            registry=r,
        )
        self._prefixes: set[str] = set()
        # Labelled children, looked up once: ``labels()`` is a lock and a tuple per call.
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _prefix(self, name: str) -> str:
        prefix = name_prefix(name)
        if prefix in self._prefixes:
            return prefix
        if len(self._prefixes) >= MAX_PREFIXES:
            return _OTHER
        self._prefixes.add(prefix)
        return prefix

    def published(self, name: str) -> None:
        """Count one accepted event."""
        self._child(self._publishes, self._prefix(name)).inc()

    def delivered(self, name: str, delivery: str, count: int) -> None:
        """Count ``count`` events written to a stream of ``name``."""
        if count:
            self.deliveries(name, delivery).inc(count)

    def deliveries(self, name: str, delivery: str) -> Any:
        """The counter of events written to streams of ``name``: a stream looks it up
        once, then counts each batch with ``inc(n)`` (a lookup per batch was a tenth
        of a delivery's cost)."""
        return self._child(self._deliveries, self._prefix(name), delivery)

    def auth_failure(self, reason: str) -> None:
        """Count one refused request."""
        self._child(self._auth_failures, reason).inc()

    def request(self, route: str, status: int, seconds: float) -> None:
        """Observe how long a request waited for its response to start."""
        route = route if route in _ROUTES else "other"
        self._child(self._durations, route, str(status)).observe(seconds)

    def backend_call(self, operation: str) -> _BackendCall:
        """Time a backend operation (a ``with`` block); count it as an error when it raises."""
        return _BackendCall(self, operation)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _BackendCall:
    """:meth:`ProviderMetrics.backend_call`: a plain class, not a generator-based context
    manager, which cost a publish as much as the histogram it feeds."""

    __slots__ = ("_metrics", "_operation", "_start")

    def __init__(self, metrics: ProviderMetrics, operation: str) -> None:
        self._metrics = metrics
        self._operation = operation
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        metrics, operation = self._metrics, self._operation
        if kind is not None and issubclass(kind, Exception):
            metrics._child(metrics._backend_errors, operation).inc()
        elapsed = time.perf_counter() - self._start
        metrics._child(metrics._backend_seconds, operation).observe(elapsed)
