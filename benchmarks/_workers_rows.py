"""``serve --workers`` on Redis (issue 20): publish rate of 2 worker processes ÷ 1.

Two real ``bus-events serve --events-backend redis`` commands (``--workers 1``
and ``--workers 2``, each on its own key prefix, deleted afterwards) run side
by side; wrk (1 thread, 16 connections) POSTs to each in alternating rounds and
the best round of each is kept.  The note gives the provider CPU per publish
(summed over the worker processes) and Redis's own CPU per publish
(``INFO cpu``): on a 2-core machine wrk, Redis and the workers share the two
cores, which is what bounds the ratio.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from ._procs import ROOT, bus_events, child_env, progress, stop
from ._provider_rows import run_wrk, wrk_or_reason
from ._rows import Options, Row, register

__all__ = ["TABLE", "measure"]

TABLE = (
    ("workers.redis.1", "workers", "serve --workers 1, Redis backend, under wrk"),
    ("workers.redis.2", "workers", "serve --workers 2, Redis backend / --workers 1"),
)
register(TABLE, {"workers.redis.2": ("workers.redis.1",)})

_CONNECTIONS = 16
_REDIS_ENV = "BUS_EVENTS_REDIS_ADDR"


def _redis_addr() -> str:
    return os.environ.get(_REDIS_ENV, "127.0.0.1:6379")


def _redis(*args: str) -> str:
    host, _, port = _redis_addr().rpartition(":")
    found = subprocess.run(
        ["redis-cli", "-h", host, "-p", port, *args], capture_output=True, timeout=30, check=True
    )
    return found.stdout.decode()


def _redis_cpu() -> float | None:
    with suppress(OSError, subprocess.SubprocessError):
        info = _redis("INFO", "cpu")
        values = dict(re.findall(r"(used_cpu_(?:sys|user)):([\d.]+)", info))
        return float(values["used_cpu_sys"]) + float(values["used_cpu_user"])
    return None


def _redis_missing() -> str | None:
    host, _, port = _redis_addr().rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            pass
    except OSError as exc:
        return f"no Redis at {_redis_addr()} ({exc.strerror or exc}; set {_REDIS_ENV})"
    return None


def _workers_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(p) for p in file.read().split()] or [pid]


@contextmanager
def _serve(workers: int, secret: str, prefix: str) -> Iterator[tuple[str, list[int]]]:
    """``bus-events serve --workers N`` on a free port: its URL and its process ids."""
    argv = [*bus_events(), "serve", "--addr", "127.0.0.1:0", "--workers", str(workers)]
    argv += ["--events-backend", "redis", "--redis-prefix", prefix, "--history", "10000"]
    env = child_env({"BUS_API_JWT_SECRET": secret, _REDIS_ENV: _redis_addr()})
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=env
    )
    try:
        assert proc.stderr is not None
        seen = b""
        deadline = time.monotonic() + 120
        while not (match := re.search(rb"on (http://\S+/api/v1/events)", seen)):
            line = proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                raise RuntimeError(f"serve --workers {workers} did not start: {seen[-300:]!r}")
            seen += line
        pids = _workers_of(proc.pid) if workers > 1 else [proc.pid]
        yield match.group(1).decode(), pids
    finally:
        stop(proc)  # SIGTERM: the supervisor stops its workers
        with suppress(OSError, subprocess.SubprocessError):
            keys = _redis("--scan", "--pattern", prefix + "*").split()
            if keys:
                _redis("DEL", *keys)


def measure(opts: Options, rows: list[str], out: dict[str, Row]) -> None:
    one, two = Row.of("workers.redis.1"), Row.of("workers.redis.2", target=">= 1.5")
    out["workers.redis.1"], out["workers.redis.2"] = one, two
    reason = wrk_or_reason(opts) or _redis_missing()
    if reason is not None:
        one.skipped = two.skipped = reason
        return
    from busevents.provider import mint_token

    secret = secrets.token_hex(32)
    token = mint_token(secret.encode(), subject="bench", scopes="events:send events:listen")
    run = secrets.token_hex(4)
    rounds = 1 if opts.quick else opts.rounds
    seconds = opts.wrk_seconds
    samples: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    failures: list[str] = []
    with (
        _serve(1, secret, f"bench-{run}-w1:") as (url1, pids1),
        _serve(2, secret, f"bench-{run}-w2:") as (url2, pids2),
    ):
        for index in range(rounds):
            progress(f"workers.redis round {index + 1}/{rounds} ({_CONNECTIONS} connections)")
            for n, url, pids in ((1, url1, pids1), (2, url2, pids2)):
                redis_before = _redis_cpu()
                figures = run_wrk(url, token, pids, seconds, _CONNECTIONS)
                redis_after = _redis_cpu()
                if redis_before is not None and redis_after is not None:
                    figures["redis_cpu_seconds"] = redis_after - redis_before
                if "error" in figures or figures["non_2xx"] or figures["socket_errors"]:
                    failures.append(f"--workers {n}: {figures.get('error') or figures}")
                else:
                    samples[n].append(figures)
    for n, row in ((1, one), (2, two)):
        if not samples[n]:
            row.error = "; ".join(failures)[:300] or "no round ran"
            continue
        best = max(samples[n], key=lambda f: f["rate"])
        requests = max(1, int(best.get("requests", 1)))
        row.value, row.events, row.seconds = best["rate"], requests, best.get("seconds")
        row.intact = not failures
        row.details = {"rounds": [f["rate"] for f in samples[n]], **best}
        row.note = (
            f"{_CONNECTIONS} connections; provider CPU "
            f"{best['server_cpu_seconds'] / requests * 1e6:,.0f} µs/publish"
        )
        if "redis_cpu_seconds" in best:
            row.note += f", Redis {best['redis_cpu_seconds'] / requests * 1e6:,.0f} µs/publish"
    if one.usable() and two.usable():
        assert one.value and two.value
        two.ratio, two.ratio_of = two.value / one.value, "/ workers.redis.1"
        two.note += f"; {os.cpu_count()} CPUs shared with wrk and Redis"
