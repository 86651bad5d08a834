"""The report: ratios derived from the measured rows, the printed table, the JSON metadata."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import _workload
from ._rows import Options, Row, meets

__all__ = ["derive", "format_table", "meta"]


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


# -- ratios ------------------------------------------------------------------------


def derive(out: dict[str, Row]) -> None:
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
        row = out["H"] = Row.of("H", value=h)
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
    ratio("D.feed", "D.feed", "D", "/ D", ">= 0.90")
    ratio("cli", "cli", "D", "/ D", ">= 0.70")
    ratio("aiohttp.lines", "sdk.iter", "aiohttp.lines", "sdk.iter / this", ">= 5")
    ratio("httpx.lines", "sdk.iter", "httpx.lines", "sdk.iter / this", None)
    ratio("curl.jq", "cli", "curl.jq", "cli / this", ">= 12")
    ratio("curl", "curl", "T", "this / T", None)
    ratio("cli.pipe", "cli.pipe", "curl.pipe", "/ curl.pipe", ">= 0.5")
    ratio("cli.file", "cli.file", "curl.file", "/ curl.file", ">= 0.5")
    cli = out.get("cli")
    if cli and cli.value and hc:
        cli.note = f"/ H(check) = {cli.value / hc:.2f}"
        lean = serial(rate("T.lean"), rate("D.check"))
        if lean:  # the ceiling of the CLI's own path: its transport, then the check
            cli.note += f"; / H(T.lean, check) = {cli.value / lean:.2f}"
    batches, aio = rate("sdk.batches"), rate("aiohttp.lines")
    if batches and aio:
        out["aiohttp.lines"].note = f"sdk.batches / this = {batches / aio:.1f}"
    file_, pipe = rate("cli.file"), rate("curl.pipe")
    if file_ and pipe:
        out["cli.file"].note = f"/ curl.pipe = {file_ / pipe:.2f}"
    for r in out.values():
        if r.met is None:
            # a target on a row without a ratio (provider.wrk) bounds the value itself
            r.met = meets(r.ratio if r.ratio is not None else r.value, r.target)


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
    if r.unit == "us":
        return f"{r.value:,.0f} µs"
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


def meta(opts: Options, started: float, load_start: tuple[float, ...]) -> dict[str, Any]:
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
            "uptime_end": _tool_version(["uptime"]),
        },
        "versions": {
            d: _version(d) for d in ("busevents", "httpx", "httpcore", "h11", "msgspec", "trio")
        }
        | {d: _version(d) for d in ("aiohttp", "orjson", "nats-py", "h11")}
        | {
            "curl": _tool_version(["curl", "--version"]) if shutil.which("curl") else None,
            "jq": _tool_version(["jq", "--version"]) if shutil.which("jq") else None,
            "wrk": _tool_version(["wrk", "--version"]) if shutil.which("wrk") else None,
        },
        "options": {
            k: str(v) if isinstance(v, Path | set) else v for k, v in opts.__dict__.items()
        },
        "line_bytes": _workload.LINE_SIZE,
    }
