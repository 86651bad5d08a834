"""Idempotency keys on publish: a retry after an ambiguous failure is stored once.

Every provider here is a real `bus-events serve` process on memory, Redis or
PostgreSQL; the ambiguous failures are real too: a private Redis paused longer
than the provider's timeout (the first attempt gets 503 but is stored after
Redis resumes), a reply lost between provider and client (the event is stored),
a provider killed while its PostgreSQL transaction waits (nothing is stored).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from busevents._bench import Bench, BenchPlan, check_plan
from busevents.provider import open_provider

from .helpers import serve_subprocess
from .services import free_port, private_postgres, private_redis
from .test_provider_multi import auth, base_env, env_for, replay
from .test_provider_ops import samples

KEY = "Idempotency-Key"


@pytest.fixture(params=["memory", "redis", "postgres"])
def env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Environment of a `serve` process on a fresh prefix / schema of each backend."""
    return env_for(request, request.param)


@asynccontextmanager
async def serving(env: dict[str, str], *args: str) -> AsyncIterator[str]:
    backend = env["BUS_EVENTS_TEST_BACKEND"]
    async with serve_subprocess(env, "--events-backend", backend, *args) as (url, _proc):
        yield url


async def post(
    http: httpx.AsyncClient, url: str, subject: str, payload: object, key: str | None, **extra: str
) -> httpx.Response:
    headers = auth(subject)
    if key is not None:
        headers[KEY] = key
    return await http.post(
        url, json={"name": "example.idem", "payload": payload, **extra}, headers=headers
    )


async def test_a_repeated_key_answers_the_original_and_stores_nothing(env: dict[str, str]) -> None:
    async with serving(env) as url, httpx.AsyncClient(timeout=30) as http:
        first = await post(http, url, "alice", 1, "key-1", correlationId="c-1")
        assert first.status_code == 202, first.text
        assert "idempotent-replayed" not in first.headers
        # A retry (even with another body) within the window: the original acceptance.
        again = await post(http, url, "alice", 2, "key-1")
        assert again.status_code == 202, again.text
        assert again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content
        assert again.json()["correlationId"] == "c-1"
        # Keys are per identity: bob's "key-1" is his own.
        bob = await post(http, url, "bob", 3, "key-1")
        assert bob.status_code == 202 and "idempotent-replayed" not in bob.headers
        assert bob.json()["id"] != first.json()["id"]
        # Without a key, every publish is stored.
        for payload in (4, 5):
            assert (await post(http, url, "alice", payload, None)).status_code == 202
        assert await replay(http, url, "example.idem") == [1, 3, 4, 5]


async def test_a_key_is_forgotten_after_the_window(env: dict[str, str]) -> None:
    async with (
        serving(env, "--idempotency-window", "1s") as url,
        httpx.AsyncClient(timeout=30) as http,
    ):
        first = await post(http, url, "alice", 1, "short")
        assert first.status_code == 202
        await trio.sleep(1.2)  # the window passes: the same key is new again
        later = await post(http, url, "alice", 2, "short")
        assert later.status_code == 202 and "idempotent-replayed" not in later.headers
        assert later.json()["id"] != first.json()["id"]
        assert await replay(http, url, "example.idem") == [1, 2]


async def test_an_invalid_key_is_refused_and_nothing_is_stored() -> None:
    env = base_env()
    env["BUS_EVENTS_TEST_BACKEND"] = "memory"
    async with serving(env) as url, httpx.AsyncClient(timeout=30) as http:
        bad: list[list[tuple[str, bytes]]] = [
            [(KEY, b"")],
            [(KEY, b"k" * 256)],
            [(KEY, "caf\u00e9".encode("latin-1"))],
            [(KEY, b"a\tb")],
            [(KEY, b"one"), (KEY, b"two")],
        ]
        for headers in bad:
            response = await http.post(
                url,
                json={"name": "example.idem", "payload": 0},
                headers=[*auth("alice").items(), *headers],
            )
            assert response.status_code == 400, (headers, response.text)
            body = response.json()
            assert body["error"] == "invalid_idempotency_key", body
            assert "Idempotency-Key" in body["message"]
        longest = await post(http, url, "alice", 1, "~" * 255)
        assert longest.status_code == 202
        assert await replay(http, url, "example.idem") == [1]


async def redis_cli(port: int, *args: str) -> str:
    done = await trio.run_process(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_stdout=True
    )
    return bytes(done.stdout).decode().strip()


