"""The harness: run the selected rows in one process tree, print the table, save JSON.

Process tree: this process only orchestrates and times subprocesses.  The
source server (:mod:`._source`) and the reference provider (:mod:`._provider`)
run in their own processes; every measured client runs in a fresh worker
(:mod:`._run`) or is the real command (``bus-events``, ``curl``, ``wrk``, …).

Modules: :mod:`._rows` (the catalogue and options), :mod:`._throughput` (the
stream rows), :mod:`._commands` (whole-command timings), :mod:`._provider_rows`
(publishing and latency), :mod:`._nats_rows` (the peer), :mod:`._report`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _registry, _workload
from ._commands import measure_send, measure_startup
from ._nats_rows import measure_nats
from ._procs import background, missing_modules
from ._provider_rows import (
    measure_bench_cli,
    measure_latency,
    measure_latency_fanout,
    measure_provider_publish,
    measure_source_publish,
    measure_wrk,
    wrk_or_reason,
)
from ._report import derive, format_table, meta
from ._rows import DEFAULT_EVENTS, DEFAULT_JSON, QUICK_EVENTS, ROWS, Options, Row, selected
from ._source import events_url, prime
from ._throughput import STREAM_ROWS, measure_rss, measure_throughput
from .cluster import measure_cluster

__all__ = ["Options", "main", "run"]

_EXTRA = _registry.load()  # their rows join the catalogue now, before any option is read
_PROVIDER_GROUPS = ("send", "latency", "provider", "bench")
_PROVIDER_PUBLISH = ("publish.raw", "publish.sdk", "publish.raw.cpu", "publish.sdk.cpu")
_SOURCE_PUBLISH = ("publish.reuse", "publish.new-connection", "publish.new-client")


def _source_phase(opts: Options, rows: list[str], out: dict[str, Row]) -> None:
    """Every row that talks to the source server: its streams, and issue 3's publishing."""
    argv = [sys.executable, "-m", "benchmarks._source", "--events", str(opts.events)]
    with background(argv) as (hello, _):
        port = int(hello["port"])
        if (STREAM_ROWS - {"rss"}) & set(rows):
            prime(port, opts.rss_events if "rss" in rows else opts.events)
            measure_throughput(opts, rows, out, port)
        if "rss" in rows:
            measure_rss(opts, out, port)
        # Against the source, which answers at once: the rows compare the client's
        # connection handling, not the reference provider's speed.
        measure_source_publish(opts, rows, out, events_url(port, 0), "bench")


def _provider_phase(opts: Options, rows: list[str], out: dict[str, Row]) -> None:
    """Every row that talks to the reference provider, quiet rows first, load last."""
    todo = [r for r in rows if ROWS[r] in _PROVIDER_GROUPS or r in _PROVIDER_PUBLISH]
    missing = missing_modules("h11", "jwt", "prometheus_client")
    if missing:
        for row in todo:
            out[row] = Row.of(row, skipped=f"reference provider {missing}")
        return
    with background([sys.executable, "-m", "benchmarks._provider"]) as (hello, provider):
        url, token = hello["url"], hello["token"]
        if {"send.python", "send.cli", "send.curl"} & set(todo):
            measure_send(opts, rows, out, url, token)
        if "latency" in todo:
            measure_latency(opts, out, url, token)
        if "latency.fanout" in todo:
            measure_latency_fanout(opts, out, url, token, provider.pid)
        measure_provider_publish(opts, rows, out, url, token)
        if {"provider.wrk", "bench.cli"} & set(todo):
            reason = wrk_or_reason(opts)
            if reason is None:
                measure_wrk(opts, out, url, token, provider.pid)
            else:
                out["provider.wrk"] = Row.of("provider.wrk", skipped=reason)
        if "bench.cli" in todo:
            measure_bench_cli(opts, out, url, token)


