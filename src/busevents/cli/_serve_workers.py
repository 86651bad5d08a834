"""``serve --workers N``: N provider processes on one address, and their supervisor.

Each worker is a fresh interpreter (``multiprocessing``'s spawn: nothing of the
supervisor's state is shared) running the same server as ``serve`` with
``SO_REUSEPORT``, so the kernel spreads new connections over the workers.  The
supervisor holds the address (bound, not listening: a port chosen once, even
``:0``, stays the workers' while they restart), restarts a worker that dies
(after a pause that grows while it keeps dying at start), and on SIGTERM or
SIGINT stops every worker gracefully; a second signal stops them at once.
Exit status 0 when every worker stopped cleanly.

Only a durable backend may have several workers: with ``memory`` each process
would hold its own events and listeners.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from ._base import EXIT_FAILURE, EXIT_OK, UsageError

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from busevents.provider import ProviderConfig

    from ._output import Diagnostics

__all__ = ["check_workers", "supervise"]

#: Seconds a worker has to come up (connect to its backend, listen).
_START_SECONDS = 60.0
#: Longest pause before restarting a worker that keeps dying.
_MAX_BACKOFF = 10.0
#: A worker that lived this long before dying is restarted at once.
_STABLE_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1


def check_workers(workers: int, backend: str) -> None:
    """Usage errors for ``--workers N`` (N > 1) that cannot work."""
    if backend == "memory":
        raise UsageError(
            f"--workers {workers} needs a shared event store: with --events-backend memory "
            "each process would keep its own events, and a listener on one process would "
            "miss events published through another; use --events-backend redis or postgres "
            "(see docs/backends.md), or one process"
        )
    if not hasattr(socket, "SO_REUSEPORT"):
        raise UsageError(
            f"--workers {workers}: this system has no SO_REUSEPORT; run one process per address"
        )


def _hold(host: str, port: int) -> socket.socket:
    """Bind (not listen) the address with ``SO_REUSEPORT``: the workers join it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _worker(
    config: ProviderConfig,
    addr: tuple[str, int],
    metrics: tuple[str, int] | None,
    label: str,
    pipe: Connection,
    supervisor: int,
) -> None:
    """A worker process: serve until SIGTERM, tell the supervisor the URL once listening."""
    os.setpgrp()  # Ctrl-C in a terminal reaches the supervisor only; it stops us.
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        # The supervisor killed hard: stop too, rather than serve unsupervised.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:
        raise SystemExit(int(EXIT_FAILURE))  # it died while this process started
    from ._output import Diagnostics
    from ._serve import serve_once

    diag = Diagnostics(color=False, quiet=True)  # errors only: the supervisor speaks

    def ready(url: str) -> None:
        pipe.send(url)

    try:
        status = serve_once(config, addr, metrics, label, diag, reuse_port=True, ready=ready)
    except UsageError as exc:
        diag.error(str(exc))
        status = EXIT_FAILURE
    raise SystemExit(int(status))


