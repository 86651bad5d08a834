"""The rows that publish: against the source server (issue 3) and the reference provider (14).

* ``publish.reuse`` / ``new-connection`` / ``new-client``: SDK connection handling,
  against the source server, which accepts a POST at once.
* ``publish.raw`` / ``publish.sdk`` (+ ``.cpu``): the SDK's ``send`` on one client, 8
  concurrent, against a minimal trio publisher, both on the reference provider, in
  alternating rounds: publish rate, and client CPU per request (the target: at most 3 times).
* ``provider.wrk``: wrk POSTing to the provider (its publishes/s per process, target 3,000,
  and its CPU per publish);
  ``bench.cli``: ``bus-events bench`` with as many publishers as wrk has connections.
* ``latency`` (one listener, 250 events/s) and ``latency.fanout`` (10 listeners in two
  processes, 1,000 events/s from a paced minimal publisher): publish → delivery.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

from ._procs import (
    WorkerError,
    bus_events,
    finish_worker,
    progress,
    run_worker,
    started_worker,
    timed,
)
from ._rows import Options, Row

__all__ = [
    "measure_bench_cli",
    "measure_latency",
    "measure_latency_fanout",
    "measure_provider_publish",
    "measure_source_publish",
    "measure_wrk",
    "process_cpu",
    "run_wrk",
    "wrk_or_reason",
]


def _publish_row(row: str, result: dict[str, Any] | WorkerError, expected: int) -> Row:
    r = Row.of(row)
    if isinstance(result, WorkerError):
        r.error = str(result)
        return r
    r.events, r.seconds = result["events"], result["seconds"]
    r.value = result["events"] / result["seconds"]
    r.intact = result["events"] == expected
    r.details["cpu_seconds"] = result["cpu"]
    r.details["cpu_us_per_request"] = result["cpu"] / max(1, result["events"]) * 1e6
    return r


def measure_source_publish(
    opts: Options, rows: list[str], out: dict[str, Row], url: str, token: str
) -> None:
    """Issue 3's rows: SDK ``send`` reusing one client, vs a connection or a client per event."""
    counts = {
        "publish.reuse": opts.publish_count,
        "publish.new-connection": max(10, opts.publish_count // 4),
        "publish.new-client": max(10, opts.publish_count // 10),
    }
    todo = {row: count for row, count in counts.items() if row in rows}
    if not todo:
        return
    runs = {
        row: {
            "url": url,
            "token": token,
            "mode": row.removeprefix("publish."),
            "count": count,
            "concurrency": opts.publish_concurrency,
        }
        for row, count in todo.items()
    }
    results: dict[str, dict[str, Any] | WorkerError] = {}
    if opts.quick:  # one process for all three: checking, not measuring
        progress(f"{', '.join(todo)} (one worker)")
        try:
            multi = run_worker(
                "multi",
                {"runs": [("publish", params) for params in runs.values()]},
                timeout=opts.worker_timeout,
            )
            results = dict(zip(runs, multi["results"], strict=True))
        except WorkerError as exc:
            results = dict.fromkeys(runs, exc)
    else:
        for row, params in runs.items():
            progress(f"{row} ({todo[row]} events, {opts.publish_concurrency} tasks)")
            try:
                results[row] = run_worker("publish", params, timeout=opts.worker_timeout)
            except WorkerError as exc:
                results[row] = exc
    for row, result in results.items():
        r = out[row] = _publish_row(row, result, todo[row])
        r.note = f"{opts.publish_concurrency} concurrent tasks"
    reuse = out.get("publish.reuse")
    for row in ("publish.new-connection", "publish.new-client"):
        other = out.get(row)
        if reuse and other and reuse.value and other.value:
            other.ratio = reuse.value / other.value
            other.ratio_of = "reuse / this"
            if row == "publish.new-connection":
                other.target = ">= 5"


def measure_provider_publish(
    opts: Options, rows: list[str], out: dict[str, Row], url: str, token: str
) -> None:
    """Issue 14, target 1: SDK vs minimal publisher on the provider, alternating rounds."""
    kinds = {"publish.raw": ("publish-raw", {}), "publish.sdk": ("publish", {"mode": "reuse"})}
    todo = {r: k for r, k in kinds.items() if r in rows or f"{r}.cpu" in rows}
    if not todo:
        return
    count, conc = opts.provider_publish_count, opts.provider_connections
    samples: dict[str, list[dict[str, Any]]] = {r: [] for r in todo}
    errors: dict[str, WorkerError] = {}
    rounds = 1 if opts.quick else opts.rounds
    for index in range(rounds):
        progress(f"provider publish round {index + 1}/{rounds}: {', '.join(todo)} ({count:,})")
        for row, (kind, extra) in todo.items():
            params = {"url": url, "token": token, "count": count, "concurrency": conc, **extra}
            try:
                samples[row].append(run_worker(kind, params, timeout=opts.worker_timeout))
            except WorkerError as exc:
                errors[row] = exc
    for row in todo:
        if not samples[row]:
            out[row] = Row.of(row, error=str(errors[row]))
            out[f"{row}.cpu"] = Row.of(f"{row}.cpu", error=str(errors[row]))
            continue
        fastest = min(samples[row], key=lambda s: s["seconds"])
        r = out[row] = _publish_row(row, fastest, count)
        r.intact = all(s["events"] == count for s in samples[row])
        r.note = f"{conc} connections"
        cpus = [s["cpu"] / max(1, s["events"]) for s in samples[row]]
        c = out[f"{row}.cpu"] = Row.of(f"{row}.cpu", unit="us", events=count)
        c.value = min(cpus) * 1e6
        c.intact = r.intact
        c.details["cpu_us_per_request_rounds"] = [round(x * 1e6, 1) for x in cpus]
        if row in errors:
            r.note = c.note = f"a round failed: {errors[row]}"
    raw, sdk = out.get("publish.raw"), out.get("publish.sdk")
    if raw and sdk and raw.usable() and sdk.usable():
        assert raw.value and sdk.value
        sdk.ratio, sdk.ratio_of = sdk.value / raw.value, "/ publish.raw"
    raw_cpu, sdk_cpu = out.get("publish.raw.cpu"), out.get("publish.sdk.cpu")
    if raw_cpu and sdk_cpu and raw_cpu.usable() and sdk_cpu.usable():
        assert raw_cpu.value and sdk_cpu.value
        sdk_cpu.ratio, sdk_cpu.ratio_of = sdk_cpu.value / raw_cpu.value, "/ publish.raw.cpu"
        sdk_cpu.target = "<= 3"


# -- wrk and bus-events bench ------------------------------------------------------------

_WRK_SCRIPT = """\
-- POST one event per request; the token comes from the environment, never argv.
wrk.method = "POST"
wrk.body = '{"name":"bench.wrk","payload":{"i":1,"ok":true}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_WRK_TOKEN")
"""


def wrk_or_reason(opts: Options) -> str | None:
    """None when ``wrk`` is on PATH (installed now from the distribution when missing, as
    root, unless ``--no-install``), else why its rows are skipped."""
    if shutil.which("wrk"):
        return None
    hint = "wrk not found (apt-get install -y wrk)"
    if not opts.install_tools or not shutil.which("apt-get") or os.geteuid() != 0:
        return hint
    progress("wrk not found: apt-get install -y wrk")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "-q", "wrk"]
    with suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(argv, env=env, capture_output=True, timeout=300, check=False)
    return None if shutil.which("wrk") else hint + ": the install failed"


def _wrk_figures(text: str) -> dict[str, float]:
    figures: dict[str, float] = {}
    if match := re.search(r"(\d+) requests in ([\d.]+)(m?s)", text):
        figures["requests"] = int(match.group(1))
        figures["seconds"] = float(match.group(2)) / (1000 if match.group(3) == "ms" else 1)
    if match := re.search(r"Requests/sec:\s*([\d.]+)", text):
        figures["rate"] = float(match.group(1))
    match = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    figures["non_2xx"] = int(match.group(1)) if match else 0
    match = re.search(r"Socket errors:.*?(\d+).*?(\d+).*?(\d+).*?(\d+)", text)
    figures["socket_errors"] = sum(int(g) for g in match.groups()) if match else 0
    if match := re.search(r"99%\s+([\d.]+)(us|ms|s)", text):
        scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[match.group(2)]
        figures["p99_s"] = float(match.group(1)) * scale
    return figures


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) that process ``pid`` has used so far (``/proc``)."""
    with open(f"/proc/{pid}/stat", "rb") as file:
        fields = file.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(
    url: str, token: str, pids: list[int], seconds: float, connections: int, threads: int = 1
) -> dict[str, Any]:
    """wrk POSTing one event per request to ``url``: its figures (``rate``, ``requests``,
    ``non_2xx``, ``socket_errors``, ``p99_s``…), with ``error`` when it failed, and the CPU
    time the processes ``pids`` used meanwhile (``server_cpu_seconds``)."""
    with tempfile.TemporaryDirectory(prefix="busevents-bench-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_WRK_SCRIPT)
        argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s"]
        argv += ["--latency", "-s", str(script), url]
        before = sum(process_cpu(pid) for pid in pids)
        _, proc, cpu = timed(
            argv, env={"BENCH_WRK_TOKEN": token}, stdout=subprocess.PIPE, timeout=seconds + 60
        )
    text = proc.stdout.decode(errors="replace")
    figures: dict[str, Any] = dict(_wrk_figures(text))
    figures["server_cpu_seconds"] = sum(process_cpu(pid) for pid in pids) - before
    figures["wrk_cpu_seconds"] = cpu
    if proc.returncode != 0 or "rate" not in figures:
        figures["error"] = f"wrk: exit status {proc.returncode}: {text[-200:]}"
    return figures


def measure_wrk(
    opts: Options, out: dict[str, Row], url: str, token: str, provider_pid: int
) -> None:
    """The provider's publish rate under wrk (1 thread, ``provider_connections``), and the
    provider process's CPU time per publish meanwhile."""
    r = out["provider.wrk"] = Row.of("provider.wrk", target=">= 3000")
    conns, seconds = opts.provider_connections, opts.wrk_seconds
    progress(f"provider.wrk ({conns} connections, {seconds:g} s)")
    figures = run_wrk(url, token, [provider_pid], seconds, conns)
    if "error" in figures:
        r.error = figures["error"]
        return
    provider_cpu = figures.pop("server_cpu_seconds")
    r.value = figures["rate"]
    r.events = int(figures.get("requests", 0))
    r.seconds = figures.get("seconds")
    r.intact = figures["non_2xx"] == 0 and figures["socket_errors"] == 0
    per_publish = provider_cpu / max(1, r.events) * 1e6
    r.details = {**figures, "provider_cpu_seconds": provider_cpu}
    r.details["provider_cpu_us_per_publish"] = per_publish
    r.note = f"{conns} connections, 1 wrk thread; provider CPU {per_publish:,.0f} µs/publish"
    if "p99_s" in figures:
        r.note += f", request p99 {figures['p99_s'] * 1e3:.1f} ms"


