"""``listen`` for long-running use: ``--retry`` (and ``BUS_EVENTS_LISTENER_RETRY``),
de-duplication with ``--replay``, and a closed pipe noticed on a quiet stream.

Real processes throughout: ``bus-events serve`` (restarted where the test says
so), the CLI as a subprocess, and the soak harness's fault proxy to cut a
connection while the provider keeps its history.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import trio
from benchmarks._fault_proxy import FaultProxy

from busevents import EventsClient
from busevents.provider import mint_token

from .test_refresh import free_port, serve, write_token

SECRET = "e" * 64
CLI = [sys.executable, "-m", "busevents"]


def token() -> str:
    return mint_token(SECRET.encode(), subject="cli", scopes="events:send events:listen")


async def lines_in(path: Path, count: int, limit: float = 30) -> list[dict[str, object]]:
    """The JSON lines of ``path`` once it holds at least ``count`` (at most ``limit`` s)."""
    with trio.fail_after(limit):
        while True:
            file = trio.Path(path)
            data = await file.read_bytes() if await file.exists() else b""
            if data.count(b"\n") >= count:
                return [json.loads(x) for x in data.splitlines() if x.strip()]
            await trio.sleep(0.05)


async def stop(proc: trio.Process) -> int:
    proc.send_signal(signal.SIGINT)
    with trio.CancelScope(shield=True), trio.move_on_after(15):
        await proc.wait()
    if proc.returncode is None:
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode


async def test_a_closed_pipe_ends_a_quiet_listen(cli_env: dict[str, str], tmp_path: Path) -> None:
    """``listen | head -n 2`` exits once head has its lines, though no further event
    comes (before the fix only a next event, maybe hours later, would end it)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1/events"
    write_token(tmp_path / "token", token())
    async with serve(port, SECRET, cli_env):
        async with EventsClient(url, token()) as client:
            ids = [(await client.send("example.pipe", {"n": n})).id for n in range(2)]
        shell = await trio.lowlevel.open_process(
            [
                "sh",
                "-c",
                f'"{sys.executable}" -m busevents --api-url {url} --token-file token '
                "listen --name example.pipe --replay | head -n 2",
            ],
            env=cli_env,
            cwd=str(tmp_path),
            stdout=subprocess.PIPE,
        )
        try:
            assert shell.stdout is not None
            out = b""
            with trio.fail_after(30):  # the shell ends when both sides of the pipe did
                while chunk := await shell.stdout.receive_some(65536):
                    out += chunk
                await shell.wait()
            assert shell.returncode == 0
            assert [json.loads(x)["id"] for x in out.splitlines()] == ids
        finally:
            if shell.returncode is None:
                await stop(shell)


async def test_retry_replay_writes_each_event_once_across_a_cut(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    out = tmp_path / "events.ndjson"
    write_token(tmp_path / "token", token())
    async with serve(port, SECRET, cli_env), trio.open_nursery() as nursery:
        proxy = FaultProxy(port)
        proxy_port = await nursery.start(proxy.serve)
        url = f"http://127.0.0.1:{proxy_port}/api/v1/events"
        cli = await trio.lowlevel.open_process(
            [
                *CLI,
                "--api-url",
                url,
                "--token-file",
                "token",
                "-o",
                str(out),
                "listen",
                "--name",
                "example.cut",
                "--retry",
                "--replay",
            ],
            env={**cli_env, "BUS_EVENTS_LISTENER_RETRY_MIN": "50ms"},
            cwd=str(tmp_path),
            stderr=subprocess.PIPE,
        )
        direct = f"http://127.0.0.1:{port}/api/v1/events"
        async with EventsClient(direct, token()) as client:
            first = [(await client.send("example.cut", {"n": n})).id for n in range(3)]
            await lines_in(out, 3)
            assert proxy.cut(("stream-broadcast",)) is not None
            more = [(await client.send("example.cut", {"n": n})).id for n in range(3, 5)]
            got = await lines_in(out, 5)
        await trio.sleep(0.5)  # a duplicate, were one written, would have arrived by now
        got = await lines_in(out, 5)
        status = await stop(cli)
        nursery.cancel_scope.cancel()
    assert [e["id"] for e in got] == first + more
    assert status == 130
    assert proxy.connections >= 2  # it did reconnect


async def test_retry_from_the_environment_survives_a_provider_restart(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """The provider process is killed and started again (its memory history is gone):
    the listen reconnects by itself and writes what is published afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1/events"
    out = tmp_path / "events.ndjson"
    write_token(tmp_path / "token", token())
    env = {
        **cli_env,
        "BUS_EVENTS_LISTENER_RETRY": "1",
        "BUS_EVENTS_LISTENER_RETRY_MIN": "50ms",
        "BUS_EVENTS_LISTENER_RETRY_MAX": "300ms",
    }
    cli: trio.Process | None = None
    try:
        async with serve(port, SECRET, cli_env):
            cli = await trio.lowlevel.open_process(
                [
                    *CLI,
                    "--api-url",
                    url,
                    "--token-file",
                    "token",
                    "-o",
                    str(out),
                    "listen",
                    "--name",
                    "example.restart",
                    "--replay",
                ],
                env=env,
                cwd=str(tmp_path),
                stderr=subprocess.PIPE,
            )
            async with EventsClient(url, token()) as client:
                before = (await client.send("example.restart", {"n": 1})).id
                await lines_in(out, 1)
        # Killed; the CLI retries against a closed port meanwhile.
        await trio.sleep(0.5)
        assert cli.returncode is None
        async with serve(port, SECRET, cli_env), EventsClient(url, token()) as client:
            with trio.fail_after(30):
                while True:  # published until the reconnected listener has one
                    after = (await client.send("example.restart", {"n": 2})).id
                    with trio.move_on_after(0.5):
                        got = await lines_in(out, 2, limit=1e9)
                        break
        assert got[0]["id"] == before and after in {e["id"] for e in got[1:]}
        assert len({e["id"] for e in got}) == len(got)
    finally:
        if cli is not None:
            await stop(cli)


async def test_without_retry_a_dropped_connection_is_exit_1(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1/events"
    write_token(tmp_path / "token", token())
    async with serve(port, SECRET, cli_env):
        cli = await trio.lowlevel.open_process(
            [*CLI, "--api-url", url, "--token-file", "token", "listen", "--name", "example.drop"],
            env=cli_env,
            cwd=str(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        await trio.sleep(2)  # let it subscribe
    with trio.fail_after(20):
        await cli.wait()
    assert cli.returncode == 1


async def test_max_retries_gives_up_with_exit_1(run_cli, unused_url: str, tmp_path: Path) -> None:
    """Nothing listens: with --retry the listen keeps trying, --max-retries bounds it."""
    write_token(tmp_path / "token", token())
    result = await run_cli(
        "--api-url",
        unused_url,
        "--token-file",
        "token",
        "listen",
        "--name",
        "example.gone",
        "--retry",
        "--max-retries",
        "2",
        env={"BUS_EVENTS_LISTENER_RETRY_MIN": "10ms", "BUS_EVENTS_LISTENER_RETRY_MAX": "20ms"},
    )
    assert result.status == 1
    assert "giving up after 2 reconnect(s)" in result.stderr
    assert result.stderr.count("reconnecting in") == 2
