"""The examples run for real: the echo worker and the requester as processes."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from busevents.provider import RunningProvider

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class Worker:
    """``examples/echo_worker.py`` as a process, its stderr collected as it comes."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stderr = b""
        self.changed = trio.Event()

    async def collect(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk
            self.changed.set()
            self.changed = trio.Event()

    async def wait_for(self, text: bytes) -> None:
        while text not in self.stderr:
            await self.changed.wait()


async def run_example(
    name: str, *args: str, env: dict[str, str]
) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


@pytest.mark.parametrize(
    "command",
    [["echo_worker.py"], ["-m", "busevents", "worker", "echo_worker:worker"]],
    ids=["script", "bus-events worker"],
)
async def test_the_echo_worker_answers_the_requester(
    provider: RunningProvider, cli_env, command: list[str]
) -> None:
    env = {**cli_env, "BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token()}
    process = await trio.lowlevel.open_process(
        [sys.executable, *command], env=env, cwd=str(EXAMPLES), stderr=subprocess.PIPE
    )
    worker = Worker(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.collect)
            with trio.fail_after(20):
                await worker.wait_for(b"ready: echo")
            answered = await run_example("requester.py", '{"hello": "world"}', env=env)
            refused = await run_example("requester.py", "[1, 2]", env=env)
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                status = await process.wait()
    finally:
        process.kill()
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout == b"{'echo': {'hello': 'world'}}\n"
    assert refused.returncode == 1
    assert b"bad_request" in refused.stderr and b"expected a JSON object" in refused.stderr
    assert status == 0, worker.stderr
    assert b"received SIGTERM" in worker.stderr
    assert b"HTTP Request" not in worker.stderr  # no line per publish at the default level


async def test_a_required_worker_that_cannot_connect_exits_1(cli_env) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/api/v1/events"
    env = {
        **cli_env,
        "BUS_EVENTS_API_URL": url,
        "BUS_API_TOKEN": "token",
        "BUS_EVENTS_LISTENER_REQUIRED": "1",
        "BUS_EVENTS_LISTENER_RETRY": "0",  # required with retrying on waits instead
    }
    with trio.fail_after(20):
        result = await run_example("echo_worker.py", env=env)
    assert result.returncode == 1
    assert b"BUS_EVENTS_LISTENER_REQUIRED=1" in result.stderr
    no_url = await run_example("echo_worker.py", env=cli_env)
    assert no_url.returncode == 2 and b"BUS_EVENTS_API_URL" in no_url.stderr
