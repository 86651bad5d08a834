"""Several `serve` processes on one Redis / PostgreSQL act as one provider; backend faults.

Every provider here is a real `bus-events serve` child process.  Fault tests kill
and restart a private Redis / PostgreSQL (tests/services.py), never the shared one.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from busevents.provider import INTERNAL_AUDIENCE, mint_token

from .conftest import SRC
from .helpers import serve_subprocess
from .services import private_postgres, private_redis

SECRET = "multi-process-secret-0123456789abcdef"
WAIT = 15.0


def token(subject: str, audience: str = "ai.hg.fi/api") -> str:
    return mint_token(
        SECRET.encode(), subject=subject, scopes="events:send events:listen", audience=audience
    )


def auth(subject: str, audience: str = "ai.hg.fi/api") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(subject, audience)}"}


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    env["BUS_API_JWT_SECRET"] = SECRET
    env["PYTHONPATH"] = SRC
    return env


def env_for(request: pytest.FixtureRequest, backend: str) -> dict[str, str]:
    """Environment for `serve` processes on ``backend``, with a fresh prefix / schema."""
    env = base_env()
    env["BUS_EVENTS_TEST_BACKEND"] = backend
    if backend == "redis":
        env["BUS_EVENTS_REDIS_ADDR"] = request.getfixturevalue("redis_addr")
        env["BUS_EVENTS_REDIS_PREFIX"] = request.getfixturevalue("redis_prefix")
    elif backend == "postgres":
        env["BUS_EVENTS_POSTGRES_DSN"] = request.getfixturevalue("postgres_dsn")
    return env


@pytest.fixture(params=["redis", "postgres"])
def backend_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Environment for `serve` processes sharing one fresh prefix / schema."""
    return env_for(request, request.param)


@asynccontextmanager
async def providers(env: dict[str, str], count: int) -> AsyncIterator[list[str]]:
    """``count`` serve processes on the backend named by ``env``; yields their URLs."""
    backend = env["BUS_EVENTS_TEST_BACKEND"]
    async with AsyncExitStack() as stack:
        urls = []
        for _ in range(count):
            url, _proc = await stack.enter_async_context(
                serve_subprocess(env, "--events-backend", backend)
            )
            urls.append(url)
        yield urls


async def publish(http: httpx.AsyncClient, url: str, subject: str, name: str, payload: Any) -> str:
    response = await http.post(url, json={"name": name, "payload": payload}, headers=auth(subject))
    assert response.status_code == 202, response.text
    event_id: str = response.json()["id"]
    return event_id


async def replay(http: httpx.AsyncClient, url: str, name: str, subject: str = "svc") -> list[Any]:
    audience = INTERNAL_AUDIENCE if subject == "svc" else "ai.hg.fi/api"
    response = await http.get(
        url + "/stream",
        params={"name": name, "replay": "true", "follow": "false"},
        headers=auth(subject, audience),
    )
    assert response.status_code == 200, response.text
    return [json.loads(line)["payload"] for line in response.content.splitlines() if line]


class Reader:
    """Collects the payloads of one open stream in a background task."""

    def __init__(self) -> None:
        self.payloads: list[Any] = []
        self.error: Exception | None = None
        self.ready = trio.Event()

    async def run(
        self, http: httpx.AsyncClient, url: str, headers: dict[str, str], **params: str
    ) -> None:
        try:
            async with http.stream(
                "GET", url + "/stream", params=params, headers=headers
            ) as response:
                assert response.status_code == 200
                self.ready.set()
                async for line in response.aiter_lines():
                    if line:
                        self.payloads.append(json.loads(line)["payload"])
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.ready.set()


