"""Reference provider: streams — replay/follow, broadcast, unicast, identities, flow control."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest
import trio

from busevents.provider import (
    INTERNAL_AUDIENCE,
    ProviderConfig,
    RunningProvider,
    create_app,
    mint_token,
    open_provider,
)
from busevents.provider.backends._base import Draft
from busevents.provider.backends._memory import MemoryBackend

SECRET = b"stream-tests-secret-0123456789abcdef"
#: Upper bound for anything a test waits for; the provider answers in milliseconds.
WAIT = 5.0


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Stream:
    """An open NDJSON response read as raw lines (``b""`` for a keep-alive line)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._chunks = response.aiter_raw()
        self._buffer = b""
        self.ended = False

    async def _more(self) -> None:
        try:
            self._buffer += await self._chunks.__anext__()
        except StopAsyncIteration:
            self.ended = True

    async def line(self) -> bytes | None:
        """The next line without its newline; ``None`` when the stream ended."""
        with trio.fail_after(WAIT):
            while b"\n" not in self._buffer:
                if self.ended:
                    return None
                await self._more()
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    async def events(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` envelopes, skipping keep-alive lines."""
        found: list[dict[str, Any]] = []
        with trio.fail_after(WAIT):
            while len(found) < count:
                line = await self.line()
                assert line is not None, f"stream ended after {len(found)} of {count} events"
                if line:
                    found.append(msgspec.json.decode(line))
        return found

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]


@asynccontextmanager
async def open_stream(
    http: httpx.AsyncClient, provider: RunningProvider, token: str, **params: str
) -> AsyncIterator[Stream]:
    async with http.stream(
        "GET", provider.url + "/stream", params=params, headers=auth(token)
    ) as response:
        assert response.status_code == 200, response.read()
        stream = Stream(response)
        try:
            yield stream
        finally:
            await stream.aclose()


async def publish(
    http: httpx.AsyncClient,
    provider: RunningProvider,
    token: str,
    name: str,
    payload: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    response = await http.post(
        provider.url, json={"name": name, "payload": payload, **extra}, headers=auth(token)
    )
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait for a condition the provider signals no event for (bounded by WAIT)."""
    with trio.fail_after(WAIT):
        while True:
            if predicate():
                return
            await trio.sleep(0.005)


def memory(provider: RunningProvider) -> MemoryBackend:
    backend = provider.backend
    assert isinstance(backend, MemoryBackend)
    return backend


@pytest.fixture
async def prov() -> AsyncIterator[RunningProvider]:
    async with open_provider(ProviderConfig(secret=SECRET)) as running:
        yield running


# -- replay / follow -----------------------------------------------------------


async def test_replay_without_follow_returns_history_in_order(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    sent = [
        await publish(http, prov, token, "example.ping", {"n": n}, correlationId=f"c{n}")
        for n in range(3)
    ]
    await publish(http, prov, token, "example.other", 99)
    response = await http.get(
        prov.url + "/stream",
        params={"name": "example.ping", "replay": "true", "follow": "false"},
        headers=auth(token),
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.headers["cache-control"] == "no-store"
    lines = response.content.split(b"\n")
    assert lines[-1] == b""
    events = [msgspec.json.decode(line) for line in lines[:-1]]
    assert [e["id"] for e in events] == [a["id"] for a in sent]
    assert [e["correlationId"] for e in events] == ["c0", "c1", "c2"]
    assert [e["payload"] for e in events] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert {e["identity_id"] for e in events} == {"alice"}


async def test_no_replay_no_follow_is_an_empty_200(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    await publish(http, prov, token, "example.ping")
    response = await http.get(
        prov.url + "/stream", params={"name": "example.ping", "follow": "0"}, headers=auth(token)
    )
    assert response.status_code == 200
    assert response.content == b""


async def test_follow_receives_a_live_event_with_the_same_bytes_as_replay(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    async with open_stream(http, prov, token, name="example.ping") as stream:
        accepted = await publish(
            http, prov, token, "example.ping", {"ok": True}, correlationId="r1"
        )
        live = await stream.line()
    assert live is not None
    event = msgspec.json.decode(live)
    assert event["id"] == accepted["id"] and event["correlationId"] == "r1"
    replay = await http.get(
        prov.url + "/stream",
        params={"name": "example.ping", "replay": "1", "follow": "false"},
        headers=auth(token),
    )
    assert replay.content == live + b"\n"


async def test_replay_then_follow_has_no_gap_and_no_duplicate(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    published: list[str] = []
    stop, stopped = trio.Event(), trio.Event()

    async def publisher() -> None:
        async with httpx.AsyncClient() as own:
            n = 0
            while not stop.is_set():
                published.append((await publish(own, prov, token, "example.seq", n))["id"])
                n += 1
        stopped.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher)
        await eventually(lambda: len(published) >= 5)
        # Publishing goes on while the stream subscribes and takes its snapshot.
        async with open_stream(http, prov, token, name="example.seq", replay="true") as stream:
            await eventually(lambda: len(published) >= 15)
            stop.set()
            await stopped.wait()
            events = await stream.events(len(published))
            await publish(http, prov, token, "example.seq", "last")
            (last,) = await stream.events(1)
    assert [e["id"] for e in events] == published
    assert last["payload"] == "last"  # nothing extra was queued before it


async def test_event_published_between_subscribe_and_snapshot_comes_once() -> None:
    # Drive the ASGI app directly to publish at the one awkward moment: after the
    # stream subscribed (it is sending its headers) and before it took the snapshot.
    app = create_app(ProviderConfig(secret=SECRET))
    token = mint_token(SECRET, subject="alice")
    await app.backend.publish(Draft("example.race", msgspec.Raw(b"1"), "alice"))
    body = bytearray()
    disconnect = trio.Event()
    messages: list[dict[str, Any]] = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200
            await app.backend.publish(Draft("example.race", msgspec.Raw(b"2"), "alice"))
        else:
            body.extend(message.get("body", b""))
            if body.count(b"\n") >= 2:
                await trio.sleep(0.05)  # a duplicate would arrive now
                disconnect.set()

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/api/v1/events/stream",
        "query_string": b"name=example.race&replay=true",
        "headers": [(b"authorization", b"Bearer " + token.encode())],
    }
    with trio.fail_after(WAIT):
        await app(scope, receive, send)
    payloads = [msgspec.json.decode(line)["payload"] for line in bytes(body).splitlines()]
    assert payloads == [1, 2]


# -- broadcast / unicast -------------------------------------------------------


async def test_broadcast_reaches_every_listener_with_identical_bytes(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    async with (
        open_stream(http, prov, token, name="example.fan") as one,
        open_stream(http, prov, token, name="example.fan", consumer="other") as two,
    ):
        ids = [(await publish(http, prov, token, "example.fan", n))["id"] for n in range(5)]
        first = [await one.line() for _ in ids]
        second = [await two.line() for _ in ids]
    assert first == second
    assert [msgspec.json.decode(line or b"null")["id"] for line in first] == ids


async def _drain_until(streams: dict[str, Stream], total: int) -> dict[str, list[int]]:
    """Read from every stream concurrently until ``total`` events arrived overall."""
    got: dict[str, list[int]] = {key: [] for key in streams}
    done = trio.Event()

    async def pump(key: str, stream: Stream) -> None:
        while True:
            (event,) = await stream.events(1)
            got[key].append(event["payload"])
            if sum(len(v) for v in got.values()) >= total:
                done.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for key, stream in streams.items():
                nursery.start_soon(pump, key, stream)
            await done.wait()
            await trio.sleep(0.1)  # a duplicate would show up now
            nursery.cancel_scope.cancel()
    return got


async def test_unicast_consumers_of_one_group_split_the_events(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    params = {"name": "example.job", "delivery": "unicast", "group": "workers"}
    async with (
        open_stream(http, prov, token, consumer="c1", **params) as c1,
        open_stream(http, prov, token, consumer="c2", **params) as c2,
    ):
        for n in range(20):
            await publish(http, prov, token, "example.job", n)
        got = await _drain_until({"c1": c1, "c2": c2}, 20)
    assert sorted(got["c1"] + got["c2"]) == list(range(20))
    assert got["c1"] and got["c2"], got


async def test_each_unicast_group_gets_every_event(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    async with (
        open_stream(http, prov, token, name="example.job", delivery="unicast", group="g1") as g1,
        open_stream(http, prov, token, name="example.job", delivery="unicast", group="g2") as g2,
    ):
        for n in range(6):
            await publish(http, prov, token, "example.job", n)
        one = [e["payload"] for e in await g1.events(6)]
        two = [e["payload"] for e in await g2.events(6)]
    assert one == two == list(range(6))


async def test_unicast_group_buffers_while_no_consumer_is_connected(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    params = {"name": "example.job", "delivery": "unicast", "group": "w"}
    async with open_stream(http, prov, token, **params) as first:
        await publish(http, prov, token, "example.job", 1)
        assert [e["payload"] for e in await first.events(1)] == [1]
    await eventually(lambda: memory(prov).subscriber_count("example.job") == 0)
    await publish(http, prov, token, "example.job", 2)
    await publish(http, prov, token, "example.job", 3)
    async with open_stream(http, prov, token, **params) as again:
        assert [e["payload"] for e in await again.events(2)] == [2, 3]


# -- identities ----------------------------------------------------------------


async def test_end_users_only_see_their_own_events(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    alice, bob = prov.token("alice"), prov.token("bob")
    service = prov.token("svc", audience=INTERNAL_AUDIENCE)
    async with (
        open_stream(http, prov, alice, name="example.mix") as a_b,
        open_stream(http, prov, alice, name="example.mix", delivery="unicast") as a_u,
        open_stream(http, prov, bob, name="example.mix", delivery="unicast") as b_u,
        open_stream(http, prov, service, name="example.mix") as everyone,
    ):
        await publish(http, prov, bob, "example.mix", "bob-1")
        await publish(http, prov, alice, "example.mix", "alice-1")
        await publish(http, prov, bob, "example.mix", "bob-2")
        await publish(http, prov, alice, "example.mix", "alice-2")
        assert [e["payload"] for e in await a_b.events(2)] == ["alice-1", "alice-2"]
        assert [e["payload"] for e in await a_u.events(2)] == ["alice-1", "alice-2"]
        assert [e["payload"] for e in await b_u.events(2)] == ["bob-1", "bob-2"]
        seen = await everyone.events(4)
    assert [(e["identity_id"], e["payload"]) for e in seen] == [
        ("bob", "bob-1"),
        ("alice", "alice-1"),
        ("bob", "bob-2"),
        ("alice", "alice-2"),
    ]
    replay = {"name": "example.mix", "replay": "true", "follow": "false"}
    got_bob = await http.get(prov.url + "/stream", params=replay, headers=auth(bob))
    assert b"alice" not in got_bob.content
    assert len(got_bob.content.splitlines()) == 2
    got_all = await http.get(prov.url + "/stream", params=replay, headers=auth(service))
    assert len(got_all.content.splitlines()) == 4


async def test_services_publish_on_behalf_of_an_identity_end_users_cannot(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    alice, bob = prov.token("alice"), prov.token("bob")
    service = prov.token("svc", audience=INTERNAL_AUDIENCE)
    async with (
        open_stream(http, prov, alice, name="example.reply") as a,
        open_stream(http, prov, bob, name="example.reply") as b,
    ):
        await publish(http, prov, service, "example.reply", "for-alice", identity_id="alice")
        await publish(http, prov, bob, "example.reply", "spoof", identity_id="alice")
        await publish(http, prov, service, "example.reply", "own")
        (for_alice,) = await a.events(1)
        (spoof,) = await b.events(1)
    assert (for_alice["identity_id"], for_alice["payload"]) == ("alice", "for-alice")
    assert (spoof["identity_id"], spoof["payload"]) == ("bob", "spoof")
    replay = {"name": "example.reply", "replay": "true", "follow": "false"}
    own = await http.get(prov.url + "/stream", params=replay, headers=auth(service))
    owners = [msgspec.json.decode(line)["identity_id"] for line in own.content.splitlines()]
    assert owners == ["alice", "bob", "svc"]


# -- flow control --------------------------------------------------------------


async def test_disconnected_listener_is_dropped_promptly(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    async with open_stream(http, prov, token, name="example.bye"):
        assert memory(prov).subscriber_count("example.bye") == 1
    await eventually(lambda: memory(prov).subscriber_count("example.bye") == 0)


async def test_keepalive_writes_blank_lines_while_silent() -> None:
    config = ProviderConfig(secret=SECRET, keepalive=0.05)
    async with open_provider(config) as provider, httpx.AsyncClient() as http:
        token = provider.token("alice")
        async with open_stream(http, provider, token, name="example.quiet") as stream:
            assert await stream.line() == b""
            assert await stream.line() == b""
            await publish(http, provider, token, "example.quiet", "hi")
            (event,) = await stream.events(1)
    assert event["payload"] == "hi"


async def test_no_keepalive_lines_when_disabled(http: httpx.AsyncClient) -> None:
    config = ProviderConfig(secret=SECRET, keepalive=None)
    async with open_provider(config) as provider:
        token = provider.token("alice")
        async with open_stream(http, provider, token, name="example.quiet") as stream:
            await trio.sleep(0.3)
            await publish(http, provider, token, "example.quiet", "hi")
            assert msgspec.json.decode(await stream.line() or b"null")["payload"] == "hi"


async def test_slow_listener_is_disconnected_without_blocking_anyone() -> None:
    config = ProviderConfig(secret=SECRET, listener_queue=4)
    async with open_provider(config) as provider, httpx.AsyncClient(timeout=10) as http:
        token = provider.token("alice")
        port = int(provider.origin.rsplit(":", 1)[1])
        # The slow listener: a tiny receive buffer, and it never reads.
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        slow = trio.SocketStream(sock)
        await slow.send_all(
            b"GET /api/v1/events/stream?name=example.big HTTP/1.1\r\nHost: t\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += await slow.receive_some(1)
        assert head.startswith(b"HTTP/1.1 200")
        payload = "x" * 65536
        published: list[str] = []
        async with open_stream(http, provider, token, name="example.big") as fast:
            received: list[str] = []

            async def read_fast() -> None:
                while True:
                    (event,) = await fast.events(1)
                    received.append(event["id"])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_fast)
                while memory(provider).stats.slow_disconnects == 0:
                    assert len(published) < 500, "the slow listener was never disconnected"
                    with trio.fail_after(2):  # publishing never waits for listeners
                        published.append(
                            (await publish(http, provider, token, "example.big", payload))["id"]
                        )
                for _ in range(3):
                    published.append((await publish(http, provider, token, "example.big", 1))["id"])
                await eventually(lambda: len(received) >= len(published))
                nursery.cancel_scope.cancel()
        assert received == published
        assert memory(provider).stats.slow_disconnects == 1
        # The slow stream ends (chunked terminator) after what it held.
        data = b""
        with trio.fail_after(10):
            while not data.endswith(b"\r\n0\r\n\r\n"):
                data += await slow.receive_some(1 << 20)
        assert 0 < data.count(b'"name":"example.big"') < len(published)
        await slow.aclose()


async def test_single_events_are_not_held_back(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    """Each event goes out on its own: none waits for a batch to fill up.

    (How fast is the benchmark harness's business: publish -> delivery latency.)
    """
    token = prov.token("alice")
    async with open_stream(http, prov, token, name="example.fast") as stream:
        for n in range(30):
            await publish(http, prov, token, "example.fast", n)
            with trio.fail_after(10):
                (event,) = await stream.events(1)
            assert event["payload"] == n


# -- wildcards -----------------------------------------------------------------


async def test_wildcard_streams_for_services_when_enabled(http: httpx.AsyncClient) -> None:
    config = ProviderConfig(secret=SECRET, allow_wildcards=True)
    async with open_provider(config) as provider:
        user = provider.token("alice")
        service = provider.token("svc", audience=INTERNAL_AUDIENCE)
        url = provider.url + "/stream"
        denied = await http.get(url, params={"name": "example.*"}, headers=auth(user))
        assert denied.status_code == 403
        reserved = await http.get(url, params={"name": "bus.>"}, headers=auth(service))
        assert reserved.status_code == 403
        vm = await http.get(url, params={"name": "bus.vm.*"}, headers=auth(service))
        assert (vm.status_code, vm.json()["required_scopes"]) == (403, ["vm:write", "vm:read"])
        async with (
            open_stream(http, provider, service, name="example.*") as one,
            open_stream(http, provider, service, name="example.>") as rest,
        ):
            for name in ("example.a", "other.a", "example.a.b", "example.b"):
                await publish(http, provider, user, name, name)
            assert [e["payload"] for e in await one.events(2)] == ["example.a", "example.b"]
            assert [e["payload"] for e in await rest.events(3)] == [
                "example.a",
                "example.a.b",
                "example.b",
            ]