class _Slot:
    """One worker position: its process, its pipe, its restarts."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: BaseProcess | None = None
        self.pipe: Connection | None = None
        self.started = 0.0
        self.failures = 0
        self.restart_at: float | None = None


def supervise(
    workers: int,
    config: ProviderConfig,
    addr: tuple[str, int],
    metrics: tuple[str, int] | None,
    label: str,
    diag: Diagnostics,
) -> int:
    """Run ``workers`` provider processes on ``addr`` until SIGTERM/SIGINT; the exit status."""
    holders: list[socket.socket] = []
    try:
        for where in (addr, metrics) if metrics is not None else (addr,):
            holders.append(_hold(*where))
    except OSError as exc:
        diag.error(f"cannot listen on {where[0]}:{where[1]}: {exc.strerror or exc}")
        for holder in holders:
            holder.close()
        return EXIT_FAILURE
    # Port 0 chosen once: every worker (and every restart) binds the same port.
    addr = (addr[0], holders[0].getsockname()[1])
    if metrics is not None:
        metrics = (metrics[0], holders[1].getsockname()[1])
    context = multiprocessing.get_context("spawn")
    wake_read, wake_write = socket.socketpair()
    wake_read.setblocking(False)
    wake_write.setblocking(False)
    signals: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        signals.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    old_wakeup = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
    slots = [_Slot(i) for i in range(workers)]

    def start(slot: _Slot) -> None:
        receive, send = context.Pipe(duplex=False)
        process = context.Process(
            target=_worker,
            args=(config, addr, metrics, label, send, os.getpid()),
            name=f"bus-events-worker-{slot.index}",
            daemon=False,
        )
        process.start()
        send.close()
        slot.process, slot.pipe, slot.restart_at = process, receive, None
        slot.started = time.monotonic()

    try:
        for slot in slots:
            start(slot)
        url = _wait_ready(slots, signals, wake_read)
        if url is None:
            return _stop(slots, diag, config.shutdown_grace, failed=True)
        diag.note(f"Events API on {url} ({label}); Ctrl-C stops")
        if metrics is not None:
            diag.note(f"metrics on http://{metrics[0]}:{metrics[1]}/metrics (one worker answers)")
        while not signals:
            _watch(slots, start, wake_read, diag)
        return _stop(slots, diag, config.shutdown_grace, failed=False, signals=signals)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        wake_read.close()
        wake_write.close()
        for holder in holders:
            holder.close()


def _wait_ready(slots: list[_Slot], signals: list[int], wake: socket.socket) -> str | None:
    """The URL once every worker listens; None when one failed to start (or a signal came)."""
    deadline = time.monotonic() + _START_SECONDS
    waiting: dict[Any, _Slot] = {slot.pipe: slot for slot in slots if slot.pipe is not None}
    url = None
    while waiting and not signals:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sentinels = {slot.process.sentinel: slot for slot in slots if slot.process is not None}
        ready = wait([*waiting, *sentinels, wake], timeout=left)
        _drain(wake)
        for item in ready:
            if item in waiting:
                slot = waiting.pop(item)
                assert slot.pipe is not None
                try:
                    url = str(slot.pipe.recv())
                except EOFError:
                    return None
                slot.pipe.close()
                slot.pipe = None
            elif item in sentinels and sentinels[item].pipe in waiting:
                return None  # died before listening: it said why on stderr
    return None if signals else url


def _watch(slots: list[_Slot], start: Any, wake: socket.socket, diag: Diagnostics) -> None:
    """Wait for a worker to die (restart it, maybe later) or for a signal."""
    now = time.monotonic()
    pending = [slot.restart_at for slot in slots if slot.restart_at is not None]
    timeout = max(0.0, min(pending) - now) if pending else None
    alive = {s.process.sentinel: s for s in slots if s.process is not None and s.restart_at is None}
    ready_pipes = {s.pipe: s for s in slots if s.pipe is not None and s.restart_at is None}
    ready = wait([*alive, *ready_pipes, wake], timeout=timeout)
    _drain(wake)
    for item in ready:
        if item in ready_pipes:  # a restarted worker listens again (or died: below)
            slot = ready_pipes[item]
            if slot.pipe is item:
                with contextlib.suppress(EOFError, OSError):
                    item.recv()
                item.close()
                slot.pipe = None
        elif item in alive:
            slot = alive[item]
            assert slot.process is not None
            slot.process.join()
            lived = time.monotonic() - slot.started
            slot.failures = 0 if lived > _STABLE_SECONDS else slot.failures + 1
            pause = min(_MAX_BACKOFF, 0.5 * (2**slot.failures - 1))
            diag.warning(
                f"worker {slot.index + 1} (pid {slot.process.pid}) exited with status "
                f"{slot.process.exitcode}; restarting it" + (f" in {pause:g} s" if pause else "")
            )
            if slot.pipe is not None:
                slot.pipe.close()
                slot.pipe = None
            slot.restart_at = time.monotonic() + pause
    now = time.monotonic()
    for slot in slots:
        if slot.restart_at is not None and slot.restart_at <= now:
            start(slot)


def _stop(
    slots: list[_Slot],
    diag: Diagnostics,
    grace: float,
    *,
    failed: bool,
    signals: list[int] | None = None,
) -> int:
    """SIGTERM every worker (again on a second signal: at once), wait; the exit status."""
    running = [s.process for s in slots if s.process is not None and s.process.is_alive()]
    if not failed:
        diag.note(f"stopping {len(running)} workers (a second signal stops them now)")
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)  # type: ignore[arg-type]
    seen = len(signals or ())
    deadline = time.monotonic() + grace + 10
    for process in running:
        while process.is_alive():
            process.join(timeout=0.1)
            if signals is not None and len(signals) > seen:  # a second signal: at once
                seen = len(signals)
                for other in running:
                    with contextlib.suppress(ProcessLookupError, TypeError):
                        os.kill(other.pid, signal.SIGTERM)  # type: ignore[arg-type]
            if time.monotonic() > deadline:
                process.kill()
    clean = all(process.exitcode == 0 for process in running)
    for slot in slots:
        if slot.pipe is not None:
            slot.pipe.close()
    if failed:
        return EXIT_FAILURE
    diag.note("stopped")
    return EXIT_OK if clean else EXIT_FAILURE


def _drain(wake: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError, OSError):
        while wake.recv(512):
            pass