def measure_bench_cli(opts: Options, out: dict[str, Row], url: str, token: str) -> None:
    """``bus-events bench`` with as many publishers as wrk's connections, as long as wrk ran."""
    r = out["bench.cli"] = Row.of("bench.cli")
    pubs, seconds = opts.provider_connections, opts.wrk_seconds
    progress(f"bench.cli ({pubs} publishers, {seconds:g} s)")
    argv = [*bus_events(), "-f", "json", "bench", "--name", "bench.cli"]
    argv += ["--publishers", str(pubs), "--listeners", "0", "--duration", f"{seconds:g}s"]
    argv += ["--warmup", "0s" if opts.quick else "1s"]
    env = {"BUS_EVENTS_API_URL": url, "BUS_API_TOKEN": token}
    _, proc, cpu = timed(argv, env=env, stdout=subprocess.PIPE, timeout=seconds + 120)
    try:
        report = json.loads(proc.stdout)
        publish = report["publish"]
    except (ValueError, KeyError, TypeError):
        tail = (proc.stdout + proc.stderr).decode(errors="replace")[-300:]
        r.error = f"bus-events bench: exit status {proc.returncode}: {tail}"
        return
    r.value = float(publish["events_per_s"])
    r.events, r.seconds = publish["accepted"], publish["window_s"]
    r.intact = proc.returncode == 0 and not publish["errors"] and not publish["in_doubt"]
    r.details = {"errors": publish["errors"], "process_cpu_seconds": cpu}
    r.note = f"{pubs} publishers"
    wrk = out.get("provider.wrk")
    if wrk and wrk.usable() and r.value:
        assert wrk.value
        r.ratio, r.ratio_of, r.target = r.value / wrk.value, "/ provider.wrk", ">= 0.8"


