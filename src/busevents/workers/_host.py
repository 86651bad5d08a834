"""WorkerHost: several workers in one process, sharing one client, stopped by signals.

The host owns its workers' lifetime (spec §6): they run in its nursery,
SIGINT/SIGTERM cancel it (each worker's in-flight handlers get their grace
period), and the first worker that fails stops the others and is raised.
:func:`run_host` wraps it all for a script's ``main()`` and turns the outcome
into an exit status.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import trio

from .._errors import BusEventsError, ConfigError, ExitStatus
from .._groups import single_error
from .._retry import RetryPolicy
from ._health import HEALTH_ADDR_ENV, health_addr_from_env, parse_health_addr
from ._listener import Readiness
from ._logs import check_log_format, log_format_from_env
from ._logs import configure_logging as _configure_logging
from ._worker import Drain, Worker, run_observed_worker

if TYPE_CHECKING:
    from .._client import EventsClient
    from ._metrics import WorkerMetrics

__all__ = ["WorkerHost", "run_host"]

log = logging.getLogger("busevents.worker")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = ExitStatus.OK, ExitStatus.FAILURE, ExitStatus.USAGE


class WorkerHost:
    """Run several :class:`Worker` declarations in one process, sharing ``client``.

    ``retry`` is the reconnect policy of the workers that have none of their
    own (default: :meth:`RetryPolicy.from_env`, read when the host starts).
    ``readiness`` is ready while every stream of every worker is established.
    With ``handle_signals`` (the default; needs the main thread), SIGINT and
    SIGTERM stop the host cleanly and ``stop_signal`` records which one came;
    a second signal cancels the handlers still running without waiting for
    their grace period.

    ``health_addr`` (``"HOST:PORT"``; default: ``BUS_EVENTS_HEALTH_ADDR``, off
    when unset; ``""`` turns it off) serves ``GET /healthz``, ``/readyz`` and
    ``/metrics`` while the host runs (the ``health`` extra); ``health_url`` is
    then its base URL and ``metrics`` the host's ``WorkerMetrics``, whose
    ``registry`` takes your own metrics too.  A signal stops the workers, not
    the server: ``/readyz`` answers ``503 shutting_down`` at once while
    ``/healthz`` and ``/metrics`` answer until the last in-flight handler
    finished (or its grace period ended); then one log line says how many
    finished and how many were cancelled, and the server closes.

    Example::

        async with EventsClient.from_env() as client:
            host = WorkerHost(client, [Worker("example.echo", echo)])
            await host.run()  # until SIGINT/SIGTERM, or until a worker fails
    """

    def __init__(
        self,
        client: EventsClient,
        workers: Iterable[Worker] = (),
        *,
        retry: RetryPolicy | None = None,
        handle_signals: bool = True,
        health_addr: str | None = None,
    ) -> None:
        self.client = client
        self.workers = list(workers)
        self.retry = retry
        self.handle_signals = handle_signals
        self.readiness = Readiness()
        self.stop_signal: int | None = None
        self.health_addr = health_addr
        self.health_url: str | None = None
        self.metrics: WorkerMetrics | None = None
        self._started = False
        self._stopping = False

    def add(self, worker: Worker) -> None:
        """Register one more worker (before :meth:`run`)."""
        if self._started:
            raise RuntimeError("WorkerHost.add() after run(): workers are fixed once running")
        self.workers.append(worker)

    async def run(
        self, *, task_status: trio.TaskStatus[Readiness] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every worker until a signal, until each ended by itself, or until one fails.

        Returns after SIGINT/SIGTERM (see ``stop_signal``) or when every worker
        ended by itself; cancelling the surrounding scope stops it the same
        clean way.  With ``await nursery.start(host.run)`` the start returns
        once the host is ready.  Raises the first worker's error
        (``Forbidden``, ``ListenerUnavailable``, ``HandlerError``…), never an
        ``ExceptionGroup``; the other workers are stopped first.
        """
        if self._started:
            raise RuntimeError("a WorkerHost runs once")
        if not self.workers:
            raise ConfigError("the WorkerHost has no workers to run")
        self._started = True
        if self.health_addr is None:
            addr = health_addr_from_env()
        else:
            addr = parse_health_addr(self.health_addr) if self.health_addr else None
        if addr is not None:
            from ._health import require_health_extra

            require_health_extra()  # before importing prometheus_client
            from ._metrics import WorkerMetrics

            self.metrics = WorkerMetrics(self.client)
        retry = self.retry or RetryPolicy.from_env()
        workers = [w if w.retry else replace(w, retry=retry) for w in self.workers]
        parts = [self.readiness.child() for _ in workers]
        running = len(workers)
        start_scope = trio.CancelScope()
        # A signal stops the workers only: the health server answers through the drain.
        workers_scope = trio.CancelScope()
        drain = Drain()

        async def one(worker: Worker, part: Readiness) -> None:
            nonlocal running
            try:
                await run_observed_worker(
                    self.client, worker, readiness=part, observer=self.metrics, drain=drain
                )
            finally:
                running -= 1
                if not running:
                    start_scope.cancel()

        with single_error():
            async with trio.open_nursery() as outer:
                if self.handle_signals:
                    await outer.start(self._watch_signals, workers_scope, drain)
                if addr is not None:
                    from ._health import HealthApp, serve_health

                    assert self.metrics is not None
                    app = HealthApp(self.readiness, self.metrics, lambda: self._stopping)
                    self.health_url = await outer.start(serve_health, app, addr)
                outer.start_soon(self._log_readiness)
                try:
                    with workers_scope:
                        async with trio.open_nursery() as nursery:
                            for worker, part in zip(workers, parts, strict=True):
                                nursery.start_soon(
                                    partial(one, worker, part), name=f"worker {worker.label}"
                                )
                            with start_scope:
                                await self.readiness.wait()
                                task_status.started(self.readiness)
                finally:
                    self._stopping = True
                    log.info(
                        "stopped: %d handler(s) finished during the drain, "
                        "%d cancelled at the end of the grace period",
                        drain.finished,
                        drain.cancelled,
                    )
                # Every worker ended and every handler finished: stop the health server.
                outer.cancel_scope.cancel()

    async def _watch_signals(
        self,
        scope: trio.CancelScope,
        drain: Drain,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.stop_signal is None:
                    self.stop_signal = signum
                    self._stopping = True
                    log.info("received %s: stopping the workers", name)
                    scope.cancel()
                else:  # an impatient supervisor: the drain ends now
                    log.warning("received %s again: cancelling the handlers still running", name)
                    drain.cut()

    async def _log_readiness(self) -> None:
        names = ", ".join(w.label for w in self.workers)
        while True:
            await self.readiness.wait()
            log.info("ready: %s", names)
            await self.readiness.wait_not_ready()
            if not self._stopping:
                log.warning("not ready: a stream is reconnecting")


def run_host(
    *workers: Worker,
    api_url: str | None = None,
    token_file: str | None = None,
    env: Mapping[str, str] | None = None,
    handle_signals: bool = True,
    configure_logging: bool = True,
    health_addr: str | None = None,
    log_format: str | None = None,
) -> int:
    """Run ``workers`` in this process until SIGINT/SIGTERM; return an exit status.

    For a worker script's ``main()``: builds the client from the environment
    like the CLI (:meth:`EventsClient.from_env`), runs a :class:`WorkerHost`
    under ``trio.run`` and returns ``0`` when stopped by a signal (or when
    every worker ended by itself), ``1`` when a worker failed (a required
    listener that cannot connect, ``403``, a handler with ``stop_on_error``…;
    the error is logged), ``2`` for invalid configuration (no URL or token, a
    bad ``BUS_EVENTS_LISTENER_*`` value).  With ``configure_logging`` and no
    logging set up yet, INFO and above go to stderr, as text or, with
    ``log_format="json"`` (default: ``BUS_EVENTS_LOG_FORMAT``), one JSON object
    per line.  ``health_addr`` (default: ``BUS_EVENTS_HEALTH_ADDR``) serves
    ``/healthz``, ``/readyz`` and ``/metrics`` (see :class:`WorkerHost`).

    Example::

        if __name__ == "__main__":
            sys.exit(run_host(Worker("example.echo", echo)))
    """
    environ = env if env is not None else os.environ
    try:
        fmt = (
            check_log_format(log_format.strip().lower())
            if log_format
            else log_format_from_env(environ)
        )
        where = "health_addr"
        if health_addr is None:
            health_addr, where = environ.get(HEALTH_ADDR_ENV, "").strip(), HEALTH_ADDR_ENV
        if health_addr:
            parse_health_addr(health_addr, where)
    except ConfigError as exc:
        if configure_logging:
            _configure_logging("text")
        log.error("%s", exc)
        return EXIT_USAGE
    if configure_logging:
        _configure_logging(fmt)

    async def main() -> None:
        from .._client import EventsClient

        retry = RetryPolicy.from_env(env)
        async with EventsClient.from_env(api_url=api_url, token_file=token_file, env=env) as client:
            host = WorkerHost(
                client,
                workers,
                retry=retry,
                handle_signals=handle_signals,
                health_addr=health_addr,
            )
            await host.run()

    try:
        trio.run(main)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except BusEventsError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except Exception:
        log.exception("a worker failed")
        return EXIT_FAILURE
    return EXIT_OK
