"""One behavioural suite, run against every backend: memory, Redis and PostgreSQL.

Each test runs a real provider on a loopback port; the Redis and PostgreSQL
variants use a fresh key prefix / schema (see conftest) against the real services.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from busevents.provider import (
    INTERNAL_AUDIENCE,
    PostgresOptions,
    ProviderConfig,
    RedisOptions,
    RunningProvider,
    open_provider,
)

SECRET = b"backend-suite-secret-0123456789abcdef"
WAIT = 10.0


@pytest.fixture(params=["memory", "redis", "postgres"])
def config(request: pytest.FixtureRequest) -> ProviderConfig:
    """A provider config for each backend, on its own prefix / schema."""
    backend = request.param
    if backend == "redis":
        addr = request.getfixturevalue("redis_addr")
        prefix = request.getfixturevalue("redis_prefix")
        return ProviderConfig(
            secret=SECRET, backend="redis", redis=RedisOptions(addr=addr, prefix=prefix)
        )
    if backend == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")
        return ProviderConfig(
            secret=SECRET, backend="postgres", postgres=PostgresOptions(dsn=dsn, poll_interval=0.5)
        )
    return ProviderConfig(secret=SECRET)


@pytest.fixture
async def prov(config: ProviderConfig) -> AsyncIterator[RunningProvider]:
    async with open_provider(config) as running:
        yield running


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def publish(
    http: httpx.AsyncClient, prov: RunningProvider, token: str, name: str, payload: Any
) -> dict[str, Any]:
    response = await http.post(
        prov.url, json={"name": name, "payload": payload}, headers=auth(token)
    )
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


async def replay(
    http: httpx.AsyncClient, prov: RunningProvider, token: str, name: str
) -> list[dict[str, Any]]:
    response = await http.get(
        prov.url + "/stream",
        params={"name": name, "replay": "true", "follow": "false"},
        headers=auth(token),
    )
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.content.splitlines() if line]


class Lines:
    """The events of an open stream, read one at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    async def next(self, count: int = 1) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        with trio.fail_after(WAIT):
            while len(found) < count:
                line = await self._lines.__anext__()
                if line:
                    found.append(json.loads(line))
        return found


@asynccontextmanager
async def stream(
    http: httpx.AsyncClient, prov: RunningProvider, token: str, **params: str
) -> AsyncIterator[Lines]:
    async with http.stream(
        "GET", prov.url + "/stream", params=params, headers=auth(token)
    ) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        yield Lines(response)


