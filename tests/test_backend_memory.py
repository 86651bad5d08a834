"""The memory backend's bounds: history and buffers in bytes, unicast groups in number and time."""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from busevents import Delivery
from busevents.provider import ProviderConfig, RunningProvider, open_provider
from busevents.provider.backends._base import BackendLimit, Draft, Selector
from busevents.provider.backends._memory import MemoryBackend

SECRET = b"memory-bounds-secret-0123456789abcdef"
WAIT = 5.0


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def draft(name: str, size: int, owner: str = "alice") -> Draft:
    return Draft(name, msgspec.Raw(b'"' + b"x" * size + b'"'), owner)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=40),
    count_limit=st.integers(1, 50),
    byte_limit=st.integers(200, 40_000),
)
async def test_history_keeps_the_newest_events_within_both_bounds(
    sizes: list[int], count_limit: int, byte_limit: int
) -> None:
    backend = MemoryBackend(history_limit=count_limit, history_bytes=byte_limit)
    lines = [(await backend.publish(draft("example.h", size))).line for size in sizes]
    kept = await backend.snapshot(Selector("example.h", None))
    # The expected history: the longest run of newest events within both bounds,
    # except that an event larger than the whole byte bound is never kept.
    expected: list[bytes] = []
    for line in lines:
        if len(line) > byte_limit:
            continue
        expected.append(line)
        while len(expected) > count_limit or sum(map(len, expected)) > byte_limit:
            expected.pop(0)
    assert [event.line for event in kept] == expected
    assert sum(len(event.line) for event in kept) <= byte_limit


async def test_replay_over_http_is_bounded_in_bytes() -> None:
    config = ProviderConfig(secret=SECRET, history_bytes=64 * 1024)
    async with open_provider(config) as prov, httpx.AsyncClient() as http:
        token = prov.token("alice")
        for n in range(40):
            body = {"name": "example.big", "payload": {"n": n, "pad": "x" * 8000}}
            response = await http.post(prov.url, json=body, headers=auth(token))
            assert response.status_code == 202
        response = await http.get(
            prov.url + "/stream",
            params={"name": "example.big", "replay": "true", "follow": "false"},
            headers=auth(token),
        )
    kept = [json.loads(line)["payload"]["n"] for line in response.content.splitlines()]
    assert len(response.content) <= 64 * 1024
    assert kept == list(range(40 - len(kept), 40)) and 0 < len(kept) < 40


@settings(max_examples=30, deadline=None)
@given(size=st.integers(100, 5000), byte_limit=st.integers(1000, 50_000))
async def test_a_listener_over_its_byte_bound_is_disconnected(size: int, byte_limit: int) -> None:
    backend = MemoryBackend(listener_queue=10_000, listener_queue_bytes=byte_limit)
    async with backend.subscribe(Selector("example.s", None)) as subscription:
        published = 0
        while backend.stats.slow_disconnects == 0:
            await backend.publish(draft("example.s", size))
            published += 1
        got: list[Any] = []
        while batch := await subscription.receive_batch(1000):
            got.extend(batch)
    # Everything buffered fits the bound; the event that did not fit ended the stream.
    assert sum(len(e.line) for e in got) <= byte_limit
    assert len(got) == published - 1


@settings(max_examples=30, deadline=None)
@given(size=st.integers(100, 5000), byte_limit=st.integers(1000, 50_000))
async def test_a_unicast_group_over_its_byte_bound_drops_new_events(
    size: int, byte_limit: int
) -> None:
    backend = MemoryBackend(listener_queue=10_000, listener_queue_bytes=byte_limit)
    selector = Selector("example.u", None, Delivery.UNICAST, "g")
    async with backend.subscribe(selector):
        pass  # the group now exists, with no consumer
    sent = [await backend.publish(draft("example.u", size)) for _ in range(byte_limit // size + 3)]
    got: list[Any] = []
    async with backend.subscribe(selector) as subscription:
        with trio.move_on_after(0.2):  # nothing fitted when one event exceeds the bound
            got = await subscription.receive_batch(10_000)
    assert sum(len(e.line) for e in got) <= byte_limit
    assert [e.id for e in got] == [e.id for e in sent[: len(got)]]
    assert backend.stats.dropped == len(sent) - len(got) > 0


@settings(max_examples=20, deadline=None)
@given(per_identity=st.integers(1, 6), total=st.integers(1, 12))
async def test_unicast_groups_are_bounded_per_identity_and_in_total(
    per_identity: int, total: int
) -> None:
    backend = MemoryBackend(max_groups=total, max_groups_per_identity=per_identity)
    made: dict[str, int] = {}
    refused = 0
    for owner in ("alice", "bob", "carol"):
        for n in range(per_identity + 1):
            try:
                async with backend.subscribe(
                    Selector("example.g", owner, Delivery.UNICAST, f"g{n}")
                ):
                    made[owner] = made.get(owner, 0) + 1
            except BackendLimit:
                refused += 1
    assert backend.group_count() == sum(made.values()) == min(total, 3 * per_identity)
    assert all(count <= per_identity for count in made.values())
    # An existing group is always joinable, even at the limit.
    async with backend.subscribe(Selector("example.g", "alice", Delivery.UNICAST, "g0")):
        pass
    assert refused == 3 * (per_identity + 1) - backend.group_count()


async def test_idle_groups_are_freed() -> None:
    backend = MemoryBackend(max_groups=2, group_idle=0.2)
    for group in ("a", "b"):
        async with backend.subscribe(Selector("example.i", "alice", Delivery.UNICAST, group)):
            pass
    with pytest.raises(BackendLimit):
        async with backend.subscribe(Selector("example.i", "alice", Delivery.UNICAST, "c")):
            pass
    await trio.sleep(0.3)
    await backend.publish(draft("example.i", 10))
    assert backend.group_count() == 0 and backend.stats.groups_expired == 2
    async with backend.subscribe(Selector("example.i", "alice", Delivery.UNICAST, "c")):
        assert backend.group_count() == 1


async def test_a_group_with_a_consumer_is_never_freed() -> None:
    backend = MemoryBackend(group_idle=0.1)
    selector = Selector("example.k", "alice", Delivery.UNICAST, "busy")
    async with backend.subscribe(selector) as subscription:
        await trio.sleep(0.3)
        event = await backend.publish(draft("example.k", 10))
        assert backend.group_count() == 1
        assert [e.id for e in await subscription.receive_batch(10)] == [event.id]


async def test_too_many_groups_is_a_429_over_http(provider: RunningProvider) -> None:
    config = ProviderConfig(secret=SECRET, max_groups_per_identity=2)
    async with open_provider(config) as prov, httpx.AsyncClient(timeout=WAIT) as http:
        token = prov.token("alice")
        for group in ("one", "two"):
            params = {"name": "example.q", "delivery": "unicast", "group": group}
            async with http.stream(
                "GET", prov.url + "/stream", params=params, headers=auth(token)
            ) as response:
                assert response.status_code == 200
        params = {"name": "example.q", "delivery": "unicast", "group": "three"}
        response = await http.get(prov.url + "/stream", params=params, headers=auth(token))
        assert response.status_code == 429
        assert response.json()["error"] == "too_many_groups"
        # Another identity still has its own allowance.
        other = prov.token("bob")
        async with http.stream(
            "GET", prov.url + "/stream", params=params, headers=auth(other)
        ) as response:
            assert response.status_code == 200