def run(opts: Options) -> dict[str, Any]:
    """Run the selected rows; return the report (also written to ``opts.json_path``)."""
    started, load_start = time.time(), os.getloadavg()
    rows = selected(opts.only)
    out: dict[str, Row] = {}
    phases: list[Callable[[], None]] = []
    if STREAM_ROWS & set(rows) or set(_SOURCE_PUBLISH) & set(rows):
        phases.append(lambda: _source_phase(opts, rows, out))
    if {"startup.python", "startup.version", "startup.help"} & set(rows):
        phases.append(lambda: measure_startup(opts, rows, out))
    if any(ROWS[r] in _PROVIDER_GROUPS or r in _PROVIDER_PUBLISH for r in rows):
        phases.append(lambda: _provider_phase(opts, rows, out))
    if any(ROWS[r] == "nats" for r in rows):
        phases.append(lambda: measure_nats(opts, rows, out))
    if "cluster.publish" in rows:
        phases.append(lambda: measure_cluster(opts, out))
    for module in _EXTRA:
        if {row for row, _, _ in module.TABLE} & set(rows):
            phases.append(lambda module=module: module.measure(opts, rows, out))
    if any(ROWS[r] == "scale" for r in rows):
        from .scale import measure_scale

        phases.append(lambda: measure_scale(opts.quick, rows, out))
    for phase in phases:
        try:
            phase()
        except Exception as exc:  # a harness bug: keep the rows measured so far
            traceback.print_exc()
            for row in rows:
                if row not in out and row != "H":
                    out[row] = Row.of(row, error=f"the harness failed: {exc!r}"[:300])
    derive(out)
    ordered = [out[r] for r in ROWS if r in out]
    report = {"meta": meta(opts, started, load_start), "rows": [r.as_json() for r in ordered]}
    opts.json_path.parent.mkdir(parents=True, exist_ok=True)
    opts.json_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the busevents benchmark table (issues 3 and 14): throughput, "
        "pipes, memory, start-up, publish, the provider, latency and the NATS peer, "
        "as ratios measured in one run.",
    )
    parser.add_argument(
        "--events",
        type=int,
        metavar="N",
        help=f"events per throughput stream (default {DEFAULT_EVENTS:,}; "
        f"{QUICK_EVENTS:,} with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run (seconds)")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, metavar="PATH", help="where to write the report"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="ROW",
        help="run only these rows or groups (repeatable or comma-separated); rows their "
        "ratios need are added. Groups: " + ", ".join(dict.fromkeys(ROWS.values())),
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the throughput rows")
    parser.add_argument(
        "--no-install", action="store_true", help="do not apt-get install wrk when it is missing"
    )
    parser.add_argument("--list", action="store_true", help="list the rows and groups, and exit")
    args = parser.parse_args(argv)
    if args.list:
        for row, group in ROWS.items():
            print(f"{row:24} {group}")
        raise SystemExit(0)
    only = {t.strip() for o in args.only or () for t in o.split(",") if t.strip()} or None
    if args.events is not None and args.events < 1:
        parser.error("--events must be at least 1")
    opts = Options.build(args.events, args.quick, args.json, only)
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        opts.rounds = args.rounds
    if args.no_install:
        opts.install_tools = False
    return opts


def main(argv: list[str] | None = None, *, emit: Callable[[str], None] = print) -> int:
    """``python -m benchmarks``: run, print the table, write the JSON; 0 unless a row failed."""
    opts = _parse(argv)
    report = run(opts)
    rows = [Row(**r) for r in report["rows"]]
    meta = report["meta"]
    emit(
        f"busevents benchmarks: {opts.events:,} events x {_workload.LINE_SIZE} B "
        f"({opts.events * _workload.LINE_SIZE / 1e6:.0f} MB), {opts.rounds} round(s); "
        f"{meta['machine']['cpus']} CPUs, load {meta['machine']['loadavg_start'][0]:.2f} -> "
        f"{meta['machine']['loadavg_end'][0]:.2f}; {meta['duration_s']} s"
    )
    emit(f"uptime: {meta['machine']['uptime_end']}")
    emit(format_table(rows))
    emit(f"JSON: {opts.json_path}")
    broken = [r.id for r in rows if r.error or r.intact is False]
    if broken:
        emit(f"rows that failed or lost events: {', '.join(broken)}")
        return 1
    return 0
