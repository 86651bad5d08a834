"""The stream rows: everything read from the source server, in interleaved rounds.

Throughput rows (T, D, the SDK, the CLI into /dev/null, a pipe or a file, curl,
and the slower peers on a smaller stream) are measured in interleaved rounds,
so a burst of load from elsewhere on the machine hits all of them alike; each
keeps its best round.  Rows that run a whole command (the CLI, curl) subtract
the same command over an empty stream, so start-up and exit are excluded.
Then the memory row (one long stream).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _workload
from ._procs import (
    WorkerError,
    bus_events,
    missing_modules,
    progress,
    run_worker,
    timed,
    timed_pipeline,
)
from ._rows import Options, Row
from ._source import events_url

__all__ = ["ROUND_ROWS", "SLOW_ROWS", "STREAM_ROWS", "measure_rss", "measure_throughput"]

#: Interleaved in rounds, in this order; the slow ones stream ``slow_events``.
ROUND_ROWS = (
    "T",
    "T.lean",
    "D",
    "D.check",
    "D.feed",
    "sdk.iter",
    "sdk.batches",
    "sdk.raw",
    "cli",
    "curl",
    "curl.pipe",
    "cli.pipe",
    "curl.file",
    "cli.file",
)
SLOW_ROWS = ("httpx.lines", "aiohttp.lines", "curl.jq")
#: Every row that needs the source server's streams.
STREAM_ROWS = frozenset((*ROUND_ROWS, *SLOW_ROWS, "rss"))

#: Rows measured by a ``benchmarks._run`` worker: kind and extra parameters.
WORKER_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "T": ("transfer", {}),
    "T.lean": ("transfer-lean", {}),
    "D": ("decode", {"type": "event"}),
    "D.check": ("decode", {"type": "check"}),
    "D.feed": ("decode", {"type": "event", "framing": True}),
    "sdk.iter": ("sdk", {"mode": "iter"}),
    "sdk.batches": ("sdk", {"mode": "batches"}),
    "sdk.raw": ("sdk", {"mode": "raw"}),
    "httpx.lines": ("httpx-lines", {}),
    "aiohttp.lines": ("aiohttp-lines", {}),
}


class Throughput:
    """Samples of the interleaved throughput rows, against one source server."""

    def __init__(self, opts: Options, port: int) -> None:
        self.opts = opts
        self.port = port
        self.samples: dict[str, list[dict[str, Any]]] = {}
        self.errors: dict[str, str] = {}
        self.bus_events = bus_events()

    def add(self, row: str, sample: dict[str, Any]) -> None:
        self.samples.setdefault(row, []).append(sample)

    def _params(self, row: str, n: int) -> tuple[str, dict[str, Any]]:
        kind, extra = WORKER_ROWS[row]
        repeats = self.opts.repeats if row in ROUND_ROWS else 1
        params = {"url": events_url(self.port, n), "events": n, "repeats": repeats}
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
                # exit status 0 (checked) means every line validated, the stream ended cleanly
                self.add(row, self._net(n, lambda count: (*self._cli_once(count), True)))
            elif row == "curl":
                self.add(row, self._net(n, self._curl_once))
            elif row == "curl.jq":
                self.add(row, self._net(n, self._curl_jq_once))
            elif row in ("cli.pipe", "curl.pipe"):
                self.add(row, self._net(n, lambda count: self._pipe_once(row, count)))
            elif row in ("cli.file", "curl.file"):
                self.add(row, self._net(n, lambda count: self._file_once(row, count)))
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
        argv, env = self._listen_argv(n, output)
        seconds, proc, cpu = timed(argv, env=env, timeout=self.opts.worker_timeout)
        if proc.returncode != 0:
            raise WorkerError(
                f"bus-events listen: exit status {proc.returncode}: "
                + proc.stderr.decode(errors="replace").strip()[-300:]
            )
        return seconds, cpu

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

    def _listen_argv(self, n: int, output: str | None) -> tuple[list[str], dict[str, str]]:
        env = {"BUS_EVENTS_API_URL": events_url(self.port, n), "BUS_API_TOKEN": "bench"}
        argv = [*self.bus_events, "listen", "--name", _workload.EVENT_NAME]
        argv += ["--replay", "--no-follow"]
        return ([*argv, "-o", output] if output else argv), env

    def _curl_argv(self, n: int) -> list[str]:
        return ["curl", "-sSN", events_url(self.port, n) + "/stream"]

    def _net(self, n: int, once: Callable[[int], tuple[float, float, bool]]) -> dict[str, Any]:
        """``once(n)`` and ``once(0)`` (start-up and exit): wall and CPU time of both."""
        seconds, cpu, intact = once(n)
        startup, startup_cpu, _ = once(0)
        return {
            "events": n,
            "seconds": seconds,
            "cpu": cpu,
            "startup": startup,
            "startup_cpu": startup_cpu,
            "intact": intact,
        }

    def _pipe_once(self, row: str, n: int) -> tuple[float, float, bool]:
        """``… | wc -c``: the CLI or curl writing into a pipe; wc's count is checked."""
        if row == "cli.pipe":
            argv, env = self._listen_argv(n, None)
        else:
            argv, env = self._curl_argv(n), {}
        seconds, cpu, first, second, err, out = timed_pipeline(
            argv, ["wc", "-c"], env=env, timeout=self.opts.worker_timeout, keep_output=True
        )
        if first or second:
            tail = err.decode(errors="replace").strip()[-300:]
            raise WorkerError(f"{row}: exit statuses {first}, {second}: {tail}")
        size = out.strip()
        return seconds, cpu, size.isdigit() and int(size) == n * _workload.LINE_SIZE

    def _file_once(self, row: str, n: int) -> tuple[float, float, bool]:
        """The CLI's or curl's ``-o FILE`` (a fresh file in the temp folder, removed after)."""
        fd, name = tempfile.mkstemp(prefix="busevents-bench-", suffix=".ndjson")
        os.close(fd)
        try:
            if row == "cli.file":
                argv, env = self._listen_argv(n, name)
            else:
                argv, env = [*self._curl_argv(n), "-o", name], {}
            seconds, proc, cpu = timed(argv, env=env, timeout=self.opts.worker_timeout)
            if proc.returncode != 0:
                tail = proc.stderr.decode(errors="replace").strip()[-300:]
                raise WorkerError(f"{row}: exit status {proc.returncode}: {tail}")
            return seconds, cpu, os.path.getsize(name) == n * _workload.LINE_SIZE
        finally:
            os.unlink(name)

    def _curl_once(self, n: int) -> tuple[float, float, bool]:
        """``curl -o /dev/null``; curl's own byte count is checked."""
        argv = ["curl", "-sSN", "-o", "/dev/null", "-w", "%{size_download}"]
        argv.append(events_url(self.port, n) + "/stream")
        seconds, proc, cpu = timed(argv, stdout=subprocess.PIPE, timeout=self.opts.worker_timeout)
        if proc.returncode != 0:
            raise WorkerError(f"curl: exit status {proc.returncode}")
        return seconds, cpu, int(proc.stdout or b"0") == n * _workload.LINE_SIZE

    def _curl_jq_once(self, n: int) -> tuple[float, float, bool]:
        """``curl | jq -c . > /dev/null``; curl's byte count (on its stderr) is checked."""
        curl = ["curl", "-sSN", "-w", "%{stderr}%{size_download}"]
        curl.append(events_url(self.port, n) + "/stream")
        seconds, cpu, curl_status, jq_status, err, _ = timed_pipeline(
            curl, ["jq", "-c", "."], timeout=self.opts.worker_timeout
        )
        if curl_status or jq_status:
            raise WorkerError(f"curl | jq: exit statuses {curl_status}, {jq_status}")
        size = err.strip().rsplit(b"\n", 1)[-1]
        return seconds, cpu, size.isdigit() and int(size) == n * _workload.LINE_SIZE

    def row(self, row: str) -> Row:
        """The row built from its samples: the best one, integrity of all of them."""
        result = Row.of(row)
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


