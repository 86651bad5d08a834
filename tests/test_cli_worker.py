"""``bus-events worker MODULE:ATTR``: the CLI runs a worker host, as a subprocess."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

from busevents import EventsClient, open_requester
from busevents.provider import RunningProvider

from .test_worker_health import answers, key, samples, until
from .test_worker_stop import free_url, host_process, stop

WORKERS = """
import os
from pathlib import Path

import trio

from busevents import Worker

STARTS = Path(os.environ["TEST_WORKER_STARTS"])
running = 0


async def slow(event, publisher):
    global running
    running += 1
    with STARTS.open("a") as f:
        f.write(f"{running}\\n")  # how many run at once
    await trio.sleep(0.2)
    running -= 1


async def echo(event, publisher):
    await publisher.reply(event, "cli.echo.reply", {"echo": event.payload_obj()})


def make():
    return [Worker("cli.slow", slow, label="slow")]


echo_worker = Worker("cli.echo", echo, label="echo")
"""


async def test_worker_runs_the_workers_of_modules_in_one_host(
    provider: RunningProvider, cli_env: dict[str, str], tmp_path: Path, http: httpx.AsyncClient
) -> None:
    (tmp_path / "my_workers.py").write_text(WORKERS)
    starts = tmp_path / "starts"
    health = free_url()
    addr = health.removeprefix("http://")
    env = {
        **cli_env,
        "BUS_EVENTS_API_URL": provider.url,
        "BUS_API_TOKEN": provider.token(),
        "BUS_EVENTS_LOG_FORMAT": "json",
        "TEST_WORKER_STARTS": str(starts),
    }
    command = [sys.executable, "-m", "busevents", "worker", "my_workers:make"]
    command += ["my_workers:echo_worker", "--health-addr", addr, "--concurrency", "1"]
    async with host_process(command, env, tmp_path) as out:
        await until(lambda: answers(http, f"{health}/readyz", 200))
        async with EventsClient(provider.url, provider.token()) as client:
            for i in range(3):
                await client.send("cli.slow", {"n": i})
            async with open_requester(client, "cli.echo.reply") as requester:
                response = await requester.request("cli.echo", {"n": 7}, timeout=10)
        assert response.payload_obj() == {"echo": {"n": 7}}

        async def handled() -> bool:
            got = samples((await http.get(f"{health}/metrics")).text)
            name = key("busevents_worker_events_handled_total", worker="slow", name="cli.slow")
            return got.get(name) == 3

        await until(handled)
        await stop(out.process)
    # --concurrency 1: never two handlers of a worker at once.
    assert starts.read_text().split() == ["1", "1", "1"]
    records = [json.loads(line) for line in out.data.decode().splitlines()]
    messages = [r["message"] for r in records]
    assert "ready: slow, echo" in messages
    assert any(m.startswith("stopped: ") for m in messages), messages
    assert provider.token() not in out.data.decode()


@pytest.mark.parametrize(
    ("flags", "variables", "status"),
    [
        (["--no-retry", "--required"], {}, 1),  # retrying is on by default: it would wait
        ([], {"BUS_EVENTS_LISTENER_RETRY": "0", "BUS_EVENTS_LISTENER_REQUIRED": "1"}, 1),
        ([], {"BUS_EVENTS_LISTENER_RETRY": "0"}, 0),  # not required: the listener gives up
        (["--required"], {"BUS_EVENTS_LISTENER_RETRY": "0"}, 1),  # a flag wins
    ],
)
async def test_worker_takes_the_listener_retry_flags_and_variables(
    run_cli,
    unused_url: str,
    tmp_path: Path,
    flags: list[str],
    variables: dict[str, str],
    status: int,
) -> None:
    (tmp_path / "my_workers.py").write_text(WORKERS)
    env = {"BUS_EVENTS_API_URL": unused_url, "BUS_API_TOKEN": "x.y.z", "TEST_WORKER_STARTS": "-"}
    result = await run_cli(
        "worker", "my_workers:echo_worker", *flags, env={**env, **variables}, cwd=tmp_path
    )
    assert result.status == status, result.stderr
    assert "listener cli.echo (echo)" in result.stderr
    assert "retrying is off" in result.stderr


BAD_MODULES = {
    "broken_mod.py": "x = 1\nraise RuntimeError('no config here')\n",
    "needs_dep.py": "import not_installed_anywhere_xyz\n",
    "syntax_mod.py": "def f(:\n",
    "exits_mod.py": "import sys\nsys.exit(3)\n",
    "shapes.py": (
        "from busevents import Worker\n"
        "async def h(event, publisher): pass\n"
        "good = Worker('x.y', h)\n"
        "empty = []\n"
        "mixed = [good, 'x']\n"
        "number = 5\n"
        "def needs_args(n): return [good]\n"
        "async def async_factory(): return [good]\n"
        "def returns_text(): return 'x'\n"
        "def raises(): raise ValueError('bad factory')\n"
    ),
}


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("shapes", "'shapes' is not MODULE:ATTR"),
        ("shapes:", "'shapes:' is not MODULE:ATTR"),
        ("no_such_module_xyz:w", "no module named 'no_such_module_xyz' in "),
        ("shapes:goood", "'shapes' has no attribute 'goood'; did you mean 'good'?"),
        ("shapes:good.label.nope", "'shapes.good.label' has no attribute 'nope'"),
        ("shapes:number", "shapes:number: is a int, not a Worker, a list of Workers"),
        ("shapes:empty", "the list is empty"),
        ("shapes:mixed", "holds a str, not only Workers"),
        ("shapes:needs_args", "a factory is called without arguments; it needs some"),
        ("shapes:async_factory", "an async function; a factory must be a plain function"),
        ("shapes:returns_text", "shapes:returns_text(): is a str, not a Worker"),
        ("shapes:raises", "shapes:raises(): failed at "),
        ("broken_mod:x", "importing 'broken_mod' failed at "),
        ("needs_dep:x", "it imports 'not_installed_anywhere_xyz', which is not installed"),
        ("syntax_mod:x", "syntax_mod.py:1: syntax error"),
        ("exits_mod:x", "importing 'exits_mod' exited (status 3)"),
    ],
)
async def test_a_bad_target_is_a_usage_error_without_a_traceback(
    run_cli, tmp_path: Path, target: str, message: str
) -> None:
    for name, text in BAD_MODULES.items():
        (tmp_path / name).write_text(text)
    env = {"BUS_EVENTS_API_URL": "http://127.0.0.1:9/api/v1/events", "BUS_API_TOKEN": "x.y.z"}
    result = await run_cli("worker", target, env=env, cwd=tmp_path)
    assert result.status == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.startswith("bus-events: error: ")
    assert "Traceback" not in result.stderr
    assert "(see: bus-events worker --help)" in result.stderr


async def test_worker_needs_a_target(run_cli) -> None:
    result = await run_cli("worker")
    assert result.status == 2
    assert "worker needs at least one MODULE:ATTR" in result.stderr


async def test_a_bad_health_address_flag_is_exit_2(run_cli, tmp_path: Path) -> None:
    (tmp_path / "my_workers.py").write_text(WORKERS)
    env = {"BUS_EVENTS_API_URL": "http://127.0.0.1:9/api/v1/events", "BUS_API_TOKEN": "x.y.z"}
    env["TEST_WORKER_STARTS"] = "-"
    result = await run_cli(
        "worker", "my_workers:echo_worker", "--health-addr", "127.0.0.1", env=env, cwd=tmp_path
    )
    assert result.status == 2, result.stderr
    assert "health_addr: '127.0.0.1' is not HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr
