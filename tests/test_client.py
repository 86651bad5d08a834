"""The SDK against a real reference provider on 127.0.0.1."""

from __future__ import annotations

import pickle

import msgspec
import pytest
import trio

from busevents import (
    BadRequest,
    ConnectError,
    Delivery,
    EventsClient,
    Forbidden,
    Timeout,
    Unauthorized,
)
from busevents.provider import RunningProvider

from .helpers import collect, wait_for


async def test_send_then_listen_round_trip(provider: RunningProvider) -> None:
    async with EventsClient(provider.url, provider.token(subject="alice")) as client:
        async with client.listen("example.ping") as stream:
            accepted = await client.send("example.ping", {"ok": True}, correlation_id="req-1")
            (event,) = await collect(stream, 1)
    assert accepted.accepted and accepted.name == "example.ping" and accepted.id
    assert event.id == accepted.id
    assert event.name == "example.ping"
    assert event.correlation_id == "req-1"
    assert event.identity_id == "alice"
    assert event.payload_obj() == {"ok": True}
    assert event.time and event.time.endswith("Z")


async def test_broadcast_reaches_every_listener(provider: RunningProvider) -> None:
    async with EventsClient(provider.url, provider.token()) as client:
        async with client.listen("example.fanout") as one, client.listen("example.fanout") as two:
            for i in range(5):
                await client.send("example.fanout", i)
            first = await collect(one, 5)
            second = await collect(two, 5)
    assert [e.payload_obj() for e in first] == list(range(5))
    assert [e.payload_obj() for e in second] == list(range(5))


async def test_unicast_group_splits_and_groups_are_independent(provider: RunningProvider) -> None:
    total = 40
    seen: dict[str, list[int]] = {"a": [], "b": [], "other": []}
    all_arrived = trio.Event()

    async with EventsClient(provider.url, provider.token()) as client:

        async def consume(
            label: str, group: str, consumer: str, task_status=trio.TASK_STATUS_IGNORED
        ) -> None:
            async with client.listen(
                "example.job", delivery=Delivery.UNICAST, group=group, consumer=consumer
            ) as stream:
                task_status.started()
                async for event in stream:
                    seen[label].append(event.payload_as(int))
                    if len(seen["a"]) + len(seen["b"]) == len(seen["other"]) == total:
                        all_arrived.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(consume, "a", "workers", "worker-a")
            await nursery.start(consume, "b", "workers", "worker-b")
            await nursery.start(consume, "other", "auditors", "auditor")
            for i in range(total):
                await client.send("example.job", i)
            with trio.fail_after(10):
                await all_arrived.wait()
            await trio.sleep(0.1)  # nothing more may arrive
            nursery.cancel_scope.cancel()

    assert sorted(seen["a"] + seen["b"]) == list(range(total))  # each exactly once
    assert seen["a"] and seen["b"]  # both workers got work
    assert seen["other"] == list(range(total))  # another group gets its own copy


async def test_replay_without_follow_returns_history_and_ends(provider: RunningProvider) -> None:
    async with EventsClient(provider.url, provider.token()) as client:
        ids = [
            (await client.send("example.history", {"n": i}, correlation_id=f"c{i}")).id
            for i in range(3)
        ]
        with trio.fail_after(10):
            async with client.listen("example.history", replay=True, follow=False) as stream:
                events = [e async for e in stream]
    assert [e.id for e in events] == ids
    assert [e.correlation_id for e in events] == ["c0", "c1", "c2"]


async def test_batches_and_raw_batches(provider: RunningProvider) -> None:
    async with EventsClient(provider.url, provider.token()) as client:
        for i in range(10):
            await client.send("example.batch", i)
        async with client.listen("example.batch", replay=True, follow=False) as stream:
            batches = [b async for b in stream.batches()]
        async with client.listen("example.batch", replay=True, follow=False) as stream:
            raw = b"".join([b async for b in stream.raw_batches()])
    assert [e.payload_as(int) for b in batches for e in b] == list(range(10))
    lines = raw.splitlines()
    assert len(lines) == 10
    assert [msgspec.json.decode(line)["payload"] for line in lines] == list(range(10))


async def test_bad_request_is_typed(provider: RunningProvider) -> None:
    async with EventsClient(provider.url, provider.token()) as client:
        with pytest.raises(BadRequest) as info:
            async with client.listen("example.*"):
                pass
    assert info.value.status == 400 and info.value.code == "bad_request"
    assert "wildcard" in info.value.message


async def test_unauthorized_never_shows_the_token(provider: RunningProvider) -> None:
    canary = "canary.token.value"
    async with EventsClient(provider.url, canary) as client:
        assert canary not in repr(client)
        with pytest.raises(Unauthorized) as info:
            await client.send("example.ping", 1)
    assert info.value.status == 401 and info.value.code == "invalid_auth"
    assert canary not in str(info.value) and canary not in repr(info.value)
    assert canary not in repr(pickle.loads(pickle.dumps(info.value)))


async def test_forbidden_names_the_scopes(provider: RunningProvider) -> None:
    async with EventsClient(provider.url, provider.token(scopes="events:send")) as client:
        with pytest.raises(Forbidden) as info:
            await client.send("bus.vm.start.request", {"runtime": "default"})
    assert info.value.status == 403
    assert info.value.required_scopes == ("vm:write",)
    assert info.value.hint == 'bus auth token --scope "vm:write"'


async def test_connect_refused_names_the_url() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    async with EventsClient(f"http://127.0.0.1:{port}", "tok") as client:
        with pytest.raises(ConnectError, match=f"127.0.0.1:{port}/api/v1/events"):
            await client.send("example.ping", 1)


async def test_timeout_is_a_cancel_scope_naming_the_limit() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(10)  # accepts connections, never answers
    port = listener.getsockname()[1]
    async with EventsClient(f"http://127.0.0.1:{port}", "tok", timeout=0.2) as client:
        with pytest.raises(Timeout, match="within 200ms") as info:
            await client.send("example.ping", 1)
    assert info.value.timeout == 0.2
    listener.close()


async def test_from_env_resolves_like_the_cli(provider: RunningProvider, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(provider.token(subject="from-file") + "\n")
    token_file.chmod(0o600)
    env = {"BUS_EVENTS_API_URL": provider.origin, "BUS_EVENTS_TOKEN_FILE": str(token_file)}
    async with EventsClient.from_env(env=env) as client:
        assert client.url == provider.url
        await client.send("example.env", 1)
        async with client.listen("example.env", replay=True, follow=False) as stream:
            (event,) = [e async for e in stream]
    assert event.identity_id == "from-file"


async def test_leaving_listen_closes_the_stream(provider: RunningProvider) -> None:
    backend = provider.backend
    async with EventsClient(provider.url, provider.token()) as client:
        with trio.move_on_after(0.2):
            async with client.listen("example.quiet") as stream:
                assert backend.subscriber_count("example.quiet") == 1
                async for _ in stream:
                    pass
        # The provider saw the stream close and dropped its subscription.
        await wait_for(lambda: backend.subscriber_count("example.quiet") == 0, 5)
        # The pool is reusable: the closed stream left no broken connection behind.
        accepted = await client.send("example.quiet", 1)
        assert accepted.id