# -- latency -----------------------------------------------------------------------------


def _percentiles(r: Row, samples: list[int], target: float) -> None:
    def pct(p: float) -> float:
        return float(samples[min(len(samples) - 1, round(p / 100 * (len(samples) - 1)))]) / 1e9

    r.value = r.seconds = pct(99)
    r.details.update(p50=pct(50), p90=pct(90), p99=pct(99), max=samples[-1] / 1e9)
    r.target = f"< {target:g}"
    r.met = r.value < target
    r.note = (
        f"p50 {pct(50) * 1e3:.2f} ms, p99 {pct(99) * 1e3:.2f} ms, max {samples[-1] / 1e6:.2f} ms"
    )


def measure_latency(opts: Options, out: dict[str, Row], url: str, token: str) -> None:
    """Issue 3: one SDK listener, one SDK publisher, one event every 4 ms."""
    r = out["latency"] = Row.of("latency", unit="s")
    params = {
        "url": url,
        "token": token,
        "count": opts.latency_count,
        "warmup": 10,
        "interval": opts.latency_interval,
        "timeout": opts.worker_timeout,
    }
    progress(f"latency ({opts.latency_count} events, every {opts.latency_interval * 1000:g} ms)")
    try:
        with started_worker("latency-listen", params, timeout=60) as listener:
            run_worker("latency-publish", params, timeout=opts.worker_timeout)
            result = finish_worker(listener, "latency-listen", timeout=60)
    except WorkerError as exc:
        r.error = str(exc)
        return
    r.events = result["samples"]
    r.intact = result["samples"] == opts.latency_count
    if not result["latencies_ns"]:
        r.error = "no event arrived"
        return
    _percentiles(r, result["latencies_ns"], 0.010)