async def wait_for(condition: Any, limit: float = WAIT) -> None:
    with trio.fail_after(limit):
        # Polling: the condition spans several readers' state and the service's.
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_two_processes_act_as_one_provider(backend_env: dict[str, str]) -> None:
    name = f"example.m{secrets.token_hex(3)}"
    async with providers(backend_env, 2) as (a, b), httpx.AsyncClient(timeout=WAIT) as http:
        alice_on_a, bob_on_b, service_on_b = Reader(), Reader(), Reader()
        c1, c2 = Reader(), Reader()
        unicast = {"name": name, "delivery": "unicast", "group": "g"}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: alice_on_a.run(http, a, auth("alice"), name=name))
            nursery.start_soon(lambda: bob_on_b.run(http, b, auth("bob"), name=name))
            nursery.start_soon(
                lambda: service_on_b.run(http, b, auth("svc", INTERNAL_AUDIENCE), name=name)
            )
            nursery.start_soon(lambda: c1.run(http, a, auth("alice"), consumer="c1", **unicast))
            nursery.start_soon(lambda: c2.run(http, b, auth("alice"), consumer="c2", **unicast))
            for reader in (alice_on_a, bob_on_b, service_on_b, c1, c2):
                await reader.ready.wait()
            await trio.sleep(0.5)  # every stream is reading before the first event
            # At least 40 events, and on until both consumers have had one (which
            # consumer wins each event is up to the processes' scheduling).
            sent = 0
            while sent < 40 or not (c1.payloads and c2.payloads):
                assert sent < 400, "one consumer of the group never got an event"
                await publish(http, (a, b)[sent % 2], "alice", name, sent)
                sent += 1
            await publish(http, a, "bob", name, "bob's")
            await wait_for(lambda: len(service_on_b.payloads) == sent + 1)
            await wait_for(lambda: len(c1.payloads) + len(c2.payloads) >= sent)
            await wait_for(lambda: len(bob_on_b.payloads) == 1)
            await trio.sleep(0.5)  # a duplicate or a stray event would show up now
            nursery.cancel_scope.cancel()
    assert alice_on_a.payloads == list(range(sent))
    assert service_on_b.payloads == [*range(sent), "bob's"]
    assert bob_on_b.payloads == ["bob's"]
    assert sorted(c1.payloads + c2.payloads) == list(range(sent))


async def test_restarting_every_process_keeps_history_and_groups(
    backend_env: dict[str, str],
) -> None:
    name = f"example.r{secrets.token_hex(3)}"
    unicast = {"name": name, "delivery": "unicast", "group": "jobs"}
    async with httpx.AsyncClient(timeout=WAIT) as http:
        async with providers(backend_env, 2) as (a, b):
            first = Reader()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: first.run(http, a, auth("alice"), **unicast))
                await first.ready.wait()
                await trio.sleep(0.3)
                await publish(http, b, "alice", name, "live")
                await wait_for(lambda: first.payloads == ["live"])
                nursery.cancel_scope.cancel()
            # The group has no consumer now: these wait for it in the backend.
            for n in range(5):
                await publish(http, (a, b)[n % 2], "alice", name, n)
        async with providers(backend_env, 2) as (a, b):
            assert await replay(http, b, name) == ["live", *range(5)]
            resumed = Reader()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: resumed.run(http, a, auth("alice"), **unicast))
                await wait_for(lambda: len(resumed.payloads) >= 5)
                nursery.cancel_scope.cancel()
            assert resumed.payloads == list(range(5))


