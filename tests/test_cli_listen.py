"""``bus-events listen`` stop conditions, filters, stats and text output."""

from __future__ import annotations

import json

import pytest
import trio

from busevents import EventsClient
from busevents.provider import RunningProvider

from .helpers import wait_for


@pytest.fixture
async def env(provider: RunningProvider) -> dict[str, str]:
    token = provider.token(subject="listener")
    async with EventsClient(provider.url, token) as client:
        for i in range(5):
            await client.send("example.hist", {"n": i}, correlation_id=f"c{i}")
    return {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": token}


HISTORY = ["--name", "example.hist", "--replay"]


async def test_count_stops_after_n_events(run_cli, env) -> None:
    result = await run_cli("listen", *HISTORY, "--count", "2", env=env)
    assert result.status == 0, result.stderr
    assert [json.loads(x)["payload"] for x in result.stdout.splitlines()] == [{"n": 0}, {"n": 1}]


async def test_count_not_reached_before_the_end_is_exit_1(run_cli, env) -> None:
    result = await run_cli("listen", *HISTORY, "--no-follow", "--count", "9", env=env)
    assert result.status == 1
    assert len(result.stdout.splitlines()) == 5
    assert "5 of the 9 events asked for arrived before the stream ended" in result.stderr


async def test_count_not_reached_before_the_timeout_is_exit_1(run_cli, env) -> None:
    result = await run_cli("--timeout", "1s", "listen", *HISTORY, "--count", "9", env=env)
    assert result.status == 1 and len(result.stdout.splitlines()) == 5


async def test_correlation_id_filter_keeps_the_original_line(run_cli, env, provider) -> None:
    full = await run_cli("listen", *HISTORY, "--no-follow", env=env)
    wanted = [x for x in full.stdout.splitlines(keepends=True) if b'"c3"' in x]
    result = await run_cli("listen", *HISTORY, "--correlation-id", "c3", "--count", "1", env=env)
    assert result.status == 0 and result.stdout == b"".join(wanted)
    text = await run_cli(
        "-f", "text", "listen", *HISTORY, "--no-follow", "--correlation-id", "c1", env=env
    )
    (row,) = text.out.splitlines()
    assert "c1" in row and '{"n":1}' in row


async def test_waiting_for_a_reply_with_count_1(run_cli, env, provider) -> None:
    async def reply_later() -> None:
        # Once the CLI's listener is subscribed, the replies cannot be missed.
        await wait_for(lambda: provider.backend.subscriber_count("example.reply") == 1)
        async with EventsClient(provider.url, env["BUS_API_TOKEN"]) as client:
            await client.send("example.reply", {"other": True}, correlation_id="someone-else")
            await client.send("example.reply", {"done": True}, correlation_id="mine")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reply_later)
        result = await run_cli(
            "--timeout",
            "20s",
            "listen",
            "--name",
            "example.reply",
            "--correlation-id",
            "mine",
            "--count",
            "1",
            env=env,
        )
    assert result.status == 0, result.stderr
    assert json.loads(result.stdout)["payload"] == {"done": True}


async def test_idle_timeout_reads_what_is_there_then_stops(run_cli, env) -> None:
    result = await run_cli("listen", *HISTORY, "--idle-timeout", "700ms", env=env)
    assert result.status == 0, result.stderr
    assert len(result.stdout.splitlines()) == 5


async def test_stats_summary_on_stderr(run_cli, env) -> None:
    result = await run_cli("listen", *HISTORY, "--no-follow", "--stats", env=env)
    assert result.status == 0
    assert len(result.stdout.splitlines()) == 5
    assert (
        "bus-events: 5 events," in result.stderr
        and "events/s" in result.stderr
        and " B, " in result.stderr
    )
    quiet = await run_cli("-q", "listen", *HISTORY, "--no-follow", "--stats", env=env)
    assert quiet.stdout == b"" and quiet.stderr == ""


async def test_text_lines_are_aligned_and_uncolored(run_cli, env) -> None:
    result = await run_cli(
        "--color", "always", "-f", "text", "listen", *HISTORY, "--no-follow", env=env
    )
    rows = result.out.splitlines()
    assert len(rows) == 5 and "\x1b[" not in result.out
    starts = {row.index('{"n"') for row in rows}
    assert len(starts) == 1  # payload column aligned


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--count", "0"], "--count must be at least 1"),
        (["--idle-timeout", "5"], "--idle-timeout"),
        (["--group", "g"], "--group needs --delivery unicast"),
    ],
)
async def test_bad_listen_options_are_usage_errors(run_cli, env, args, message) -> None:
    result = await run_cli("listen", "--name", "example.hist", *args, env=env)
    assert result.status == 2 and message in result.stderr


async def test_listen_into_a_pipe_widens_the_pipe(env, cli_env) -> None:
    """A stream into `| next-tool` gets a larger pipe buffer (fewer blocking writes)."""
    import fcntl
    import os
    import sys

    get_size = getattr(fcntl, "F_GETPIPE_SZ", None)
    if get_size is None:
        pytest.skip("F_GETPIPE_SZ is Linux only")
    read_end, write_end = os.pipe()
    try:
        before = fcntl.fcntl(read_end, get_size)
        proc = await trio.run_process(
            [sys.executable, "-m", "busevents", "listen", *HISTORY, "--no-follow"],
            env={**cli_env, **env},
            stdout=write_end,
            capture_stderr=True,
            check=False,
        )
        assert proc.returncode == 0
        os.close(write_end)
        write_end = -1
        lines = os.read(read_end, 1 << 20).splitlines()
        assert [json.loads(line)["payload"]["n"] for line in lines] == [0, 1, 2, 3, 4]
        assert before < 1 << 20 <= fcntl.fcntl(read_end, get_size)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
