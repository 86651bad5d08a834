"""What a running worker reports to an observer, and the log context of its tasks.

The worker loop and the listener call a :class:`WorkerObserver` at a few
points (an event arrived, a handler ran, a stream went up or down, a
reconnect began, a reply was published).  The base class does
nothing, so a worker without metrics pays one attribute look-up per call;
:class:`busevents.workers._metrics.WorkerMetrics` turns the calls into
Prometheus metrics.  This module imports nothing optional.

:data:`log_context` holds the worker, event name, event id and correlation id
of the task that logs; trio copies it into each task a worker spawns, so a
handler's own log records carry them too (the JSON log format prints them).
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import NamedTuple

from .._errors import (
    APIError,
    RateLimited,
    StreamError,
    StreamStalled,
    TransportError,
    bounded_text,
)

__all__ = [
    "RECONNECT_REASONS",
    "StreamStates",
    "WorkerObserver",
    "log_context",
    "reconnect_reason",
]

#: The fields a worker's tasks log with (see :mod:`busevents.workers._logs`).
log_context: ContextVar[dict[str, str]] = ContextVar("busevents_log_context", default={})  # noqa: B039

#: Every value of the ``reason`` label of reconnects: a bounded set.
RECONNECT_REASONS = (
    "ended",  # the provider ended the stream cleanly
    "stalled",  # no byte within the stall timeout
    "stream",  # a broken or malformed stream
    "transport",  # connect failure, timeout, reset
    "rate_limited",  # 429
    "server_error",  # 5xx
    "other",  # any other retryable answer (408…)
)


def reconnect_reason(error: BaseException | None) -> str:
    """The ``reason`` label for a reconnect after ``error`` (``None``: the stream ended)."""
    if error is None:
        return "ended"
    if isinstance(error, StreamStalled):
        return "stalled"
    if isinstance(error, StreamError):
        return "stream"
    if isinstance(error, TransportError):
        return "transport"
    if isinstance(error, RateLimited):
        return "rate_limited"
    if isinstance(error, APIError) and error.status >= 500:
        return "server_error"
    return "other"


def push_log_context(**fields: str | None) -> Token[dict[str, str]]:
    """Add ``fields`` (those not ``None``) to this task's :data:`log_context`.

    Returns the token that undoes it (``log_context.reset(token)``): needed where
    the caller's task lives on afterwards.
    """
    added = {k: v for k, v in fields.items() if v is not None}
    return log_context.set({**log_context.get(), **added})


class WorkerObserver:
    """Hooks a worker calls as it runs; every method does nothing here.

    ``worker`` is the worker's label, ``name`` the event name of one of its
    streams as declared (a pattern stays a pattern), so that every label value
    comes from a bounded set.
    """

    __slots__ = ()

    def declare(self, worker: str, names: tuple[str, ...]) -> None:
        """A worker with these streams is about to start (none is up yet)."""

    def stream_up(self, worker: str, name: str, up: bool) -> None:
        """The stream of ``name`` was established (``True``) or ended (``False``)."""

    def backing_off(
        self, worker: str, name: str, error: BaseException | None, delay: float
    ) -> None:
        """The listener of ``name`` waits ``delay`` seconds after ``error`` (``None``: it ended)."""

    def reconnecting(self, worker: str, name: str, error: BaseException | None) -> None:
        """The listener of ``name`` reconnects now, after ``error`` (``None``: it ended)."""

    def received(self, worker: str, name: str) -> None:
        """An event arrived and will be handed to the handler."""

    def duplicate(self, worker: str, name: str) -> None:
        """An event was dropped: the de-duplication window had seen its id."""

    def handler_started(self, worker: str, name: str) -> None:
        """The handler started on an event of ``name``."""

    def handler_finished(self, worker: str, name: str, seconds: float, ok: bool) -> None:
        """The handler returned (``ok``) or raised or was cancelled, after ``seconds``."""

    def published(self, worker: str, reply: bool) -> None:
        """A handler's publisher published an event (``reply``: a reply to a request)."""

    def publish_failed(self, worker: str, error: BaseException) -> None:
        """A handler's publisher failed to publish."""


def _stamp(seconds: float) -> str:
    """A wall-clock time as UTC ISO 8601 with milliseconds (``...Z``)."""
    text = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


class _State(NamedTuple):
    state: str
    since: float
    next_attempt: float | None
    last_error: str | None


class StreamStates:
    """What each declared stream is doing now: the reasons ``/readyz`` gives.

    Per ``(worker, name)``: ``state`` is ``connecting`` (an attempt is under
    way: declared, or the backoff is over), ``backoff`` (waiting until
    ``next_attempt``), ``down`` (the stream ended and no reconnect began yet,
    or none will: retrying off) or ``ready``; ``since`` when that state began;
    ``last_error`` the text of what ended the previous attempt (the SDK's
    messages, which never carry a token, bounded to 300 characters).
    """

    __slots__ = ("_states",)

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], _State] = {}

    def set(
        self,
        worker: str,
        name: str,
        state: str,
        *,
        error: BaseException | None = None,
        ended: bool = False,
        delay: float | None = None,
    ) -> None:
        """Enter ``state``; ``error`` (or ``ended``: the stream ended) is the new last error."""
        now = time.time()
        before = self._states.get((worker, name))
        last = before.last_error if before is not None else None
        if error is not None or ended:
            text = "the stream ended" if error is None else str(error) or type(error).__name__
            last = bounded_text(text, 300)
        attempt = None if delay is None else now + delay
        self._states[worker, name] = _State(state, now, attempt, last)

    def not_ready(self) -> list[dict[str, object]]:
        """Each declared stream that is not established, with its state and reasons."""
        now = time.time()
        found: list[dict[str, object]] = []
        for (worker, name), (state, since, attempt, last) in self._states.items():
            if state == "ready":
                continue
            entry: dict[str, object] = {"worker": worker, "name": name}
            if state == "backoff" and attempt is not None and attempt <= now:
                # The backoff is over: the next attempt is under way.
                entry.update(state="connecting", since=_stamp(attempt))
            else:
                entry.update(state=state, since=_stamp(since))
                if attempt is not None:
                    entry["next_attempt"] = _stamp(attempt)
            if last is not None:
                entry["last_error"] = last
            found.append(entry)
        return found
