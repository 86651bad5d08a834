"""A worker host through its stop, and the reasons its ``/readyz`` gives: real sockets."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import httpx
import trio

from busevents import EventsClient, RetryPolicy, Worker, WorkerHost
from busevents.provider import RunningProvider, mint_token

from .test_worker_health import Output, answers, key, samples, until


@asynccontextmanager
async def host_process(
    command: list[str], env: dict[str, str], cwd: Path | None = None
) -> AsyncIterator[Output]:
    """A worker host subprocess, its stderr collected; killed if still running at the end."""
    host = await trio.lowlevel.open_process(
        command, env=env, cwd=None if cwd is None else str(cwd), stderr=subprocess.PIPE
    )
    out = Output(host)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(out.collect)
        try:
            yield out
        finally:
            if host.returncode is None:
                host.kill()


async def stop(host: trio.Process) -> None:
    """SIGTERM, then the exit status a supervisor expects: 0."""
    host.send_signal(signal.SIGTERM)
    with trio.fail_after(20):
        assert await host.wait() == 0


def free_url() -> str:
    """``http://127.0.0.1:PORT`` with a port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


SLOW_WORKERS = """
import sys
from pathlib import Path

import trio

from busevents import Worker, run_host

GATE = Path(sys.argv[1])


async def slow(event, publisher):
    while not GATE.exists():  # finishes once the test lets it
        await trio.sleep(0.02)


async def stuck(event, publisher):
    await trio.sleep_forever()  # only the end of its grace period stops it


sys.exit(
    run_host(
        Worker("ops.slow", slow, label="slow", grace_period=120),
        Worker("ops.stuck", stuck, label="stuck", grace_period=0.1),
    )
)
"""


async def test_the_health_server_answers_through_the_drain_of_a_stop(
    provider: RunningProvider, cli_env: dict[str, str], tmp_path: Path, http: httpx.AsyncClient
) -> None:
    script = tmp_path / "slow_workers.py"
    script.write_text(SLOW_WORKERS)
    gate = tmp_path / "gate"
    health = free_url()
    env = {
        **cli_env,
        "BUS_EVENTS_API_URL": provider.url,
        "BUS_API_TOKEN": provider.token(),
        "BUS_EVENTS_HEALTH_ADDR": health.removeprefix("http://"),
    }
    async with host_process([sys.executable, str(script), str(gate)], env) as out:
        host = out.process
        await until(lambda: answers(http, f"{health}/readyz", 200))
        async with EventsClient(provider.url, provider.token()) as client:
            await client.send("ops.slow", {"n": 1})
            await client.send("ops.stuck", {"n": 2})

        async def in_flight() -> dict[str, float]:
            got = samples((await http.get(f"{health}/metrics")).text)
            return {
                w: got[key("busevents_worker_handlers_in_flight", worker=w)]
                for w in ("slow", "stuck")
            }

        async def both_running() -> bool:
            return await in_flight() == {"slow": 1, "stuck": 1}

        await until(both_running)
        host.send_signal(signal.SIGTERM)

        async def shutting_down() -> bool:
            response = await http.get(f"{health}/readyz")
            return response.status_code == 503 and response.json()["error"] == "shutting_down"

        await until(shutting_down)

        async def stuck_cancelled() -> bool:
            return await in_flight() == {"slow": 1, "stuck": 0}

        # The drain: alive, scraped, the slow handler still counted in flight.
        await until(stuck_cancelled)
        healthz = await http.get(f"{health}/healthz")
        assert healthz.status_code == 200
        assert healthz.json() == {"ok": True, "service": "busevents-worker"}
        assert (await http.get(f"{health}/readyz")).json() == {
            "ok": False,
            "service": "busevents-worker",
            "error": "shutting_down",
        }
        assert host.returncode is None
        assert b"stopped:" not in out.data
        gate.touch()
        with trio.fail_after(20):
            assert await host.wait() == 0
    # The server closed with the host; one line told how the drain went.
    assert await answers(http, f"{health}/healthz", None)
    lines = [line for line in out.data.decode().splitlines() if "stopped:" in line]
    assert len(lines) == 1, out.data.decode()
    assert lines[0].endswith(
        "stopped: 1 handler(s) finished during the drain, "
        "1 cancelled at the end of the grace period"
    )