async def test_a_publish_retried_after_redis_was_paused_is_stored_once(tmp_path: Path) -> None:
    async with private_redis(tmp_path) as redis:
        env = base_env()
        env["BUS_EVENTS_TEST_BACKEND"] = "redis"
        env["BUS_EVENTS_REDIS_ADDR"] = redis.addr
        stream = "bus-events:s:example.idem"
        async with serving(env) as url, httpx.AsyncClient(timeout=60) as http:
            assert (await post(http, url, "alice", 0, "warm-up")).status_code == 202
            # Longer than the provider's Redis timeout (10 s): the attempt is answered 503,
            # yet Redis runs it once the pause ends.
            await redis_cli(redis.port, "CLIENT", "PAUSE", "12000", "ALL")
            first = await post(http, url, "alice", 1, "paused")
            assert first.status_code == 503, first.text
            assert first.json()["error"] == "backend_unavailable"
            with trio.fail_after(30):
                # Waiting for Redis to run the paused script (a positive condition).
                while await redis_cli(redis.port, "XLEN", stream) != "2":  # noqa: ASYNC110
                    await trio.sleep(0.1)
            retry = await post(http, url, "alice", 1, "paused")
            assert retry.status_code == 202, retry.text
            assert retry.headers["idempotent-replayed"] == "true"
            assert await redis_cli(redis.port, "XLEN", stream) == "2"
            assert await replay(http, url, "example.idem") == [0, 1]
            last = await redis_cli(redis.port, "XREVRANGE", stream, "+", "-", "COUNT", "1")
            assert retry.json()["id"] == last.splitlines()[0]


@asynccontextmanager
async def reply_dropping_proxy(target_port: int, drops: int) -> AsyncIterator[int]:
    """A TCP proxy that loses the replies of the first ``drops`` POSTs (closing instead).

    It passes everything else on both ways.  One request per connection is
    enough here: a client whose reply was lost opens a new connection.
    """
    port = free_port()
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    left = drops

    async def pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for data in source:
                await sink.send_all(data)

    async def handle(client: trio.SocketStream) -> None:
        nonlocal left
        async with client, await trio.open_tcp_stream("127.0.0.1", target_port) as upstream:
            first = await client.receive_some()
            await upstream.send_all(first)
            drop = left > 0 and first.startswith(b"POST ")
            left -= drop
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipe, client, upstream)
                if drop:
                    await upstream.receive_some()  # the reply has started: lose it
                    nursery.cancel_scope.cancel()
                else:
                    await pipe(upstream, client)
                    nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        try:
            yield port
        finally:
            nursery.cancel_scope.cancel()


async def test_a_publish_whose_reply_was_lost_is_stored_once_when_retried(
    env: dict[str, str],
) -> None:
    async with serving(env) as url, httpx.AsyncClient(timeout=30) as http:
        target = httpx.URL(url)
        async with reply_dropping_proxy(target.port or 80, drops=1) as port:
            with pytest.raises(httpx.TransportError):
                await post(http, str(target.copy_with(port=port)), "alice", 1, "lost")
        # The client cannot know; the event was stored.  Its retry stores nothing more.
        assert await replay(http, url, "example.idem") == [1]
        retry = await post(http, url, "alice", 1, "lost")
        assert retry.status_code == 202 and retry.headers["idempotent-replayed"] == "true"
        assert await replay(http, url, "example.idem") == [1]


async def test_the_bench_retries_an_event_whose_reply_was_lost_and_it_is_stored_once() -> None:
    async with open_provider() as provider:
        target = httpx.URL(provider.url)
        async with reply_dropping_proxy(target.port or 80, drops=6) as port:
            the_plan = check_plan(
                BenchPlan(name="bench.idem", publishers=2, listeners=2, events=200, warmup=0.0)
            )
            url = str(target.copy_with(port=port))
            report = await Bench(the_plan, url=url, token=provider.token(), timeout=10).run()
        published = provider.backend.stats.published
    pub, dlv = report.publish, report.delivery
    assert sum(pub.errors.values()) == 6, pub.errors  # six replies lost, each retried
    assert (pub.accepted, pub.in_doubt) == (200, 0)
    assert published == 200  # the provider stored each event once
    assert (dlv.received, dlv.lost, dlv.duplicated) == (400, 0, 0)
    assert report.verdict.ok