async def test_unreachable_backend_at_start_is_one_line_without_the_password(
    tmp_path: Path,
) -> None:
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    cases = [
        (
            ["--events-backend", "redis"],
            {
                "BUS_EVENTS_REDIS_ADDR": f"redis://:hunter2secret@127.0.0.1:{port}/0",
                "BUS_EVENTS_REDIS_PASSWORD": "hunter2secret",
            },
        ),
        (
            ["--events-backend", "postgres"],
            {"BUS_EVENTS_POSTGRES_DSN": f"postgresql://postgres:hunter2secret@127.0.0.1:{port}/x"},
        ),
    ]
    for args, extra in cases:
        result = await trio.run_process(
            [sys.executable, "-m", "busevents", "serve", "--addr", "127.0.0.1:0", *args],
            env={**base_env(), **extra},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        err = result.stderr.decode()
        lines = [line for line in err.splitlines() if "error" in line]
        assert result.returncode == 1, err
        assert len(lines) == 1, err
        assert f"127.0.0.1:{port}" in lines[0]
        assert "hunter2" not in err


async def _fault_round(
    http: httpx.AsyncClient, url: str, stop: Any, start: Any, *, keeps_history: bool
) -> None:
    name = f"example.f{secrets.token_hex(3)}"
    accepted: list[Any] = list(range(3))
    for n in accepted:
        await publish(http, url, "alice", name, n)
    follower = Reader()
    statuses: set[int] = set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: follower.run(http, url, auth("alice"), name=name))

        async def keep_publishing() -> None:
            # Publishes race the backend's death: whatever got a 202 must survive.
            for n in range(1000, 100_000):
                body = {"name": name, "payload": n}
                response = await http.post(url, json=body, headers=auth("alice"))
                statuses.add(response.status_code)
                if response.status_code == 202:
                    accepted.append(n)
                await trio.sleep(0.01)

        await follower.ready.wait()
        nursery.start_soon(keep_publishing)
        await trio.sleep(0.3)
        await stop()
        await wait_for(lambda: follower.error is not None)
        await wait_for(lambda: 503 in statuses)
        nursery.cancel_scope.cancel()
    assert statuses <= {202, 503}
    assert isinstance(follower.error, httpx.RemoteProtocolError)
    response = await http.post(url, json={"name": name, "payload": "x"}, headers=auth("alice"))
    assert response.status_code == 503
    assert response.json()["error"] == "backend_unavailable"
    assert response.headers["content-type"] == "application/json"
    await start()
    # Service resumes: publishes are accepted again (the first may still meet a dead connection).
    with trio.fail_after(WAIT):
        while True:
            response = await http.post(
                url, json={"name": name, "payload": "after"}, headers=auth("alice")
            )
            if response.status_code == 202:
                break
            assert response.status_code == 503
            await trio.sleep(0.2)
    history = await replay(http, url, name)
    assert history[-1] == "after"
    if keeps_history:
        # Every 202 is there, in order (a request cut off by the test's own
        # cancellation may add one event that the test never saw accepted).
        assert [p for p in history if p in accepted] == accepted
    else:
        assert history == ["after"]
    resumed = Reader()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: resumed.run(http, url, auth("alice"), name=name))
        await resumed.ready.wait()
        await trio.sleep(0.3)
        await publish(http, url, "alice", name, "live")
        await wait_for(lambda: resumed.payloads == ["live"])
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("persistent", [True, False], ids=["aof", "no-persistence"])
async def test_redis_lost_and_back(tmp_path: Path, persistent: bool) -> None:
    async with private_redis(tmp_path, persistent=persistent) as redis:
        env = {**base_env(), "BUS_EVENTS_REDIS_ADDR": redis.addr}
        async with serve_subprocess(env, "--events-backend", "redis") as (url, _proc):
            async with httpx.AsyncClient(timeout=WAIT) as http:
                # With an append-only file nothing acknowledged is lost; without
                # persistence a Redis restart loses the history (docs/backends.md).
                await _fault_round(http, url, redis.stop, redis.start, keeps_history=persistent)


@pytest.mark.timeout(120)
async def test_postgres_lost_and_back() -> None:
    async with private_postgres() as pg:
        env = {**base_env(), "BUS_EVENTS_POSTGRES_DSN": pg.dsn}
        async with serve_subprocess(env, "--events-backend", "postgres") as (url, _proc):
            async with httpx.AsyncClient(timeout=WAIT) as http:
                await _fault_round(http, url, pg.stop, pg.start, keeps_history=True)
