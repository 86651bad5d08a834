"""``bus-events bench`` as a subprocess against the reference provider."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio

from busevents import EventsClient
from busevents.provider import RunningProvider

from .conftest import Result
from .helpers import wait_for

# Imports the command's module itself, so that these tests do not depend on
# which commands ``cli._app.run`` registers.
CLI = "import sys; from busevents.cli import _bench, main; sys.exit(main())"


@pytest.fixture
def env(provider: RunningProvider) -> dict[str, str]:
    return {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token(subject="bench")}


@pytest.fixture
def bench(cli_env: dict[str, str], env: dict[str, str], tmp_path: Path):
    """Run ``bus-events ARGS`` (with ``bench`` registered) as a subprocess."""

    async def run(*args: str, extra_env: Mapping[str, str] | None = None) -> Result:
        proc = await trio.run_process(
            [sys.executable, "-c", CLI, *args],
            env={**cli_env, **env, **(extra_env or {})},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=str(tmp_path),
        )
        return Result(proc.returncode, proc.stdout, proc.stderr.decode())

    return run


async def stored(provider: RunningProvider, name: str) -> int:
    """How many events the provider holds for ``name`` (read with a service token)."""
    token = provider.token(audience="ai.hg.fi/internal")
    async with EventsClient(provider.url, token) as client:
        async with client.listen(name, replay=True, follow=False) as stream:
            return sum([len(batch) async for batch in stream.batches()])


async def test_broadcast_bench_json_report(bench, provider, tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    result = await bench(
        "-f", "json", "bench", "--name", "bench.cli", "--publishers", "2", "--listeners", "2",
        "--events", "400", "--warmup", "0s", "--report", str(path),
    )  # fmt: skip
    assert result.status == 0, result.stderr
    report = json.loads(result.stdout)
    assert json.loads(path.read_text()) == report
    assert report["plan"]["name"] == "bench.cli" and report["target"] == provider.url
    assert report["publish"]["accepted"] == 400 and report["publish"]["errors"] == {}
    delivery = report["delivery"]
    assert [li["received"] for li in delivery["listeners"]] == [400, 400]
    assert (delivery["lost"], delivery["duplicated"], delivery["out_of_order"]) == (0, 0, 0)
    assert set(delivery["latency_us"]) >= {"count", "p50", "p90", "p99", "p99.9", "max", "hdr"}
    assert report["verdict"] == {"ok": True, "checked": True, "problems": []}
    assert await stored(provider, "bench.cli") == 400
    # Not a terminal: no progress line, just the one note of what runs.
    assert "\r" not in result.stderr and result.stderr.count("\n") == 1


async def test_unicast_bench_prints_the_summary(bench) -> None:
    result = await bench(
        "bench", "--name", "bench.cli", "--publishers", "2", "--listeners", "3",
        "--delivery", "unicast", "--group", "workers", "--events", "300", "--warmup", "0s",
    )  # fmt: skip
    assert result.status == 0, result.stderr
    out = result.out
    for heading in ("publish ", "deliver ", "latency (ms)", "end-to-end", "HTTP errors: none"):
        assert heading in out
    group_row = next(line for line in out.splitlines() if line.startswith("  group workers"))
    assert group_row.split()[2:3] == ["300"]
    assert out.rstrip().endswith("verdict: OK, the group got every event exactly once")


async def test_dry_run_prints_the_plan_and_sends_nothing(bench, provider) -> None:
    result = await bench(
        "bench", "--name", "bench.dry", "--publishers", "4", "--listeners", "10",
        "--rate", "200/s", "--duration", "30s", "--dry-run",
    )  # fmt: skip
    assert result.status == 0, result.stderr
    assert "dry run: nothing was sent" in result.out
    assert "50/s each" in result.out and "from BUS_API_TOKEN" in result.out
    as_json = await bench("-f", "json", "bench", "--name", "bench.dry", "--dry-run")
    plan = json.loads(as_json.stdout)
    assert plan["dry_run"] is True and plan["plan"]["events"] == 10_000
    assert provider.backend.subscriber_count("bench.dry") == 0
    assert await stored(provider, "bench.dry") == 0


# The plan's rules are tested in test_loadtest.py; these go through the CLI's parsing.
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--publishers", "2"], "bench needs --name"),
        (["--name", "bus.vm.start"], "--allow-reserved"),
        (["--name", "bench.x", "--rate", "fast"], "--rate"),
        (["--name", "bench.x", "--duration", "5"], "missing unit"),
    ],
)
async def test_guard_rails_exit_2_and_send_nothing(bench, provider, args, message) -> None:
    result = await bench("bench", *args)
    assert result.status == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert result.stdout == b""
    assert provider.backend.stats.published == 0


async def test_an_unwritable_report_is_found_before_anything_is_sent(
    bench, provider, tmp_path
) -> None:
    path = tmp_path / "missing" / "report.json"
    result = await bench("bench", "--name", "bench.x", "--report", str(path))
    assert result.status == 1 and f"cannot write the report to {path}" in result.stderr
    assert provider.backend.stats.published == 0


async def test_reserved_name_allowed_still_meets_the_provider_policy(bench) -> None:
    result = await bench("bench", "--name", "bus.vm.bench", "--allow-reserved", "--events", "5")
    assert result.status == 1
    assert "HTTP 403" in result.stderr and 'bus auth token --scope "vm:' in result.stderr
    assert result.stdout == b""


async def test_ctrl_c_stops_worker_processes_with_a_partial_report(cli_env, env, provider) -> None:
    args = [
        "-f", "json", "bench", "--name", "bench.stop", "--publishers", "2", "--listeners", "2",
        "--duration", "60s", "--rate", "200/s", "--warmup", "0s", "--processes", "2",
    ]  # fmt: skip
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", CLI, *args],
        env={**cli_env, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out = bytearray()
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:

            async def read_all() -> None:
                assert process.stdout is not None
                while chunk := await process.stdout.receive_some():
                    out.extend(chunk)

            nursery.start_soon(read_all)
            await wait_for(lambda: provider.backend.stats.published >= 100)
            process.send_signal(signal.SIGINT)
            status = await process.wait()
    assert status == 130
    report = json.loads(out)
    # Each publisher may have had one event stored but not yet acknowledged.
    assert report["interrupted"] is True and report["publish"]["accepted"] >= 100 - 2
    assert (report["delivery"]["lost"], report["delivery"]["duplicated"]) == (0, 0)
    assert len(report["delivery"]["listeners"]) == 2
    # Both workers stopped: nothing publishes any more, no stream is left open.
    published = provider.backend.stats.published
    await trio.sleep(0.3)
    assert provider.backend.stats.published == published
    assert provider.backend.subscriber_count("bench.stop") == 0