def id_key(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def name() -> str:
    return f"example.n{secrets.token_hex(4)}"


async def test_publish_gives_increasing_ms_seq_ids(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    topic = name()
    ids = [(await publish(http, prov, token, topic, n))["id"] for n in range(20)]
    keys = [id_key(i) for i in ids]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    stored = await replay(http, prov, token, topic)
    assert [e["id"] for e in stored] == ids
    assert [e["payload"] for e in stored] == list(range(20))
    assert {e["identity_id"] for e in stored} == {"alice"}


async def test_follow_receives_live_events_in_order(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    topic = name()
    async with stream(http, prov, token, name=topic) as live:
        sent = [(await publish(http, prov, token, topic, n))["id"] for n in range(10)]
        got = await live.next(10)
    assert [e["id"] for e in got] == sent


async def test_replay_then_follow_has_no_gap_and_no_duplicate(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    topic = name()
    before = [(await publish(http, prov, token, topic, n))["id"] for n in range(5)]
    sent = list(before)

    async with trio.open_nursery() as nursery:

        async def keep_publishing() -> None:
            for n in range(5, 25):
                sent.append((await publish(http, prov, token, topic, n))["id"])

        async with stream(http, prov, token, name=topic, replay="true") as live:
            nursery.start_soon(keep_publishing)
            got = await live.next(25)
    assert [e["id"] for e in got] == sent
    assert [e["payload"] for e in got] == list(range(25))


async def test_broadcast_listeners_all_get_each_event(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    topic = name()
    async with (
        stream(http, prov, token, name=topic) as one,
        stream(http, prov, token, name=topic, consumer="two") as two,
    ):
        sent = [(await publish(http, prov, token, topic, n))["id"] for n in range(6)]
        assert [e["id"] for e in await one.next(6)] == sent
        assert [e["id"] for e in await two.next(6)] == sent


async def test_unicast_group_splits_events_and_groups_each_get_all(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    topic = name()
    got: dict[str, list[int]] = {"c1": [], "c2": [], "other": []}
    unicast = {"name": topic, "delivery": "unicast"}
    async with (
        stream(http, prov, token, group="g", consumer="c1", **unicast) as c1,
        stream(http, prov, token, group="g", consumer="c2", **unicast) as c2,
        stream(http, prov, token, group="other", **unicast) as other,
    ):
        await trio.sleep(0.3)  # both consumers are reading before the events arrive
        for n in range(30):
            await publish(http, prov, token, topic, n)
        assert [e["payload"] for e in await other.next(30)] == list(range(30))

        all_in = trio.Event()

        async def pump(key: str, lines: Lines) -> None:
            while True:
                (event,) = await lines.next(1)
                got[key].append(event["payload"])
                if len(got["c1"]) + len(got["c2"]) >= 30:
                    all_in.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, "c1", c1)
            nursery.start_soon(pump, "c2", c2)
            with trio.fail_after(WAIT):
                await all_in.wait()
            await trio.sleep(0.3)  # a duplicate would show up now
            nursery.cancel_scope.cancel()
    assert sorted(got["c1"] + got["c2"]) == list(range(30))


async def test_identities_see_only_their_own_events(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    alice, bob = prov.token("alice"), prov.token("bob")
    service = prov.token("svc", audience=INTERNAL_AUDIENCE)
    topic = name()
    async with (
        stream(http, prov, bob, name=topic) as bobs,
        stream(http, prov, service, name=topic) as all_of_them,
    ):
        await publish(http, prov, alice, topic, "a")
        await publish(http, prov, bob, topic, "b")
        assert [e["payload"] for e in await bobs.next(1)] == ["b"]
        seen = await all_of_them.next(2)
    assert [(e["identity_id"], e["payload"]) for e in seen] == [("alice", "a"), ("bob", "b")]
    assert [e["payload"] for e in await replay(http, prov, alice, topic)] == ["a"]
    assert [e["payload"] for e in await replay(http, prov, service, topic)] == ["a", "b"]


async def test_unicast_groups_are_per_identity(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    alice, bob = prov.token("alice"), prov.token("bob")
    topic = name()
    params = {"name": topic, "delivery": "unicast", "group": "workers"}
    async with stream(http, prov, alice, **params) as alices, stream(http, prov, bob, **params):
        await trio.sleep(0.3)
        await publish(http, prov, bob, topic, "b")
        await publish(http, prov, alice, topic, "a")
        assert [e["payload"] for e in await alices.next(1)] == ["a"]


async def test_unicast_with_replay_is_refused(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    response = await http.get(
        prov.url + "/stream",
        params={"name": name(), "delivery": "unicast", "replay": "true"},
        headers=auth(prov.token("alice")),
    )
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    assert "unicast" in response.json()["message"]


async def test_ping_answers(prov: RunningProvider) -> None:
    await prov.backend.ping()


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    plan=st.lists(
        st.tuples(st.sampled_from(["alice", "bob", "carol"]), st.integers(0, 2)),
        min_size=1,
        max_size=25,
    )
)
async def test_replay_is_exactly_what_each_identity_published(
    config: ProviderConfig, plan: list[tuple[str, int]]
) -> None:
    # Hypothesis runs every example inside one test call: the provider is per example.
    async with open_provider(config) as prov, httpx.AsyncClient(timeout=WAIT) as http:
        topics = [name() for _ in range(3)]
        tokens = {who: prov.token(who) for who in ("alice", "bob", "carol")}
        sent: list[tuple[str, int, str]] = []
        for n, (who, topic) in enumerate(plan):
            body = await publish(http, prov, tokens[who], topics[topic], n)
            sent.append((who, topic, body["id"]))
        for who, token in tokens.items():
            for index, topic_name in enumerate(topics):
                expected = [i for w, t, i in sent if w == who and t == index]
                got = await replay(http, prov, token, topic_name)
                assert [e["id"] for e in got] == expected