async def test_a_second_signal_cancels_the_handlers_still_running(
    provider: RunningProvider, cli_env: dict[str, str], tmp_path: Path, http: httpx.AsyncClient
) -> None:
    script = tmp_path / "slow_workers.py"
    script.write_text(SLOW_WORKERS)
    health = free_url()
    env = {
        **cli_env,
        "BUS_EVENTS_API_URL": provider.url,
        "BUS_API_TOKEN": provider.token(),
        "BUS_EVENTS_HEALTH_ADDR": health.removeprefix("http://"),
    }
    never = tmp_path / "never"  # the slow handler's gate stays shut
    async with host_process([sys.executable, str(script), str(never)], env) as out:

        async def said(text: bytes) -> bool:
            return text in out.data

        async def running() -> bool:
            got = samples((await http.get(f"{health}/metrics")).text)
            return got[key("busevents_worker_handlers_in_flight", worker="slow")] == 1

        await until(lambda: answers(http, f"{health}/readyz", 200))
        async with EventsClient(provider.url, provider.token()) as client:
            await client.send("ops.slow", {"n": 1})
        await until(running)
        out.process.send_signal(signal.SIGTERM)
        await until(lambda: said(b"handler(s) in flight get up to 120s"))
        out.process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await out.process.wait() == 0
    text = out.data.decode()
    assert "received SIGTERM again: cancelling the handlers still running" in text
    assert "stopped: 0 handler(s) finished during the drain, 1 cancelled" in text


async def test_readyz_says_why_each_stream_is_not_ready(http: httpx.AsyncClient) -> None:
    token = mint_token(b"readyz-reasons-secret-0123456789abcdef", subject="reasons")

    async def never(event: object, publisher: object) -> None:
        raise AssertionError("no event comes")

    def hanging(port: int = 0) -> socket.socket:
        """A provider that takes connections and never answers: an attempt hangs."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(8)  # connections wait in its queue, never accepted
        return sock

    listener = hanging()
    port = listener.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api/v1/events"
    async with EventsClient(url, token, timeout=60) as client:
        host = WorkerHost(
            client,
            [Worker("ops.reasons", never, label="reasons")],
            retry=RetryPolicy(min_delay=2, max_delay=2),
            handle_signals=False,
            health_addr="127.0.0.1:0",
        )
        seen: dict[str, object] = {}

        async def in_state(state: str) -> bool:
            if host.health_url is None:
                return False
            response = await http.get(f"{host.health_url}/readyz")
            assert response.status_code == 503
            body = response.json()
            assert body["error"] == "not_ready"
            assert token not in response.text and token.split(".")[2] not in response.text
            if not body["not_ready"]:
                return False  # the worker is not declared yet
            [stream] = body["not_ready"]
            seen.clear()
            seen.update(stream)
            return bool(stream["state"] == state)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(host.run)
            # 1. The first attempt hangs: connecting, no error yet.
            await until(lambda: in_state("connecting"))
            assert seen["worker"] == "reasons" and seen["name"] == "ops.reasons"
            assert "last_error" not in seen and "next_attempt" not in seen
            datetime.fromisoformat(str(seen["since"]))
            # 2. The connection is reset: backoff until the next attempt, with the error.
            listener.close()  # resets the connection waiting in its queue
            await until(lambda: in_state("backoff"))
            since = datetime.fromisoformat(str(seen["since"]))
            assert datetime.fromisoformat(str(seen["next_attempt"])) > since
            error = str(seen["last_error"])
            assert f"127.0.0.1:{port}" in error, error
            # 3. The next attempt hangs again: connecting, the last error still said.
            listener = hanging(port)
            await until(lambda: in_state("connecting"))
            assert seen["last_error"] == error
            assert "next_attempt" not in seen
            nursery.cancel_scope.cancel()
    listener.close()