def measure_throughput(opts: Options, rows: list[str], out: dict[str, Row], port: int) -> None:
    bench = Throughput(opts, port)
    have_curl, have_jq = shutil.which("curl") is not None, shutil.which("jq") is not None
    skip: dict[str, str] = {}
    if not have_curl:
        for row in ("curl", "curl.jq", "curl.pipe", "curl.file"):
            skip[row] = "curl not found"
    elif not have_jq:
        skip["curl.jq"] = "jq not found"
    missing = missing_modules("aiohttp", "orjson")
    if missing:
        skip["aiohttp.lines"] = missing
    for row, reason in skip.items():
        if row in rows:
            out[row] = Row.of(row, skipped=reason)
    round_rows = [r for r in ROUND_ROWS if r in rows and r not in skip]
    slow_rows = [r for r in SLOW_ROWS if r in rows and r not in skip]
    for index in range(opts.rounds):
        names = ", ".join(round_rows + [f"{r} ({opts.slow_events:,})" for r in slow_rows])
        progress(f"round {index + 1}/{opts.rounds}: {names}")
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


def measure_rss(opts: Options, out: dict[str, Row], port: int) -> None:
    row = out["rss"] = Row.of("rss", unit="ratio")
    n, early = opts.rss_events, opts.rss_early
    progress(f"rss ({n} events, early point at {early})")
    try:
        result = run_worker(
            "rss",
            {"url": events_url(port, n), "early": early},
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
