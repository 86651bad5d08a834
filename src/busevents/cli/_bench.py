"""``bench``: load-test an Events API deployment (the engine is :mod:`busevents._bench`).

Results — the summary table, or the report as JSON with ``-f json`` — go to
stdout (or ``--output``); the live progress line goes to stderr, and only when
stderr is a terminal.  Exit status 1 when an event was lost or duplicated.
"""

from __future__ import annotations

import math
import re
import sys
from typing import TYPE_CHECKING, Annotated, Literal

from cyclopts import Parameter

from ._base import EXIT_FAILURE, EXIT_OK, Duration, Globals, UsageError, app, current
from ._commands import run_client_command

if TYPE_CHECKING:
    from .._bench import Bench, BenchPlan, BenchReport, Latency

__all__ = ["bench", "render_plan", "render_summary"]

_RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*s)?\s*", re.ASCII)
#: Rows of publishers or listeners shown one by one; beyond, min / median / max.
_MAX_ROWS = 8
_PROGRESS_EVERY = 0.5
_MAX_PROBLEMS = 10
_ONE_SECOND = Duration(1.0)
_NO_DELAY = Duration(0.0)
_SUMMARISED = "; rows: lowest, median and highest events/s, every one in the JSON report"


def _rate(text: str) -> float:
    match = _RATE.fullmatch(text)
    if not match or not float(match.group(1)) > 0:
        raise UsageError(f"--rate {text!r}: expected events per second, e.g. 500 or 500/s")
    return float(match.group(1))


