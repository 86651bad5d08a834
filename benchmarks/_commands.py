"""The rows that time whole commands: start-up (``--version``, ``--help``) and ``send``.

Each command is run from spawn to exit, several times, in turns with the
command it is compared with (so a burst of load hits both).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ._procs import bus_events, progress, timed
from ._rows import Options, Row

__all__ = ["measure_send", "measure_startup"]

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


def measure_startup(opts: Options, rows: list[str], out: dict[str, Row]) -> None:
    commands = {
        "startup.python": [sys.executable, "-c", "pass"],
        "startup.version": [*bus_events(), "--version"],
        "startup.help": [*bus_events(), "--help"],
    }
    todo = {r: argv for r, argv in commands.items() if r in rows}
    times: dict[str, list[float]] = {r: [] for r in todo}
    progress(f"start-up ({opts.startup_runs} runs each)")
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
        r = out[row] = Row.of(row, unit="s")
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


# -- send ------------------------------------------------------------------------


def measure_send(opts: Options, rows: list[str], out: dict[str, Row], url: str, token: str) -> None:
    """``bus-events send`` against the reference provider, paired run by run with
    ``python -c pass`` (issue 14's ratio: the median of the per-pair ratios) and beside
    ``curl -X POST`` of the same event.  Whole commands, spawn to exit."""
    env = {"BUS_EVENTS_API_URL": url, "BUS_API_TOKEN": token}
    cli = [*bus_events(), "send", "--name", "bench.send", "--payload", '{"n":1}']
    body = json.dumps({"name": "bench.send", "payload": {"n": 1}})
    with tempfile.TemporaryDirectory(prefix="busevents-bench-") as tmp:
        headers = Path(tmp) / "headers"  # keeps the token off curl's command line
        headers.write_text(f"Authorization: Bearer {token}\nContent-Type: application/json\n")
        curl = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"@{headers}"]
        curl += ["--data-binary", body, url]
        commands = {"send.python": [sys.executable, "-c", "pass"], "send.cli": cli}
        if shutil.which("curl"):
            commands["send.curl"] = curl
        elif "send.curl" in rows:
            out["send.curl"] = Row.of("send.curl", skipped="curl not found")
        commands = {r: argv for r, argv in commands.items() if r in rows}
        times: dict[str, list[float]] = {r: [] for r in commands}
        pairs: list[float] = []
        failures: dict[str, str] = {}
        progress(f"send ({opts.send_runs} runs each, paired with python -c pass)")
        if opts.send_runs > 1:
            for argv in commands.values():  # warm the page cache and .pyc files first
                timed(argv, env=env, stdout=subprocess.PIPE, timeout=60)
        for _ in range(opts.send_runs):
            now: dict[str, float] = {}
            for row, argv in commands.items():
                seconds, proc, _ = timed(argv, env=env, stdout=subprocess.PIPE, timeout=60)
                # the CLI's exit status says the provider accepted the event
                ok = proc.returncode == 0 and (
                    row != "send.curl" or proc.stdout in (b"200", b"201", b"202")
                )
                if ok:
                    times[row].append(now.setdefault(row, seconds))
                else:
                    failures[row] = (proc.stdout + proc.stderr).decode(errors="replace")[-200:]
            if "send.cli" in now and "send.python" in now:
                pairs.append(now["send.cli"] / now["send.python"])
    for row in commands:
        r = out[row] = Row.of(row, unit="s")
        if not times[row]:
            r.error = failures.get(row, "failed")
            continue
        r.value = r.seconds = statistics.median(times[row])
        r.intact = row not in failures
        r.details["min_seconds"] = min(times[row])
        r.details["runs_seconds"] = [round(t, 4) for t in times[row]]
    cli, curl_row = out.get("send.cli"), out.get("send.curl")
    if cli and cli.value and pairs:
        cli.ratio, cli.ratio_of, cli.target = statistics.median(pairs), "/ python (paired)", "<= 5"
        cli.details["paired_ratios"] = [round(p, 2) for p in pairs]
        if curl_row and curl_row.value:
            cli.note = f"/ curl POST = {cli.value / curl_row.value:.1f}; medians of {len(pairs)}"
