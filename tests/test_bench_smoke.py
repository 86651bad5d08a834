"""The benchmark harness in ``--quick`` mode, so that it cannot rot.

Runs ``python -m benchmarks --quick`` (a few thousand events through every
row) and checks only that every event arrived intact and that the JSON report
is well formed.  No timing is asserted.  Rows whose tools are missing
(aiohttp/orjson, curl, jq, wrk, nats-py or the NATS server) must be reported
as skipped, never as failed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from benchmarks._registry import load as load_row_modules

ROOT = Path(__file__).resolve().parents[1]

# Rows that need nothing beyond the test extra, and what each must show.
CORE_STREAM_ROWS = (
    "T",
    "T.lean",
    "D",
    "D.check",
    "D.feed",
    "sdk.iter",
    "sdk.batches",
    "sdk.raw",
    "cli",
)
CURL_ROWS = ("curl", "curl.jq", "curl.pipe", "curl.file")
OPTIONAL_ROWS = {
    "aiohttp.lines",
    *CURL_ROWS,
    "send.curl",
    "provider.wrk",
    "bench.cli",
    "nats.pub",
    "nats.jspub",
    "nats.sub",
    "cluster.publish",
}


# Rows of the registered row modules (benchmarks/_registry.py): optional (wrk, Redis, git).
EXTRA_ROWS = {row for module in load_row_modules() for row, _, _ in module.TABLE}
OPTIONAL_ROWS |= EXTRA_ROWS


# Every row runs once, in quick mode: 30-90 s on the busy 2-core VM, and about twice
# that under `pytest --cov` (which follows every child process): a generous bound.
pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not (ROOT / "benchmarks" / "__main__.py").exists():
        pytest.skip("no benchmarks/ package in this checkout")
    out = tmp_path_factory.mktemp("bench") / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=400,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout.decode()[-3000:] + proc.stderr.decode()[-3000:]
    data: dict[str, Any] = json.loads(out.read_text())
    data["_stdout"] = proc.stdout.decode()
    return data


def _rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in report["rows"]}


def test_report_is_well_formed(report: dict[str, Any]) -> None:
    assert set(report) >= {"meta", "rows"}
    assert report["meta"]["options"]["quick"] is True
    rows = _rows(report)
    assert len(rows) == len(report["rows"])  # ids are unique
    expected = {
        *CORE_STREAM_ROWS,
        "H",
        "httpx.lines",
        "aiohttp.lines",
        "curl.jq",
        "curl",
        "curl.pipe",
        "cli.pipe",
        "curl.file",
        "cli.file",
        "rss",
        "startup.python",
        "startup.version",
        "startup.help",
        "send.python",
        "send.cli",
        "send.curl",
        "publish.reuse",
        "publish.new-connection",
        "publish.new-client",
        "publish.raw",
        "publish.sdk",
        "publish.raw.cpu",
        "publish.sdk.cpu",
        "provider.wrk",
        "bench.cli",
        "latency",
        "latency.fanout",
        "scale.idle",
        "scale.fanout",
        "nats.pub",
        "nats.jspub",
        "nats.sub",
        "cluster.publish",
    }
    assert set(rows) == expected | EXTRA_ROWS
    for row in rows.values():
        assert isinstance(row["label"], str) and row["label"]
        if row["skipped"]:
            assert row["id"] in OPTIONAL_ROWS, row
            continue
        assert row["error"] is None, row
        assert isinstance(row["value"], float) and row["value"] > 0, row
        if row["target"] is not None:
            assert isinstance(row["met"], bool), row
    # the printed table shows every row
    for row_id in rows:
        assert f"| {row_id} " in report["_stdout"]


def test_every_event_arrived_intact(report: dict[str, Any]) -> None:
    rows = _rows(report)
    events = report["meta"]["options"]["events"]
    last_id = f"1732900000000-{events - 1:09d}"
    for row_id in (*CORE_STREAM_ROWS, "httpx.lines", "aiohttp.lines", *CURL_ROWS, "cli.pipe"):
        row = rows[row_id]
        if row["skipped"]:
            continue
        assert row["events"] == events, row
        assert row["intact"] is True, row
        if row_id not in ("cli", "cli.pipe", "cli.file", *CURL_ROWS):  # checked by byte count
            assert row["details"]["last_ids"] == [last_id], row
    assert "matches" in rows["cli"]["details"]["verification"]
    rss = rows["rss"]
    assert rss["intact"] is True and rss["events"] == 5 * events
    assert rss["details"]["last_id"] == rss["details"]["expected_last_id"]
    publish_rows = ("publish.reuse", "publish.new-connection", "publish.new-client")
    provider_rows = ("publish.raw", "publish.sdk", "latency", "latency.fanout")
    for row_id in (*publish_rows, *provider_rows, "send.cli", "cli.file"):
        assert rows[row_id]["intact"] is True, rows[row_id]
    for row_id in ("provider.wrk", "bench.cli", "nats.pub", "nats.jspub", "nats.sub"):
        assert rows[row_id]["skipped"] or rows[row_id]["intact"] is True, rows[row_id]
    # the CPU-per-request rows count what the rate rows published
    assert rows["publish.sdk.cpu"]["events"] == rows["publish.sdk"]["events"]


def test_optional_rows_skip_cleanly(report: dict[str, Any]) -> None:
    rows = _rows(report)
    try:
        import aiohttp  # noqa: F401
        import orjson  # noqa: F401
    except ImportError:
        assert "pip install" in rows["aiohttp.lines"]["skipped"]
    else:
        assert rows["aiohttp.lines"]["skipped"] is None
    try:
        import nats  # noqa: F401
    except ImportError:
        assert "pip install" in rows["nats.pub"]["skipped"]
    if shutil.which("wrk") is None:  # quick mode never installs it
        assert "wrk" in rows["provider.wrk"]["skipped"]