@app.command
def bench(
    *,
    name: Annotated[
        str,
        Parameter(help="Event name to bench, in a namespace you own (e.g. bench.my-team)."),
    ],
    publishers: Annotated[int, Parameter(help="Concurrent publishers.")] = 1,
    listeners: Annotated[int, Parameter(help="Listeners (0: measure publishing only).")] = 1,
    delivery: Annotated[
        Literal["broadcast", "unicast"],
        Parameter(help="broadcast: every listener gets each event; unicast: one of the group."),
    ] = "broadcast",
    group: Annotated[
        str | None, Parameter(help="Unicast group of the listeners. [default: bench]")
    ] = None,
    events: Annotated[
        int | None,
        Parameter(help="Measured events, over all publishers. [default: 10000 without --duration]"),
    ] = None,
    duration: Annotated[
        Duration | None,
        Parameter(help="Publish for this long instead (after the warmup), e.g. 30s."),
    ] = None,
    rate: Annotated[
        str | None,
        Parameter(help="Limit publishing to this many events/s in total, e.g. 500/s."),
    ] = None,
    payload_size: Annotated[int, Parameter(help="Bytes of JSON payload per event.")] = 256,
    warmup: Annotated[
        Duration, Parameter(help="Publish this long first, left out of the figures.")
    ] = _ONE_SECOND,
    report: Annotated[
        str | None, Parameter(help="Also write the report as JSON to this file.")
    ] = None,
    dry_run: Annotated[
        bool, Parameter(negative="", help="Print the plan and send nothing.")
    ] = False,
    processes: Annotated[
        int, Parameter(help="Spread publishers and listeners over this many processes.")
    ] = 1,
    listener_delay: Annotated[
        Duration,
        Parameter(help="Pause each listener this long after every read (plays a slow consumer)."),
    ] = _NO_DELAY,
    allow_reserved: Annotated[
        bool, Parameter(negative="", help="Allow a --name in the platform's bus. namespace.")
    ] = False,
) -> int:
    """Load-test the deployment: publish events, receive them, report throughput and latency.

    Listeners open their streams first; then publishers send sequence-numbered,
    timestamped events until --events or --duration is reached (or Ctrl-C:
    a partial report).  Prints throughput per publisher and listener, latency
    percentiles (publish round trip and end-to-end), lost, duplicated and
    re-ordered events, and HTTP errors by status.  Exit 1 when an event was
    lost or duplicated.

    Example: bus-events bench --name bench.my-team --publishers 4 --listeners 10 --rate 1000/s
    """
    from busevents import ConfigError, Delivery

    from .._bench import BenchPlan, check_plan

    try:
        plan = check_plan(
            BenchPlan(
                name=name,
                publishers=publishers,
                listeners=listeners,
                delivery=Delivery(delivery),
                group=group,
                events=events,
                duration=None if duration is None else float(duration),
                rate=None if rate is None else _rate(rate),
                payload_size=payload_size,
                warmup=float(warmup),
                processes=processes,
                listener_delay=float(listener_delay),
                allow_reserved=allow_reserved,
            )
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    g = current()
    if dry_run:
        return _dry_run(g, plan, report)
    if report is not None and (problem := _unwritable(report)):
        # Found out now rather than after a long run.
        g.diagnostics().error(f"cannot write the report to {report}: {problem}")
        return EXIT_FAILURE
    return run_client_command(lambda g: _run(g, plan, report))


def _unwritable(path: str) -> str | None:
    """Why ``path`` cannot be written, or None when it looks writable (nothing is created)."""
    import os

    target = os.path.abspath(path)
    if os.path.isdir(target):
        return "it is a directory"
    if os.path.exists(target):
        return None if os.access(target, os.W_OK) else "permission denied"
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        return f"no such directory {folder}"
    return None if os.access(folder, os.W_OK) else "permission denied"


def _dry_run(g: Globals, plan: BenchPlan, report: str | None) -> int:
    import msgspec

    from busevents import ConfigError, find_token, normalize_events_url, resolve_url

    try:
        url = normalize_events_url(resolve_url(g.api_url))
        token = find_token(g.token_file)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    results = g.results()
    results.open()
    try:
        if g.format == "json":
            body = {"dry_run": True, "target": url, "token": token.source, "plan": plan}
            results.write(msgspec.json.encode(body) + b"\n")
        else:
            results.write(render_plan(plan, url, token.source, report).encode())
    finally:
        results.close()
    return EXIT_OK


async def _run(g: Globals, plan: BenchPlan, report_path: str | None) -> int:
    import trio

    from busevents import find_token, resolve_url

    from .._bench import Bench

    bench = Bench(
        plan, url=resolve_url(g.api_url), token=find_token(g.token_file), timeout=g.timeout
    )
    diag = g.diagnostics()
    diag.note(
        f"bench {plan.name}: {plan.publishers} publisher(s), {plan.listeners} {plan.delivery} "
        f"listener(s), run {bench.run_id}; Ctrl-C stops with a partial report"
    )
    live = not g.quiet and sys.stderr.isatty()
    try:
        async with trio.open_nursery() as nursery:
            if live:
                nursery.start_soon(_progress_line, bench)
            result = await bench.run()
            nursery.cancel_scope.cancel()
    finally:
        if live:
            _stderr("\r\x1b[K")
        # Cancelled by Ctrl-C (the effective deadline is then in the past): still
        # report what was measured.  Any other error ends the run without a report.
        if not bench.completed and trio.current_effective_deadline() == -math.inf:
            _write_report(g, bench.report(), report_path)
    written = _write_report(g, result, report_path)
    return EXIT_OK if result.verdict.ok and written else EXIT_FAILURE


def _write_report(g: Globals, report: BenchReport, path: str | None) -> bool:
    """Write the summary (or JSON) to the results and the JSON to ``path``; False if it failed."""
    import msgspec

    encoded = msgspec.json.encode(report)
    written = True
    if path is not None:
        try:
            with open(path, "wb") as fh:
                fh.write(msgspec.json.format(encoded, indent=2) + b"\n")
        except OSError as exc:
            g.diagnostics().error(f"cannot write the report to {path}: {exc.strerror or exc}")
            written = False
    results = g.results()
    results.open()
    try:
        if g.format == "json":
            results.write(encoded + b"\n")
        else:
            results.write(render_summary(report).encode())
    finally:
        results.close()
    return written


def _stderr(text: str) -> None:
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass


async def _progress_line(bench: Bench) -> None:
    """Rewrite one stderr line: phase, elapsed time, events/s sent and received, errors."""
    import trio

    began = trio.current_time()
    last = bench.progress()
    while True:
        await trio.sleep(_PROGRESS_EVERY)
        now = bench.progress()
        sent = (now.sent - last.sent) / _PROGRESS_EVERY
        received = (now.received - last.received) / _PROGRESS_EVERY
        _stderr(
            f"\r\x1b[K{trio.current_time() - began:6.1f}s  {now.phase:<9}  "
            f"sent {now.sent:>9} ({sent:>8.0f}/s)  received {now.received:>10} "
            f"({received:>9.0f}/s)  errors {now.errors}"
        )
        last = now


# -- rendering ---------------------------------------------------------------------


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def _plan_line(plan: BenchPlan) -> str:
    amount = f"{plan.events} events" if plan.events is not None else f"{plan.duration:g}s"
    rate = f"at most {plan.rate:g} events/s" if plan.rate else "no rate limit"
    receivers = f"{plan.listeners} {plan.delivery} listener(s)"
    if plan.group:
        receivers += f" in group {plan.group}"
    return (
        f"{plan.publishers} publisher(s) -> {receivers}; {amount} of {plan.payload_size} B, "
        f"{rate}, warmup {plan.warmup:g}s"
        + (f", {plan.processes} processes" if plan.processes > 1 else "")
    )


def render_plan(plan: BenchPlan, url: str, token_source: str, report: str | None) -> str:
    """The ``--dry-run`` text: what would be sent where, and with what."""
    per = f"{plan.rate / plan.publishers:g}/s each" if plan.rate else "as fast as answered"
    lines = [
        "bench plan (dry run: nothing was sent)",
        f"  target       {url}",
        f"  token        from {token_source}",
        f"  event name   {plan.name}",
        f"  delivery     {plan.delivery}"
        + (f" (group {plan.group}: each event to one listener)" if plan.group else "")
        + (" (every listener gets every event)" if plan.group is None else ""),
        f"  publishers   {plan.publishers} ({per})",
        f"  listeners    {plan.listeners}"
        + (f" (each pausing {plan.listener_delay:g}s per read)" if plan.listener_delay else ""),
        "  amount       "
        + (
            f"{plan.events} measured events"
            if plan.events is not None
            else f"publish for {plan.duration:g}s"
        )
        + f", after a {plan.warmup:g}s warmup",
        f"  rate         {f'{plan.rate:g} events/s in total' if plan.rate else 'unlimited'}",
        f"  payload      {plan.payload_size} bytes per event",
        f"  processes    {plan.processes}",
        f"  connections  {plan.publishers + plan.listeners} (one per publisher and listener)",
    ]
    if report:
        lines.append(f"  report       {report}")
    return "\n".join(lines) + "\n"


def _rows(
    label: str, rows: list[tuple[int, list[str]]], sort_key: int
) -> list[tuple[str, list[str]]]:
    """One row per participant, or min / median / max rows when there are many."""
    if len(rows) <= _MAX_ROWS:
        return [(f"{label} {id}", cells) for id, cells in rows]
    ordered = sorted(rows, key=lambda row: float(row[1][sort_key]))
    picks = [("min", ordered[0]), ("median", ordered[len(ordered) // 2]), ("max", ordered[-1])]
    return [(f"{label} {row[0]} ({what})", row[1]) for what, row in picks]


def _table(header: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    widths = [max(len(header[0]), *(len(r[0]) + 2 for r in rows))]
    for col in range(1, len(header)):
        widths.append(max(len(header[col]), *(len(r[1][col - 1]) for r in rows)))
    lines = [
        header[0].ljust(widths[0])
        + "".join(f"  {h:>{w}}" for h, w in zip(header[1:], widths[1:], strict=True))
    ]
    for label, cells in rows:
        lines.append(
            ("  " + label).ljust(widths[0])
            + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths[1:], strict=True))
        )
    return lines


def _latency_cells(latency: Latency) -> list[str]:
    if not latency.count:
        return ["-"] * 6
    return [_ms(v) for v in (latency.p50, latency.p90, latency.p99, latency.p99_9, latency.max)] + [
        str(latency.count)
    ]


def render_summary(report: BenchReport) -> str:
    """The summary table of a report, as ``bench`` prints it."""
    plan, pub, dlv, verdict = report.plan, report.publish, report.delivery, report.verdict
    out = [
        f"bus-events bench: {plan.name} at {report.target} (run {report.run_id})"
        + ("  INTERRUPTED: partial figures" if report.interrupted else ""),
        _plan_line(plan),
        "",
    ]
    pub_rows = _rows(
        "publisher",
        [(p.id, [str(p.accepted), str(p.errors), f"{p.events_per_s:.1f}"]) for p in pub.publishers],
        2,
    )
    pub_rows.append(
        ("total", [str(pub.accepted), str(sum(pub.errors.values())), f"{pub.events_per_s:.1f}"])
    )
    out += _table(["publish", "events", "errors", "events/s"], pub_rows)
    out.append(
        f"  (measured over {pub.window_s:g}s; {pub.warmup_accepted} warmup events not counted"
        + (_SUMMARISED if len(pub.publishers) > _MAX_ROWS else "")
        + ")"
    )
    out.append("")
    if plan.listeners:
        unicast = dlv.mode == "unicast"
        dlv_rows = _rows(
            "listener",
            [
                (
                    li.id,
                    [str(li.received), f"{li.events_per_s:.1f}"]
                    + (["-", "-"] if unicast else [str(li.lost), str(li.duplicated)])
                    + [str(li.out_of_order)],
                )
                for li in dlv.listeners
            ],
            1,
        )
        dlv_rows.append(
            (
                f"group {dlv.group}" if unicast else "total",
                [
                    str(dlv.received),
                    f"{dlv.events_per_s:.1f}",
                    str(dlv.lost),
                    str(dlv.duplicated),
                    str(dlv.out_of_order),
                ],
            )
        )
        out += _table(["deliver", "events", "events/s", "lost", "dup", "reordered"], dlv_rows)
        extra = [f"measured over {dlv.window_s:g}s"]
        if len(dlv.listeners) > _MAX_ROWS:
            extra.append(_SUMMARISED.removeprefix("; "))
        if dlv.in_flight:
            extra.append(f"{dlv.in_flight} still in flight when interrupted")
        if dlv.foreign:
            extra.append(f"{dlv.foreign} events from elsewhere ignored")
        out.append(f"  ({'; '.join(extra)})")
        out.append("")
    lat_rows = [("publish (round trip)", _latency_cells(pub.latency_us))]
    if plan.listeners:
        lat_rows.append(("end-to-end", _latency_cells(dlv.latency_us)))
    out += _table(["latency (ms)", "p50", "p90", "p99", "p99.9", "max", "count"], lat_rows)
    out.append("")
    errors = ", ".join(f"{k}: {v}" for k, v in pub.errors.items()) or "none"
    out.append(
        f"HTTP errors: {errors}" + (f" ({pub.in_doubt} events in doubt)" if pub.in_doubt else "")
    )
    if not verdict.checked:
        out.append("verdict: delivery not checked (no listeners)")
    elif verdict.ok:
        who = "the group" if plan.group else "every listener"
        out.append(f"verdict: OK, {who} got every event exactly once")
    else:
        out.append("verdict: FAILED")
    out += [f"  {problem}" for problem in verdict.problems[:_MAX_PROBLEMS]]
    if len(verdict.problems) > _MAX_PROBLEMS:
        out.append(f"  … and {len(verdict.problems) - _MAX_PROBLEMS} more (see the JSON report)")
    return "\n".join(out) + "\n"
