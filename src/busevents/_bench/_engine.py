"""The load-test engine behind ``bus-events bench``: publishers and listeners on one deployment.

A run, in one process::

    plan = check_plan(BenchPlan(name="bench.demo", publishers=4, listeners=10, events=10_000))
    bench = Bench(plan, url=url, token=token)
    report = await bench.run()          # bench.report() gives a partial one if cancelled

All publishers and listeners are tasks of one trio nursery sharing one
:class:`EventsClient` (one connection pool).  The listeners' streams are open
(response headers received) before the first event is published.  Payloads
carry what listeners need to measure end-to-end latency and to tell loss,
duplication and re-ordering apart (:mod:`busevents._bench._node`).  With
``plan.processes > 1`` the participants are split over worker processes
(:mod:`busevents._bench._procs`) and their results merged.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

import msgspec
import trio

from .._client import EventsClient
from .._config import Token, normalize_events_url
from .._contracts import Delivery
from .._errors import BusEventsError, ConfigError
from .._groups import first_error
from ._node import Node, Progress
from ._report import BenchPlan, BenchReport, PartResult, build_report
from ._stats import hdr_histogram_class

if TYPE_CHECKING:
    from ._procs import Workers

__all__ = [
    "Bench",
    "BenchPlan",
    "BenchReport",
    "Progress",
    "check_plan",
    "delivered_all",
    "drain",
]

#: Events published when the plan gives neither ``events`` nor ``duration``.
DEFAULT_EVENTS: Final = 10_000
#: Unicast group used when the plan names none.
DEFAULT_GROUP: Final = "bench"
#: Largest ``payload_size`` accepted (deployments refuse far less; 413 says so).
MAX_PAYLOAD: Final = 16 * 1024 * 1024
#: After publishing, delivery ends when every receiver has everything, or when
#: nothing arrived for DRAIN_QUIET seconds, or after DRAIN_MAX seconds.
DRAIN_QUIET: Final = 2.0
DRAIN_MAX: Final = 30.0
_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*", re.ASCII)
_LABEL = re.compile(r"[A-Za-z0-9._-]{1,128}", re.ASCII)


def check_plan(plan: BenchPlan) -> BenchPlan:
    """Validate ``plan`` and fill in its defaults; raise :class:`ConfigError` naming the rule.

    The guard rails: the name must be a plain event name (no wildcard) and not
    in the platform's reserved ``bus.`` namespace unless ``allow_reserved``;
    counts must be positive; ``events`` and ``duration`` exclude each other
    (neither: 10 000 events); ``group`` needs unicast (default ``bench``).
    """
    name = plan.name
    if not _NAME.fullmatch(name) or len(name) > 255:
        raise ConfigError(
            f"--name {name[:64]!r} is not an event name: dot-separated lowercase words "
            "of a-z, 0-9, '-' and '_' (no wildcards), e.g. bench.my-team"
        )
    if name.startswith("bus.") and not plan.allow_reserved:
        raise ConfigError(
            f"--name {name!r} is in the platform's bus. namespace, where real services "
            "listen; bench a name you own (e.g. bench.my-team) or pass --allow-reserved"
        )
    if plan.publishers < 1:
        raise ConfigError("--publishers must be at least 1")
    if plan.listeners < 0:
        raise ConfigError("--listeners must not be negative")
    if plan.events is not None and plan.duration is not None:
        raise ConfigError("give --events or --duration, not both")
    if plan.events is not None and plan.events < 1:
        raise ConfigError("--events must be at least 1")
    if plan.duration is not None and not plan.duration > 0:
        raise ConfigError("--duration must be more than 0s")
    if plan.rate is not None and not (0 < plan.rate < float("inf")):
        raise ConfigError("--rate must be a positive number of events per second")
    if not 0 <= plan.payload_size <= MAX_PAYLOAD:
        raise ConfigError(f"--payload-size must be between 0 and {MAX_PAYLOAD} bytes")
    if plan.warmup < 0 or plan.listener_delay < 0:
        raise ConfigError("--warmup and --listener-delay must not be negative")
    if not 1 <= plan.processes <= max(plan.publishers, plan.listeners):
        raise ConfigError(
            "--processes must be between 1 and the larger of --publishers and --listeners"
        )
    try:
        delivery = Delivery(plan.delivery)
    except ValueError:
        raise ConfigError(
            f"invalid delivery {plan.delivery!r}: expected broadcast or unicast"
        ) from None
    unicast = delivery is Delivery.UNICAST
    if plan.group is not None and not unicast:
        raise ConfigError("--group needs --delivery unicast")
    if plan.group is not None and not _LABEL.fullmatch(plan.group):
        raise ConfigError("--group must be 1-128 characters of A-Z, a-z, 0-9, '.', '-', '_'")
    events = DEFAULT_EVENTS if plan.events is None and plan.duration is None else plan.events
    group = (plan.group or DEFAULT_GROUP) if unicast else None
    hdr_histogram_class()  # fail before anything is sent when the extra is missing
    return msgspec.structs.replace(plan, delivery=delivery, events=events, group=group)


def delivered_all(progress: Progress, expected: int) -> bool:
    """Whether every receiver has every accepted event (or can get no more)."""
    if progress.in_doubt:
        return False  # an event of unknown fate may still come: wait for quiet instead
    if progress.ended >= len(progress.receivers):
        return True
    done = sum(1 for n in progress.receivers if n >= expected)
    return done + progress.ended >= len(progress.receivers)


async def drain(snapshot: Callable[[], Progress], expected: int) -> None:
    """Wait, after publishing, until delivery is complete, quiet, or DRAIN_MAX has passed."""
    give_up = trio.current_time() + DRAIN_MAX
    quiet_since = time.time_ns()
    while trio.current_time() < give_up:
        progress = snapshot()
        if delivered_all(progress, expected):
            return
        last = max(progress.last_receive_ns, quiet_since)
        if time.time_ns() - last >= DRAIN_QUIET * 1e9:
            return
        await trio.sleep(0.02)


class Bench:
    """One bench run of ``plan`` (see :func:`check_plan`) against the deployment at ``url``.

    ``await run()`` returns the :class:`BenchReport`.  When the run is
    cancelled (Ctrl-C), :meth:`report` still gives a partial report, marked
    ``interrupted``; :attr:`completed` tells which.  Errors that end a run
    (401, 403, a listener that cannot connect, …) are raised as themselves,
    never as exception groups.  ``timeout`` bounds connecting, each publish
    and the opening of each stream.
    """

    def __init__(
        self, plan: BenchPlan, *, url: str, token: str | Token | None, timeout: float = 30.0
    ) -> None:
        self.plan = plan
        self.url = url
        self.token = token
        self.timeout = timeout
        self.run_id = secrets.token_hex(6)
        self.completed = False
        self._started = datetime.now(UTC)
        self._began = time.perf_counter()
        self._node: Node | None = None
        self._workers: Workers | None = None  # when the run uses worker processes
        self._report: BenchReport | None = None

    def progress(self) -> Progress:
        """The counts so far (all processes), for a progress line."""
        if self._node is not None:
            return self._node.progress()
        if self._workers is not None:
            return self._workers.progress()
        return Progress()

    async def run(self) -> BenchReport:
        """Run the bench to its end; return its report."""
        self._started = datetime.now(UTC)
        self._began = time.perf_counter()
        try:
            if self.plan.processes > 1:
                from ._procs import Workers

                workers = Workers(self)
                self._workers = workers
                parts = await workers.run()
            else:
                parts = [await self._run_here()]
        except BaseExceptionGroup as group:
            error = first_error(group)
            if error is None or not isinstance(error, BusEventsError | OSError):
                raise
            raise error from None
        self.completed = True
        self._report = self._build(parts, interrupted=False)
        return self._report

    async def _run_here(self) -> PartResult:
        node = self._node = Node(self.plan, self.run_id)
        plan = self.plan
        async with (
            EventsClient(
                self.url,
                self.token,
                timeout=self.timeout,
                max_connections=plan.publishers + plan.listeners + 1,
            ) as client,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(node.run_listeners, client)
            await node.publish(client, trio.current_time(), time.time_ns())
            await drain(node.progress, node.accepted)
            node.stop_listeners()
        node.phase = "done"
        return node.result()

    def report(self) -> BenchReport:
        """The report: the complete one after :meth:`run`, else a partial one (interrupted)."""
        if self._report is not None:
            return self._report
        if self._node is not None:
            parts = [self._node.result()]
        elif self._workers is not None:
            parts = self._workers.results()
        else:
            parts = []
        return self._build(parts, interrupted=True)

    def _build(self, parts: list[PartResult], *, interrupted: bool) -> BenchReport:
        return build_report(
            self.plan,
            parts,
            run_id=self.run_id,
            target=normalize_events_url(self.url),
            started=self._started.isoformat(timespec="seconds").replace("+00:00", "Z"),
            elapsed_s=time.perf_counter() - self._began,
            interrupted=interrupted,
        )