async def test_a_provider_killed_mid_commit_then_a_retry_stores_the_event_once() -> None:
    import psycopg

    async with private_postgres() as pg:
        env = base_env()
        env["BUS_EVENTS_TEST_BACKEND"] = "postgres"
        env["BUS_EVENTS_POSTGRES_DSN"] = pg.dsn
        outcome: list[BaseException] = []
        async with httpx.AsyncClient(timeout=30) as http:
            async with serve_subprocess(env, "--events-backend", "postgres") as (url, victim):
                assert (await post(http, url, "alice", 0, "warm-up")).status_code == 202
                with psycopg.connect(pg.dsn) as holder:
                    # Holding the table: the publish below stops inside its transaction.
                    holder.execute("LOCK TABLE bus_events IN ACCESS EXCLUSIVE MODE")

                    async def attempt() -> None:
                        try:
                            await post(http, url, "alice", 1, "killed")
                        except httpx.TransportError as exc:
                            outcome.append(exc)

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(attempt)
                        with trio.fail_after(20):
                            # Waiting for the provider's INSERT to queue behind the lock.
                            while not await _waiting_insert(pg.dsn):  # noqa: ASYNC110
                                await trio.sleep(0.05)
                        victim.kill()
                    holder.rollback()
            assert len(outcome) == 1  # the client cannot know what happened
            async with serve_subprocess(env, "--events-backend", "postgres") as (url, _):
                retry = await post(http, url, "alice", 1, "killed")
                assert retry.status_code == 202 and "idempotent-replayed" not in retry.headers
                again = await post(http, url, "alice", 1, "killed")
                assert again.headers["idempotent-replayed"] == "true"
                assert again.content == retry.content
                assert await replay(http, url, "example.idem") == [0, 1]


async def _waiting_insert(dsn: str) -> bool:
    import psycopg

    def look() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO bus_events%'"
            ).fetchone()
        return bool(row and row[0])

    return await trio.to_thread.run_sync(look)


async def test_the_memory_backend_remembers_at_most_idempotency_keys() -> None:
    env = base_env()
    env["BUS_EVENTS_TEST_BACKEND"] = "memory"
    async with (
        serving(env, "--idempotency-keys", "2") as url,
        httpx.AsyncClient(timeout=30) as http,
    ):
        for payload, key in enumerate("abc"):
            assert (await post(http, url, "alice", payload, key)).status_code == 202
        # Two keys kept: "a" (the oldest) is forgotten, "c" is not.
        assert (await post(http, url, "alice", 9, "c")).headers["idempotent-replayed"] == "true"
        again = await post(http, url, "alice", 3, "a")
        assert again.status_code == 202 and "idempotent-replayed" not in again.headers
        assert await replay(http, url, "example.idem") == [0, 1, 2, 3]


async def test_a_replay_is_neither_a_backend_error_nor_a_new_event_in_the_metrics() -> None:
    async with open_provider(metrics=True) as provider, httpx.AsyncClient(timeout=30) as http:
        assert provider.metrics_url is not None
        headers = {"Authorization": f"Bearer {provider.token()}", KEY: "metered"}
        for _ in range(3):
            body = {"name": "example.idem", "payload": 1}
            assert (await http.post(provider.url, json=body, headers=headers)).status_code == 202
        got = samples((await http.get(provider.metrics_url)).text)
    errors = [
        v for (name, _), v in got.items() if name == "busevents_provider_backend_errors_total"
    ]
    assert sum(errors) == 0
    published = ("busevents_provider_publishes_total", (("prefix", "example.idem"),))
    assert got[published] == 1


async def test_the_sdk_retrying_a_publish_whose_reply_was_lost_stores_it_once(
    env: dict[str, str],
) -> None:
    """``publish(retries=N)`` without a key of the caller's: the SDK makes one and sends
    it with every attempt, so the retry after the lost reply is answered with the first
    attempt's acceptance and the provider holds the event once."""
    from busevents import EventsClient, PublishRequest
    from busevents.provider import mint_token

    async with serving(env) as url, httpx.AsyncClient(timeout=30) as http:
        target = httpx.URL(url)
        token = mint_token(env["BUS_API_JWT_SECRET"].encode(), subject="alice")
        async with reply_dropping_proxy(target.port or 80, drops=1) as port:
            async with EventsClient(str(target.copy_with(port=port)), token) as client:
                request = PublishRequest("example.idem", {"n": 7})
                accepted, _ = await client.publish(request, retries=3)
        stored = await replay(http, url, "example.idem")
        assert len(stored) == 1, stored
        assert accepted.name == "example.idem"
