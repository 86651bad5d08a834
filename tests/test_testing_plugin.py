"""``busevents.testing``: a user's own test suite, run by pytest in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

SRC = str(Path(__file__).resolve().parents[1] / "src")
BIN = str(Path(sys.executable).parent)  # where `bus-events` is installed

USER_TESTS = """
import json
import os
import subprocess

import pytest
import trio

from busevents import Event, EventsClient, Forbidden, Publisher, Worker, open_requester
from busevents.testing import TokenFactory, open_worker


async def echo(event: Event, publisher: Publisher) -> None:
    await publisher.reply(event, "example.echo.reply", event.payload_obj())


async def test_my_worker_answers(bus_client: EventsClient) -> None:
    async with open_worker(bus_client, Worker("example.echo", echo)) as readiness:
        assert readiness.is_ready
        async with open_requester(bus_client, "example.echo.reply") as requester:
            response = await requester.request("example.echo", {"n": 1}, timeout=5)
    assert response.payload_obj() == {"n": 1}


async def test_tokens_from_the_factory(bus_provider, bus_token_factory) -> None:
    assert isinstance(bus_token_factory, TokenFactory)
    token = bus_token_factory("alice", "events:listen")
    async with EventsClient(bus_provider.url, token) as client:
        with pytest.raises(Forbidden):
            await client.send("example.x")


def bus_events(*args, env):
    return subprocess.run(
        ["bus-events", *args], env={**os.environ, **env}, capture_output=True, timeout=60
    )


def test_a_sync_test_runs_the_cli(bus_env) -> None:
    sent = bus_events("send", "--name", "user.sync", "--payload", '{"n": 1}', env=bus_env)
    assert sent.returncode == 0, sent.stderr
    got = bus_events(
        "--timeout", "10s", "listen", "--name", "user.sync", "--replay", "--count", "1",
        env=bus_env,
    )
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["payload"] == {"n": 1}


async def test_a_trio_test_may_block_on_the_cli(bus_env) -> None:
    sent = bus_events("send", "--name", "user.blocking", "--payload", "[2]", env=bus_env)
    assert sent.returncode == 0, sent.stderr
    async with EventsClient.from_env(env=bus_env) as client:
        async with client.listen("user.blocking", replay=True) as stream:
            async for event in stream:
                assert event.payload_obj() == [2]
                break


def test_tokens_of_the_thread_provider(bus_provider_thread) -> None:
    token = bus_provider_thread.token("carol", "events:listen")
    env = {"BUS_EVENTS_API_URL": bus_provider_thread.url, "BUS_API_TOKEN": token}
    refused = bus_events("send", "--name", "user.refused", env=env)
    assert refused.returncode == 1
    assert b"403 forbidden" in refused.stderr


async def test_a_worker_that_is_refused_fails_open_worker(bus_client: EventsClient) -> None:
    with pytest.raises(Forbidden):
        async with open_worker(bus_client, Worker("bus.vm.start", echo)):
            pass
"""

PYTEST_INI = """[pytest]
trio_mode = true
filterwarnings =
    error
    ignore:Async generator 'httpx\\.:ResourceWarning
    ignore:Async generator 'httpcore\\.:ResourceWarning
"""


async def test_a_user_suite_uses_the_fixtures(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text(PYTEST_INI)
    (tmp_path / "test_user.py").write_text(USER_TESTS)
    # The plugin is loaded the way its entry point loads it; ``no:busevents``
    # keeps an installed entry point from registering it a second time.
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:busevents",
        "-p",
        "busevents._pytest_plugin",
    ]
    result = await trio.run_process(
        [*command, "-p", "no:cacheprovider", "-q", "test_user.py"],
        cwd=tmp_path,
        env={"PYTHONPATH": SRC, "PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output
    assert "6 passed" in output, output


def test_the_plugin_module_imports_nothing_heavy() -> None:
    """It is loaded into every pytest run where busevents is installed."""
    code = (
        "import sys, busevents._pytest_plugin; "
        "heavy = {'trio', 'httpx', 'hypercorn', 'jwt', 'busevents.provider'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": SRC}, capture_output=True, check=True
    )
    assert out.stdout.decode().strip() == "[]"
