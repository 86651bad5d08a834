"""The harness: run every row of the issue-3 table in one process tree, print it, save JSON.

Process tree: this process only orchestrates and times subprocesses.  The
source server (:mod:`._source`) and the reference provider (:mod:`._provider`)
run in their own processes; every measured client runs in a fresh worker
(:mod:`._run`) or is the real command (``bus-events``, ``curl``, ``jq``).

Throughput rows (T, D, the SDK, the CLI, curl, and the slower peers on a
smaller stream) are measured in interleaved rounds, so a burst of load from
elsewhere on the machine hits all of them alike; each keeps its best round.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _workload
from ._procs import (
    ROOT,
    WorkerError,
    background,
    finish_worker,
    run_worker,
    started_worker,
    timed,
    timed_pipeline,
)

__all__ = ["Options", "main", "run"]

DEFAULT_EVENTS = 1_000_000
QUICK_EVENTS = 3_000
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "latest.json"

#: Row ids in table order, with the group ``--only`` also accepts.
ROWS: dict[str, str] = {
    "T": "transfer",
    "D": "decode",
    "D.check": "decode",
    "D.feed": "decode",
    "H": "derived",
    "sdk.iter": "sdk",
    "sdk.batches": "sdk",
    "sdk.raw": "sdk",
    "cli": "cli",
    "httpx.lines": "peers",
    "aiohttp.lines": "peers",
    "curl.jq": "curl",
    "curl": "curl",
    "rss": "rss",
    "startup.python": "startup",
    "startup.version": "startup",
    "startup.help": "startup",
    "send.cli": "send",
    "send.curl": "send",
    "publish.reuse": "publish",
    "publish.new-connection": "publish",
    "publish.new-client": "publish",
    "latency": "latency",
}
#: What a row's ratio needs measured too (``--only`` pulls these in).
DEPENDS: dict[str, tuple[str, ...]] = {
    "H": ("T", "D"),
    "sdk.iter": ("H",),
    "sdk.batches": ("H",),
    "sdk.raw": ("T", "D.check"),
    "cli": ("D", "T", "D.check"),
    "httpx.lines": ("sdk.iter",),
    "aiohttp.lines": ("sdk.iter", "sdk.batches"),
    "curl.jq": ("cli",),
    "curl": ("T",),
    "startup.version": ("startup.python",),
    "startup.help": ("startup.python",),
    "send.cli": ("send.curl",),
    "publish.new-connection": ("publish.reuse",),
    "publish.new-client": ("publish.reuse",),
}
#: Interleaved in rounds, in this order; the slow ones stream ``slow_events``.
ROUND_ROWS = ("T", "D", "D.check", "D.feed", "sdk.iter", "sdk.batches", "sdk.raw", "cli", "curl")
SLOW_ROWS = ("httpx.lines", "aiohttp.lines", "curl.jq")

#: Rows measured by a ``benchmarks._run`` worker: kind and extra parameters.
WORKER_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "T": ("transfer", {}),
    "D": ("decode", {"type": "event"}),
    "D.check": ("decode", {"type": "check"}),
    "D.feed": ("decode", {"type": "event", "framing": True}),
    "sdk.iter": ("sdk", {"mode": "iter"}),
    "sdk.batches": ("sdk", {"mode": "batches"}),
    "sdk.raw": ("sdk", {"mode": "raw"}),
    "httpx.lines": ("httpx-lines", {}),
    "aiohttp.lines": ("aiohttp-lines", {}),
}

LABELS: dict[str, str] = {
    "T": "httpx aiter_raw(), no decode (transfer limit)",
    "D": "msgspec decode_lines(Event), memory, 64 KiB",
    "D.check": "msgspec decode_lines(id+name check), memory",
    "D.feed": "SDK NDJSONDecoder.feed(Event), memory, 64 KiB",
    "H": "H = 1/(1/T + 1/D)",
    "sdk.iter": "SDK listen: async for event in stream",
    "sdk.batches": "SDK listen: stream.batches()",
    "sdk.raw": "SDK listen: stream.raw_batches() (CLI path)",
    "cli": "bus-events listen --no-follow -o /dev/null",
    "httpx.lines": "httpx aiter_lines() + json.loads",
    "aiohttp.lines": "aiohttp line iteration + orjson",
    "curl.jq": "curl -sN URL | jq -c . > /dev/null",
    "curl": "curl -sN URL -o /dev/null",
    "rss": "SDK listener RSS: end / early",
    "startup.python": "python -c pass",
    "startup.version": "bus-events --version",
    "startup.help": "bus-events --help",
    "send.cli": "bus-events send (wall)",
    "send.curl": "curl -X POST (wall)",
    "publish.reuse": "SDK send x concurrency, one client",
    "publish.new-connection": "SDK send, a new connection per event",
    "publish.new-client": "SDK send, a new EventsClient per event",
    "latency": "publish -> receive via reference provider",
}


@dataclass
class Options:
    """What to run and how much."""

    events: int = DEFAULT_EVENTS
    quick: bool = False
    json_path: Path = DEFAULT_JSON
    only: set[str] | None = None
    rounds: int = 3
    repeats: int = 2  # streams per worker per round, for the rows of ROUND_ROWS (best kept)
    slow_events: int = DEFAULT_EVENTS // 8
    rss_events: int = 5 * DEFAULT_EVENTS
    rss_early: int = DEFAULT_EVENTS // 10
    startup_runs: int = 7
    send_runs: int = 7
    publish_count: int = 1000
    publish_concurrency: int = 16
    latency_count: int = 500
    latency_interval: float = 0.004
    worker_timeout: float = 300.0

    @classmethod
    def build(
        cls, events: int | None, quick: bool, json_path: Path, only: set[str] | None
    ) -> Options:
        n = events if events is not None else QUICK_EVENTS if quick else DEFAULT_EVENTS
        if quick:
            return cls(
                events=n,
                quick=True,
                json_path=json_path,
                only=only,
                rounds=1,
                repeats=1,
                slow_events=n,
                rss_events=5 * n,
                rss_early=max(1, n // 10),
                startup_runs=1,
                send_runs=1,
                publish_count=60,
                publish_concurrency=4,
                latency_count=20,
                latency_interval=0.002,
                worker_timeout=60.0,
            )
        return cls(
            events=n,
            json_path=json_path,
            only=only,
            slow_events=max(1, n // 8),
            rss_events=5 * n,
            rss_early=max(1, n // 10),
        )


@dataclass
class Row:
    """One row of the table: a measure, what it is compared with, and whether it met its target."""

    id: str
    label: str
    value: float | None = None  # events/s, seconds, ratio of RSS, …
    unit: str = "events/s"
    events: int | None = None
    seconds: float | None = None
    mb_per_s: float | None = None
    ratio: float | None = None
    ratio_cpu: float | None = None  # the same ratio from events per CPU-second of the client
    ratio_of: str | None = None
    target: str | None = None
    met: bool | None = None
    intact: bool | None = None
    note: str = ""
    error: str | None = None
    skipped: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


# -- helpers -------------------------------------------------------------------


def _selected(only: set[str] | None) -> list[str]:
    """Row ids to run: everything, or the ``--only`` rows/groups and what their ratios need."""
    if not only:
        return list(ROWS)
    wanted: set[str] = set()
    for token in only:
        matches = [r for r, g in ROWS.items() if token in (r, g)]
        if not matches:
            known = ", ".join(sorted(set(ROWS) | set(ROWS.values())))
            raise SystemExit(f"--only {token!r}: unknown row or group (known: {known})")
        wanted.update(matches)
    todo = list(wanted)
    while todo:
        for dep in DEPENDS.get(todo.pop(), ()):
            if dep not in wanted:
                wanted.add(dep)
                todo.append(dep)
    return [r for r in ROWS if r in wanted]


def _bus_events() -> list[str]:
    """The ``bus-events`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("bus-events")
    return [str(script)] if script.exists() else [sys.executable, "-m", "busevents"]


def _has_module(*names: str) -> str | None:
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    return f"needs {', '.join(missing)} (pip install -e '.[bench]')" if missing else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _tool_version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.decode(errors="replace").splitlines()
    return lines[0].strip() if lines else None


def _meets(value: float | None, target: str | None) -> bool | None:
    if value is None or target is None:
        return None
    op, _, bound = target.partition(" ")
    limit = float(bound)
    return value >= limit if op == ">=" else value <= limit if op == "<=" else value < limit


def _events_url(port: int, n: int) -> str:
    return f"http://127.0.0.1:{port}/n/{n}/api/v1/events"


def _prime(port: int, n: int) -> None:
    """Have the source build (and cache) the body of ``n`` events before any timing."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/prime/{n}", timeout=300) as reply:
        reply.read()


_T0 = time.perf_counter()


def _progress(message: str) -> None:
    sys.stderr.write(f"[bench {time.perf_counter() - _T0:6.1f} s] {message}\n")
    sys.stderr.flush()


# -- the throughput rows ---------------------------------------------------------


class Throughput:
    """Samples of the interleaved throughput rows, against one source server."""

    def __init__(self, opts: Options, port: int) -> None:
        self.opts = opts
        self.port = port
        self.samples: dict[str, list[dict[str, Any]]] = {}
        self.errors: dict[str, str] = {}
        self.bus_events = _bus_events()

    def add(self, row: str, sample: dict[str, Any]) -> None:
        self.samples.setdefault(row, []).append(sample)

    def _params(self, row: str, n: int) -> tuple[str, dict[str, Any]]:
        kind, extra = WORKER_ROWS[row]
        repeats = self.opts.repeats if row in ROUND_ROWS else 1
        params = {"url": _events_url(self.port, n), "events": n, "repeats": repeats}
        return kind, {**params, **extra}

    def _checked(self, result: dict[str, Any], n: int) -> dict[str, Any]:
        result["intact"] = result.get("events") == n and result.get("last_id") == (
            _workload.last_id(n)
        )
        return result

    def sample(self, row: str, n: int) -> None:
        """Measure ``row`` once (a worker's best of ``repeats`` streams)."""
        try:
            if row in WORKER_ROWS:
                kind, params = self._params(row, n)
                result = run_worker(kind, params, timeout=self.opts.worker_timeout)
                self.add(row, self._checked(result, n))
            elif row == "cli":
                self.add(row, self._cli(n))
            elif row == "curl":
                self.add(row, self._curl(n))
            elif row == "curl.jq":
                self.add(row, self._curl_jq(n))
            else:
                raise ValueError(row)
        except WorkerError as exc:
            self.errors[row] = str(exc)

    def sample_together(self, rows: list[tuple[str, int]]) -> None:
        """``--quick``: the worker rows one after the other in a single worker process.

        Saves a process start per row; only for checking that everything works,
        since the rows then share one interpreter.
        """
        worker = [(row, n) for row, n in rows if row in WORKER_ROWS]
        try:
            results = run_worker(
                "multi",
                {"runs": [self._params(row, n) for row, n in worker]},
                timeout=self.opts.worker_timeout,
            )["results"]
        except WorkerError as exc:
            for row, _ in worker:
                self.errors[row] = str(exc)
        else:
            for (row, n), result in zip(worker, results, strict=True):
                self.add(row, self._checked(result, n))
        for row, n in rows:
            if row not in WORKER_ROWS:
                self.sample(row, n)

    def _cli_once(self, n: int, output: str = "/dev/null") -> tuple[float, float]:
        """Wall and CPU time of ``bus-events listen`` over ``n`` events (WorkerError unless
        exit 0)."""
        env = {"BUS_EVENTS_API_URL": _events_url(self.port, n), "BUS_API_TOKEN": "bench"}
        argv = [*self.bus_events, "listen", "--name", _workload.EVENT_NAME]
        argv += ["--replay", "--no-follow", "-o", output]
        seconds, proc, cpu = timed(argv, env=env, timeout=self.opts.worker_timeout)
        if proc.returncode != 0:
            raise WorkerError(
                f"bus-events listen: exit status {proc.returncode}: "
                + proc.stderr.decode(errors="replace").strip()[-300:]
            )
        return seconds, cpu

    def _cli(self, n: int) -> dict[str, Any]:
        """One CLI run over ``n`` events, and one over none (its start and exit cost).

        Exit status 0 means every line validated and the stream ended cleanly.
        """
        seconds, cpu = self._cli_once(n)
        startup, startup_cpu = self._cli_once(0)
        return {
            "events": n,
            "seconds": seconds,
            "cpu": cpu,
            "startup": startup,
            "startup_cpu": startup_cpu,
            "intact": True,
        }

    def verify_cli(self, n: int) -> tuple[bool, str]:
        """Run the CLI once more into a file; compare it byte for byte with the source body."""
        with tempfile.TemporaryDirectory(prefix="busevents-bench-") as tmp:
            path = Path(tmp) / "out.ndjson"
            self._cli_once(n, output=str(path))
            size = path.stat().st_size
            digest = hashlib.sha256()
            with path.open("rb") as file:
                while block := file.read(1 << 20):
                    digest.update(block)
        ok = size == n * _workload.LINE_SIZE and digest.hexdigest() == _workload.body_digest(n)
        return ok, f"output {size} bytes, sha256 {'matches' if ok else 'DIFFERS from'} the source"

    def _curl(self, n: int) -> dict[str, Any]:
        out: dict[str, Any] = {"events": n}
        for key, count in (("", n), ("startup_", 0)):
            url = _events_url(self.port, count) + "/stream"
            argv = ["curl", "-sSN", "-o", "/dev/null", "-w", "%{size_download}", url]
            seconds, proc, cpu = timed(
                argv, stdout=subprocess.PIPE, timeout=self.opts.worker_timeout
            )
            if proc.returncode != 0:
                raise WorkerError(f"curl: exit status {proc.returncode}")
            out[key + "seconds"] = seconds
            out[key + "cpu"] = cpu
            if count:
                out["intact"] = int(proc.stdout or b"0") == n * _workload.LINE_SIZE
        out["startup"] = out.pop("startup_seconds")
        return out

    def _curl_jq(self, n: int) -> dict[str, Any]:
        out: dict[str, Any] = {"events": n}
        for key, count in (("", n), ("startup_", 0)):
            url = _events_url(self.port, count) + "/stream"
            curl = ["curl", "-sSN", "-w", "%{stderr}%{size_download}", url]
            seconds, cpu, curl_status, jq_status, err = timed_pipeline(
                curl, ["jq", "-c", "."], timeout=self.opts.worker_timeout
            )
            if curl_status or jq_status:
                raise WorkerError(f"curl | jq: exit statuses {curl_status}, {jq_status}")
            out[key + "seconds"] = seconds
            out[key + "cpu"] = cpu
            if count:
                size = err.strip().rsplit(b"\n", 1)[-1]
                out["intact"] = size.isdigit() and int(size) == n * _workload.LINE_SIZE
        out["startup"] = out.pop("startup_seconds")
        return out

    def row(self, row: str) -> Row:
        """The row built from its samples: the best one, integrity of all of them."""
        result = Row(row, LABELS[row])
        samples = self.samples.get(row)
        if not samples:
            result.error = self.errors.get(row, "not measured")
            return result
        result.events = n = samples[0]["events"]
        best = min(s["seconds"] for s in samples)
        cpu = min(s["cpu"] for s in samples)
        if "startup" in samples[0]:
            startup = min(s["startup"] for s in samples)
            startup_cpu = min(s["startup_cpu"] for s in samples)
            result.details["wall_seconds"] = best
            result.details["startup_seconds"] = startup
            result.details["events_per_s_with_startup"] = n / best
            best = max(best - startup, 1e-9)
            cpu = max(cpu - startup_cpu, 1e-9)
        result.seconds = best
        result.details["cpu_seconds"] = cpu
        result.details["events_per_cpu_s"] = n / cpu
        result.value = n / best
        result.mb_per_s = n * _workload.LINE_SIZE / best / 1e6
        result.intact = all(s.get("intact") for s in samples)
        result.details["expected_last_id"] = _workload.last_id(n)
        result.details["last_ids"] = sorted({str(s.get("last_id")) for s in samples})
        result.details["cpu_utilisation"] = round(
            min(s["cpu"] for s in samples) / min(s["seconds"] for s in samples), 2
        )
        result.details["seconds_per_round"] = [round(s["seconds"], 4) for s in samples]
        if row in self.errors:
            result.note = f"a round failed: {self.errors[row]}"
        return result


def _measure_throughput(opts: Options, rows: list[str], out: dict[str, Row], port: int) -> None:
    bench = Throughput(opts, port)
    have_curl, have_jq = shutil.which("curl") is not None, shutil.which("jq") is not None
    skip: dict[str, str] = {}
    if not have_curl:
        skip["curl"] = skip["curl.jq"] = "curl not found"
    elif not have_jq:
        skip["curl.jq"] = "jq not found"
    missing = _has_module("aiohttp", "orjson")
    if missing:
        skip["aiohttp.lines"] = missing
    for row, reason in skip.items():
        if row in rows:
            out[row] = Row(row, LABELS[row], skipped=reason)
    round_rows = [r for r in ROUND_ROWS if r in rows and r not in skip]
    slow_rows = [r for r in SLOW_ROWS if r in rows and r not in skip]
    for index in range(opts.rounds):
        names = ", ".join(round_rows + [f"{r} ({opts.slow_events:,})" for r in slow_rows])
        _progress(f"round {index + 1}/{opts.rounds}: {names}")
        todo = [(r, opts.events) for r in round_rows] + [(r, opts.slow_events) for r in slow_rows]
        if opts.quick:
            bench.sample_together(todo)
        else:
            for row, n in todo:
                bench.sample(row, n)
    for row in round_rows + slow_rows:
        out[row] = bench.row(row)
    if "cli" in round_rows and out["cli"].error is None:
        try:
            ok, text = bench.verify_cli(opts.events)
        except WorkerError as exc:
            ok, text = False, f"verification run failed: {exc}"
        out["cli"].intact = bool(out["cli"].intact) and ok
        out["cli"].details["verification"] = text


# -- memory ----------------------------------------------------------------------


def _measure_rss(opts: Options, out: dict[str, Row], port: int) -> None:
    row = out["rss"] = Row("rss", LABELS["rss"], unit="ratio")
    n, early = opts.rss_events, opts.rss_early
    _progress(f"rss ({n} events, early point at {early})")
    try:
        result = run_worker(
            "rss",
            {"url": _events_url(port, n), "early": early},
            timeout=max(opts.worker_timeout, 600.0),
        )
    except WorkerError as exc:
        row.error = str(exc)
        return
    row.events = result["events"]
    row.seconds = result["seconds"]
    row.intact = result["events"] == n and result["last_id"] == _workload.last_id(n)
    result["expected_last_id"] = _workload.last_id(n)
    row.value = row.ratio = result["rss_end"] / result["rss_early"]
    row.ratio_of = f"RSS at {n:,} / at {early:,} events"
    row.target = "<= 1.10"
    mib = 1024 * 1024
    row.note = f"{result['rss_early'] / mib:.1f} MiB -> {result['rss_end'] / mib:.1f} MiB"
    row.details = {
        k: result[k] for k in result if k.startswith(("rss", "maxrss", "early", "last", "expected"))
    }


# -- start-up --------------------------------------------------------------------

_HEAVY = ("trio", "httpx", "httpcore", "msgspec", "cyclopts", "hypercorn")
_IMPORT_PROBE = """
import io, json, sys
from contextlib import redirect_stdout
from busevents.cli import main
found = {{}}
for flag in ("--version", "--help"):
    with redirect_stdout(io.StringIO()):
        try:
            main([flag])
        except SystemExit:
            pass
    found[flag] = [m for m in {heavy!r} if m in sys.modules]
print(json.dumps(found))
"""


def _heavy_imports() -> dict[str, list[str]]:
    """Which heavy modules ``--version``, then ``--help``, import (one process, in order)."""
    probe = _IMPORT_PROBE.format(heavy=_HEAVY)
    _, proc, _ = timed([sys.executable, "-c", probe], stdout=subprocess.PIPE)
    try:
        found: dict[str, list[str]] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {}
    return found


def _measure_startup(opts: Options, rows: list[str], out: dict[str, Row]) -> None:
    commands = {
        "startup.python": [sys.executable, "-c", "pass"],
        "startup.version": [*_bus_events(), "--version"],
        "startup.help": [*_bus_events(), "--help"],
    }
    todo = {r: argv for r, argv in commands.items() if r in rows}
    times: dict[str, list[float]] = {r: [] for r in todo}
    _progress(f"start-up ({opts.startup_runs} runs each)")
    if opts.startup_runs > 1:
        for argv in todo.values():  # warm the page cache and .pyc files first
            timed(argv, timeout=60)
    for _ in range(opts.startup_runs):
        for row, argv in todo.items():
            seconds, proc, _ = timed(argv, timeout=60)
            if proc.returncode == 0:
                times[row].append(seconds)
    base = min(times.get("startup.python") or [float("nan")])
    imported = _heavy_imports() if {"startup.version", "startup.help"} & set(todo) else {}
    for row in todo:
        r = out[row] = Row(row, LABELS[row], unit="s")
        if not times[row]:
            r.error = "the command failed"
            continue
        r.value = r.seconds = min(times[row])
        r.details["median_seconds"] = statistics.median(times[row])
        if row != "startup.python":
            r.ratio = r.value / base
            r.ratio_of = "/ python -c pass"
            r.target = "<= 4"
            heavy = imported.get("--version" if row.endswith("version") else "--help")
            if heavy is None:
                r.note = "import probe failed"
            else:
                r.details["heavy_modules_imported"] = heavy
                r.note = "imports " + (", ".join(heavy) if heavy else "none of trio/httpx/msgspec")


# -- the reference provider rows -------------------------------------------------------


def _measure_send(
    opts: Options, rows: list[str], out: dict[str, Row], url: str, token: str
) -> None:
    env = {"BUS_EVENTS_API_URL": url, "BUS_API_TOKEN": token}
    cli = [*_bus_events(), "send", "--name", "bench.send", "--payload", '{"n":1}']
    body = json.dumps({"name": "bench.send", "payload": {"n": 1}})
    with tempfile.TemporaryDirectory(prefix="busevents-bench-") as tmp:
        headers = Path(tmp) / "headers"  # keeps the token off curl's command line
        headers.write_text(f"Authorization: Bearer {token}\nContent-Type: application/json\n")
        curl = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"@{headers}"]
        curl += ["--data-binary", body, url]
        commands = {"send.cli": cli}
        if shutil.which("curl"):
            commands["send.curl"] = curl
        elif "send.curl" in rows:
            out["send.curl"] = Row("send.curl", LABELS["send.curl"], skipped="curl not found")
        commands = {r: argv for r, argv in commands.items() if r in rows}
        times: dict[str, list[float]] = {r: [] for r in commands}
        failures: dict[str, str] = {}
        _progress(f"send ({opts.send_runs} runs each)")
        for _ in range(opts.send_runs):
            for row, argv in commands.items():
                seconds, proc, _ = timed(argv, env=env, stdout=subprocess.PIPE, timeout=60)
                # the CLI's exit status says the provider accepted the event
                ok = proc.returncode == 0 and (
                    row == "send.cli" or proc.stdout in (b"200", b"201", b"202")
                )
                if ok:
                    times[row].append(seconds)
                else:
                    failures[row] = (proc.stdout + proc.stderr).decode(errors="replace")[-200:]
    curl_best = min(times.get("send.curl") or [float("nan")])
    for row in commands:
        r = out[row] = Row(row, LABELS[row], unit="s")
        if not times[row]:
            r.error = failures.get(row, "failed")
            continue
        r.value = r.seconds = min(times[row])
        r.intact = row not in failures
        r.details["median_seconds"] = statistics.median(times[row])
        if row == "send.cli" and curl_best == curl_best:
            r.ratio, r.ratio_of = r.value / curl_best, "/ curl POST"


def _measure_publish(
    opts: Options, rows: list[str], out: dict[str, Row], url: str, token: str
) -> None:
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
        _progress(f"{', '.join(todo)} (one worker)")
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
            _progress(f"{row} ({todo[row]} events, {opts.publish_concurrency} tasks)")
            try:
                results[row] = run_worker("publish", params, timeout=opts.worker_timeout)
            except WorkerError as exc:
                results[row] = exc
    for row, result in results.items():
        r = out[row] = Row(row, LABELS[row])
        if isinstance(result, WorkerError):
            r.error = str(result)
            continue
        r.events, r.seconds = result["events"], result["seconds"]
        r.value = result["events"] / result["seconds"]
        r.intact = result["events"] == todo[row]
        r.note = f"{opts.publish_concurrency} concurrent tasks"
    reuse = out.get("publish.reuse")
    for row in ("publish.new-connection", "publish.new-client"):
        other = out.get(row)
        if reuse and other and reuse.value and other.value:
            other.ratio = reuse.value / other.value
            other.ratio_of = "reuse / this"
            if row == "publish.new-connection":
                other.target = ">= 5"


def _measure_latency(opts: Options, out: dict[str, Row], url: str, token: str) -> None:
    r = out["latency"] = Row("latency", LABELS["latency"], unit="s")
    warmup = 10
    params = {
        "url": url,
        "token": token,
        "count": opts.latency_count,
        "warmup": warmup,
        "interval": opts.latency_interval,
        "timeout": opts.worker_timeout,
    }
    _progress(
        f"latency ({opts.latency_count} events, one every {opts.latency_interval * 1000:g} ms)"
    )
    try:
        with started_worker("latency-listen", params, timeout=60) as listener:
            run_worker("latency-publish", params, timeout=opts.worker_timeout)
            result = finish_worker(listener, "latency-listen", timeout=60)
    except WorkerError as exc:
        r.error = str(exc)
        return
    samples = result["latencies_ns"]
    r.events = result["samples"]
    r.intact = result["samples"] == opts.latency_count
    if not samples:
        r.error = "no event arrived"
        return

    def pct(p: float) -> float:
        return float(samples[min(len(samples) - 1, round(p / 100 * (len(samples) - 1)))]) / 1e9

    r.value = r.seconds = pct(99)
    r.details = {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": samples[-1] / 1e9}
    r.target = "< 0.010"
    r.met = r.value < 0.010
    r.note = (
        f"p50 {pct(50) * 1e3:.2f} ms, p99 {pct(99) * 1e3:.2f} ms, max {samples[-1] / 1e6:.2f} ms"
    )


# -- ratios ------------------------------------------------------------------------


def _derive(out: dict[str, Row]) -> None:
    """H and the ratio of every throughput row to its reference, by wall and by CPU time.

    The CPU-time ratios use events per CPU-second of the measured client process
    (tree): on a busy machine they move much less than wall-clock ones.
    """

    def rate(row: str, cpu: bool = False) -> float | None:
        r = out.get(row)
        if r is None or r.error is not None or r.skipped is not None or r.value is None:
            return None
        value = r.details.get("events_per_cpu_s") if cpu else r.value
        return float(value) if value else None

    def serial(a: float | None, b: float | None) -> float | None:
        return 1 / (1 / a + 1 / b) if a and b else None

    h, hc = serial(rate("T"), rate("D")), serial(rate("T"), rate("D.check"))
    h_cpu = serial(rate("T", True), rate("D", True))
    hc_cpu = serial(rate("T", True), rate("D.check", True))
    if "T" in out or "D" in out:
        row = out["H"] = Row("H", LABELS["H"], value=h)
        row.mb_per_s = h * _workload.LINE_SIZE / 1e6 if h else None
        row.details = {"H_check": hc, "H_cpu": h_cpu, "H_check_cpu": hc_cpu}
        if hc:
            row.note = f"H(check), with the id+name check for D: {hc / 1e6:.3f} M/s"
        if h_cpu:
            row.details["events_per_cpu_s"] = h_cpu

    def ratio(
        row: str,
        num: str,
        den: str | None,
        of: str,
        target: str | None,
        href: tuple[Any, Any] = (None, None),
    ) -> None:
        r = out.get(row)
        if r is None or r.value is None:
            return
        wall = (rate(num), rate(den) if den else href[0])
        cpu = (rate(num, True), rate(den, True) if den else href[1])
        if wall[0] and wall[1]:
            r.ratio, r.ratio_of, r.target = wall[0] / wall[1], of, target
        if cpu[0] and cpu[1]:
            r.ratio_cpu = cpu[0] / cpu[1]

    ratio("sdk.iter", "sdk.iter", None, "/ H", ">= 0.90", (h, h_cpu))
    ratio("sdk.batches", "sdk.batches", None, "/ H", ">= 0.90", (h, h_cpu))
    ratio("sdk.raw", "sdk.raw", None, "/ H(check)", None, (hc, hc_cpu))
    ratio("D.feed", "D.feed", "D", "/ D", None)
    ratio("cli", "cli", "D", "/ D", ">= 0.70")
    ratio("aiohttp.lines", "sdk.iter", "aiohttp.lines", "sdk.iter / this", ">= 5")
    ratio("httpx.lines", "sdk.iter", "httpx.lines", "sdk.iter / this", None)
    ratio("curl.jq", "cli", "curl.jq", "cli / this", ">= 12")
    ratio("curl", "curl", "T", "this / T", None)
    cli = out.get("cli")
    if cli and cli.value and hc:
        cli.note = f"/ H(check) = {cli.value / hc:.2f}"
    batches, aio = rate("sdk.batches"), rate("aiohttp.lines")
    if batches and aio:
        out["aiohttp.lines"].note = f"sdk.batches / this = {batches / aio:.1f}"
    for r in out.values():
        if r.met is None:
            r.met = _meets(r.ratio, r.target)


# -- output ------------------------------------------------------------------------


def _fmt_value(r: Row) -> str:
    if r.skipped:
        return "skipped"
    if r.error:
        return "ERROR"
    if r.value is None:
        return "-"
    if r.unit == "events/s":
        return f"{r.value / 1e6:.3f} M/s" if r.value >= 1e5 else f"{r.value:,.0f} /s"
    if r.unit == "s":
        return f"{r.value * 1000:.1f} ms"
    return f"{r.value:.3f}"


def _fmt_ratio(r: Row) -> str:
    if r.ratio is None:
        return ""
    return f"{r.ratio:.2f} {r.ratio_of or ''}".strip()


def format_table(rows: Iterable[Row]) -> str:
    """The table, in Markdown (readable in a terminal too)."""
    header = (
        "row",
        "measure",
        "value",
        "MB/s",
        "ratio",
        "CPU ratio",
        "target",
        "met",
        "intact",
        "note",
    )
    lines = [header]
    for r in rows:
        lines.append(
            (
                r.id,
                r.label,
                _fmt_value(r),
                f"{r.mb_per_s:.0f}" if r.mb_per_s else "",
                _fmt_ratio(r),
                "" if r.ratio_cpu is None else f"{r.ratio_cpu:.2f}",
                r.target or "",
                "" if r.met is None else "yes" if r.met else "NO",
                "" if r.intact is None else "yes" if r.intact else "NO",
                r.skipped or r.error or r.note,
            )
        )
    lines = [tuple(cell.replace("|", "\\|") for cell in line) for line in lines]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if index == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _meta(opts: Options, started: float, load_start: tuple[float, ...]) -> dict[str, Any]:
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "versions": {
            d: _version(d) for d in ("busevents", "httpx", "httpcore", "h11", "msgspec", "trio")
        }
        | {d: _version(d) for d in ("aiohttp", "orjson")}
        | {
            "curl": _tool_version(["curl", "--version"]) if shutil.which("curl") else None,
            "jq": _tool_version(["jq", "--version"]) if shutil.which("jq") else None,
        },
        "options": {
            k: str(v) if isinstance(v, Path | set) else v for k, v in opts.__dict__.items()
        },
        "line_bytes": _workload.LINE_SIZE,
    }


# -- main --------------------------------------------------------------------------


def _source_phase(opts: Options, rows: list[str], out: dict[str, Row]) -> None:
    """Every row that talks to the source server: its streams, and publishing."""
    argv = [sys.executable, "-m", "benchmarks._source", "--events", str(opts.events)]
    with background(argv) as (hello, _):
        port = int(hello["port"])
        if (set(ROUND_ROWS) | set(SLOW_ROWS) | {"rss"}) & set(rows):
            _prime(port, opts.rss_events if "rss" in rows else opts.events)
            _measure_throughput(opts, rows, out, port)
        if "rss" in rows:
            _measure_rss(opts, out, port)
        # Publishing against the source, which answers at once: the rows compare
        # the client's connection handling, not the reference provider's speed.
        _measure_publish(opts, rows, out, _events_url(port, 0), "bench")


def _provider_phase(opts: Options, rows: list[str], out: dict[str, Row]) -> None:
    """Every row that talks to the reference provider."""
    provider_rows = {r for r in rows if ROWS[r] in ("send", "latency")}
    missing = _has_module("hypercorn", "jwt")
    if missing:
        for row in provider_rows:
            out[row] = Row(row, LABELS[row], skipped=f"reference provider {missing}")
        return
    with background([sys.executable, "-m", "benchmarks._provider"]) as (hello, _):
        url, token = hello["url"], hello["token"]
        if {"send.cli", "send.curl"} & provider_rows:
            _measure_send(opts, rows, out, url, token)
        if "latency" in provider_rows:
            _measure_latency(opts, out, url, token)


def run(opts: Options) -> dict[str, Any]:
    """Run the selected rows; return the report (also written to ``opts.json_path``)."""
    started, load_start = time.time(), os.getloadavg()
    rows = _selected(opts.only)
    out: dict[str, Row] = {}
    phases: list[Callable[[], None]] = []
    if (set(ROUND_ROWS) | set(SLOW_ROWS) | {"rss"}) & set(rows) or any(
        ROWS[r] == "publish" for r in rows
    ):
        phases.append(lambda: _source_phase(opts, rows, out))
    if {"startup.python", "startup.version", "startup.help"} & set(rows):
        phases.append(lambda: _measure_startup(opts, rows, out))
    if any(ROWS[r] in ("send", "latency") for r in rows):
        phases.append(lambda: _provider_phase(opts, rows, out))
    for phase in phases:
        phase()
    _derive(out)
    ordered = [out[r] for r in ROWS if r in out]
    report = {"meta": _meta(opts, started, load_start), "rows": [r.as_json() for r in ordered]}
    opts.json_path.parent.mkdir(parents=True, exist_ok=True)
    opts.json_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the busevents benchmark table (issue 3): throughput, memory, "
        "start-up, publish and latency, as ratios measured in one run.",
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
    args = parser.parse_args(argv)
    only = {t.strip() for o in args.only or () for t in o.split(",") if t.strip()} or None
    if args.events is not None and args.events < 1:
        parser.error("--events must be at least 1")
    opts = Options.build(args.events, args.quick, args.json, only)
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        opts.rounds = args.rounds
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
    emit(format_table(rows))
    emit(f"JSON: {opts.json_path}")
    broken = [r.id for r in rows if r.error or r.intact is False]
    if broken:
        emit(f"rows that failed or lost events: {', '.join(broken)}")
        return 1
    return 0