def measure_latency_fanout(
    opts: Options, out: dict[str, Row], url: str, token: str, provider_pid: int
) -> None:
    """Issue 14, target 6: p99 publish → delivery at ``fanout_rate`` with 10 listeners
    (two listener processes of 5 streams each; the publisher is the minimal one, paced),
    and the provider's CPU time per event meanwhile."""
    r = out["latency.fanout"] = Row.of("latency.fanout", unit="s")
    listeners, rate = opts.fanout_listeners, opts.fanout_rate
    count, warmup = int(rate * opts.fanout_seconds), int(rate * 0.5)
    processes = min(2, listeners)
    shares = [listeners // processes + (i < listeners % processes) for i in range(processes)]
    params = {"url": url, "token": token, "count": count, "warmup": warmup}
    params |= {"name": "bench.fanout", "timeout": opts.worker_timeout, "rate": rate}
    progress(f"latency.fanout ({listeners} listeners, {rate:g} events/s, {count:,} events)")
    try:
        with ExitStack() as stack:
            procs = [
                stack.enter_context(
                    started_worker("latency-listen", {**params, "streams": share}, timeout=60)
                )
                for share in shares
            ]
            provider_cpu = process_cpu(provider_pid)
            sent = run_worker("paced-publish", params, timeout=opts.worker_timeout)
            provider_cpu = process_cpu(provider_pid) - provider_cpu
            results = [finish_worker(proc, "latency-listen", timeout=60) for proc in procs]
    except WorkerError as exc:
        r.error = str(exc)
        return
    samples = sorted(x for result in results for x in result["latencies_ns"])
    r.events = len(samples)
    r.intact = len(samples) == count * listeners and sent["failed"] == 0
    r.details = {"late_sends": sent["late"], "publish_seconds": sent["seconds"]}
    r.details["provider_cpu_share"] = provider_cpu / sent["seconds"]
    r.details["provider_cpu_us_per_event"] = provider_cpu / max(1, sent["events"]) * 1e6
    if not samples:
        r.error = "no event arrived"
        return
    _percentiles(r, samples, 0.005)
    r.note += (
        f"; {sent['late']} sends >1 ms late; provider CPU {provider_cpu / sent['seconds']:.0%}"
    )
