"""The peer rows: NATS (nats-py against the local nats-server), beside busevents' own.

A reference, not a target: where an HTTP/NDJSON event API stands against a
binary-protocol broker on the same machine.  Skipped when nats-py is not
installed or nothing listens on 127.0.0.1:4222.
"""

from __future__ import annotations

import secrets
import socket
from typing import Any

from . import _workload
from ._procs import (
    WorkerError,
    finish_worker,
    missing_modules,
    progress,
    run_worker,
    started_worker,
)
from ._rows import Options, Row

__all__ = ["NATS_URL", "measure_nats"]

NATS_URL = "nats://127.0.0.1:4222"


def _nats_reason() -> str | None:
    missing = missing_modules("nats")
    if missing:
        return missing.replace("needs nats", "needs nats-py")
    try:
        socket.create_connection(("127.0.0.1", 4222), timeout=2).close()
    except OSError as exc:
        return f"no NATS server on 127.0.0.1:4222 ({exc.strerror or exc})"
    return None


def _row(row: str, result: dict[str, Any], expected: int) -> Row:
    r = Row.of(row)
    r.events, r.seconds = result["events"], result["seconds"]
    r.value = result["events"] / result["seconds"]
    r.intact = result["events"] == expected and result["last_id"] == _workload.last_id(expected)
    cpu = result["cpu"]
    r.details = {"cpu_seconds": cpu, "cpu_us_per_message": cpu / max(1, expected) * 1e6}
    return r


def measure_nats(opts: Options, rows: list[str], out: dict[str, Row]) -> None:
    """nats-py publish (core and JetStream) and subscriber throughput."""
    todo = [r for r in ("nats.pub", "nats.jspub", "nats.sub") if r in rows]
    if not todo:
        return
    reason = _nats_reason()
    if reason:
        for row in todo:
            out[row] = Row.of(row, skipped=reason)
        return
    n = opts.nats_events
    tag = secrets.token_hex(4)
    base = {"server": NATS_URL, "events": n, "timeout": opts.worker_timeout}
    progress(f"nats: {', '.join(todo)} ({n:,} messages of 200 B)")
    for row in todo:
        try:
            if row == "nats.pub":
                result = run_worker(
                    "nats-pub", {**base, "subject": f"bench.{tag}.pub"}, timeout=opts.worker_timeout
                )
            elif row == "nats.jspub":
                jn = max(1, n // 10)  # acknowledged one by one: a tenth of the messages
                params = {**base, "events": jn, "concurrency": opts.provider_connections}
                params |= {"subject": f"benchjs.{tag}", "stream": f"BENCH_{tag}"}
                result = run_worker("nats-jspub", params, timeout=opts.worker_timeout)
            else:
                params = {**base, "subject": f"bench.{tag}.sub"}
                with started_worker("nats-sub", params, timeout=30) as subscriber:
                    run_worker("nats-pub", params, timeout=opts.worker_timeout)
                    result = finish_worker(subscriber, "nats-sub", timeout=opts.worker_timeout)
        except WorkerError as exc:
            out[row] = Row.of(row, error=str(exc))
            continue
        expected = max(1, n // 10) if row == "nats.jspub" else n
        out[row] = _row(row, result, expected)
    _compare(out)


def _compare(out: dict[str, Row]) -> None:
    """Ratios to busevents' matching rows: events/s of NATS / of busevents (nats.jspub the
    other way round: the SDK's acknowledged publish / JetStream's, issue 24's target)."""
    pairs = {"nats.pub": "publish.sdk", "nats.jspub": "publish.sdk", "nats.sub": "sdk.batches"}
    for row, ours in pairs.items():
        r, o = out.get(row), out.get(ours)
        if r and o and r.usable() and o.usable():
            assert r.value and o.value
            r.ratio, r.ratio_of = r.value / o.value, f"/ {ours}"
            if row == "nats.jspub":  # issue 24: the SDK's acknowledged publish against it
                r.ratio, r.ratio_of, r.target = o.value / r.value, f"{ours} / this", ">= 0.4"
    sub, cli = out.get("nats.sub"), out.get("cli.pipe")
    if sub and cli and sub.usable() and cli.usable():
        assert sub.value and cli.value
        sub.note = f"/ cli.pipe = {sub.value / cli.value:.2f}"
    jspub, raw = out.get("nats.jspub"), out.get("publish.raw")
    if jspub and raw and jspub.usable() and raw.usable():
        assert jspub.value and raw.value
        jspub.note = f"/ publish.raw = {jspub.value / raw.value:.1f}"
