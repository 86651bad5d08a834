"""What the CLI shows only on a terminal: live --stats and batch progress lines."""

from __future__ import annotations

import os
import pty
import sys

import pytest
import trio

from busevents import EventsClient
from busevents.provider import RunningProvider


async def run_with_tty_stderr(
    args: list[str], env: dict[str, str], stdin: bytes = b""
) -> tuple[int, bytes, bytes]:
    """Run the CLI with stderr on a pseudo-terminal; return (status, stdout, terminal output)."""
    master, slave = pty.openpty()
    try:
        proc = await trio.run_process(
            [sys.executable, "-m", "busevents", *args],
            env=env,
            stdin=stdin,
            capture_stdout=True,
            stderr=slave,
            check=False,
        )
    finally:
        os.close(slave)
    screen = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the pty's other side is closed: all read
            break
        if not data:
            break
        screen += data
    os.close(master)
    return proc.returncode, proc.stdout, screen


@pytest.fixture
async def env(cli_env: dict[str, str], provider: RunningProvider) -> dict[str, str]:
    token = provider.token(subject="tty")
    async with EventsClient(provider.url, token) as client:
        for i in range(20):
            await client.send("example.tty", i)
    return {**cli_env, "BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": token}


async def test_stats_draws_a_live_line_on_a_terminal(env: dict[str, str]) -> None:
    status, out, screen = await run_with_tty_stderr(
        ["listen", "--name", "example.tty", "--replay", "--no-follow", "--stats"], env
    )
    assert status == 0 and len(out.splitlines()) == 20
    assert b"\r\x1b[Kbus-events: " in screen  # the live line, redrawn in place
    assert b"bus-events: 20 events," in screen  # then the summary


async def test_batch_send_shows_progress_on_a_terminal(env: dict[str, str]) -> None:
    lines = b"".join(b'{"name":"example.tty2","payload":%d}\n' % i for i in range(30))
    status, out, screen = await run_with_tty_stderr(["send", "--ndjson", "-"], env, stdin=lines)
    assert status == 0 and out == b"accepted 30 failed 0\n"
    assert b"\r\x1b[Kbus-events: accepted " in screen


async def test_no_live_lines_when_stderr_is_not_a_terminal(run_cli, env: dict[str, str]) -> None:
    result = await run_cli(
        "listen", "--name", "example.tty", "--replay", "--no-follow", "--stats", env=env
    )
    assert "\x1b[" not in result.stderr and "\r" not in result.stderr
    assert result.stderr.startswith("bus-events: 20 events,")
