"""The worker loop against a real reference provider: replies, groups, errors, shutdown."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import trio

from busevents import (
    ConfigError,
    Delivery,
    Event,
    EventsClient,
    Forbidden,
    Handler,
    HandlerError,
    ListenerUnavailable,
    Publisher,
    Readiness,
    RetryPolicy,
    Unauthorized,
    Worker,
    run_worker,
)
from busevents.provider import RunningProvider

from .helpers import collect, wait_for

FAST = RetryPolicy(min_delay=0.05, max_delay=0.2)


async def test_a_worker_replies_with_the_request_correlation_id(provider: RunningProvider) -> None:
    async def echo(event: Event, publisher: Publisher) -> None:
        await publisher.reply(event, "example.echo.reply", {"echo": event.payload_obj()})

    worker = Worker("example.echo", echo, delivery="unicast", group="echo", retry=FAST)
    async with EventsClient(provider.url, provider.token(subject="alice")) as client:
        async with trio.open_nursery() as nursery, client.listen("example.echo.reply") as replies:
            readiness = await nursery.start(run_worker, client, worker)
            assert isinstance(readiness, Readiness) and readiness.is_ready
            await client.send("example.echo", {"n": 1}, correlation_id="req-42")
            await client.send("example.echo", {"n": 2})  # no correlation id of its own
            got = await collect(replies, 2)
            nursery.cancel_scope.cancel()
    # The two handlers run at once (concurrency 16): their replies come in either order.
    first, second = sorted(got, key=lambda reply: reply.payload_obj()["echo"]["n"])
    assert first.correlation_id == "req-42"
    assert first.payload_obj() == {"echo": {"n": 1}}
    assert first.identity_id == "alice"
    # A request without a correlation id is answered under the request's event id.
    assert second.payload_obj() == {"echo": {"n": 2}}
    assert second.correlation_id and second.correlation_id != "req-42"


async def test_a_service_worker_replies_on_behalf_of_the_requester(
    provider: RunningProvider,
) -> None:
    """An end user only sees their own events: the reply must be stamped with their identity."""

    async def echo(event: Event, publisher: Publisher) -> None:
        await publisher.reply(event, "example.echo.reply", event.payload_obj())

    service = provider.token(subject="svc", audience="ai.hg.fi/internal")
    async with (
        EventsClient(provider.url, service) as worker_client,
        EventsClient(provider.url, provider.token(subject="bob")) as bob,
        trio.open_nursery() as nursery,
        bob.listen("example.echo.reply") as replies,
    ):
        await nursery.start(run_worker, worker_client, Worker("example.echo", echo, retry=FAST))
        await bob.send("example.echo", "hi", correlation_id="bob-1")
        (reply,) = await collect(replies, 1)
        nursery.cancel_scope.cancel()
    assert (reply.identity_id, reply.correlation_id, reply.payload_obj()) == ("bob", "bob-1", "hi")


async def test_replies_carry_the_origin_metadata_of_the_request(
    provider: RunningProvider,
) -> None:
    async def echo(event: Event, publisher: Publisher) -> None:
        await publisher.reply(event, "example.echo.reply", None, metadata={"worker": "w1"})

    service = provider.token(subject="svc", audience="ai.hg.fi/internal")
    async with EventsClient(provider.url, service) as client:
        async with trio.open_nursery() as nursery, client.listen("example.echo.reply") as replies:
            await nursery.start(run_worker, client, Worker("example.echo", echo, retry=FAST))
            await client.send(
                "example.echo",
                correlation_id="c-1",
                metadata={"bus.origin.environment.id": "env-7", "trace": "not copied"},
            )
            (reply,) = await collect(replies, 1)
            nursery.cancel_scope.cancel()
    assert reply.correlation_id == "c-1"
    assert reply.metadata == {"bus.origin.environment.id": "env-7", "worker": "w1"}


async def test_two_workers_in_one_unicast_group_split_the_load(provider: RunningProvider) -> None:
    total = 200
    handled: list[tuple[str, int]] = []
    all_done = trio.Event()

    def handler_for(label: str) -> Handler:
        async def handle(event: Event, publisher: Publisher) -> None:
            await trio.sleep(0.001)  # real work takes time: let the peer compete
            handled.append((label, event.payload_as(int)))
            if len(handled) == total:
                all_done.set()

        return handle

    workers = [
        Worker(
            "example.job",
            handler_for(label),
            delivery=Delivery.UNICAST,
            group="jobs",
            consumer=label,
            concurrency=4,
            retry=FAST,
        )
        for label in ("a", "b")
    ]
    async with EventsClient(provider.url, provider.token()) as client:
        async with trio.open_nursery() as nursery:
            for worker in workers:
                await nursery.start(run_worker, client, worker)
            for i in range(total):
                await client.send("example.job", i)
            with trio.fail_after(10):
                await all_done.wait()
            await trio.sleep(0.1)  # a duplicate would show up now
            nursery.cancel_scope.cancel()
    numbers = Counter(n for _, n in handled)
    assert sorted(numbers) == list(range(total)), "an event was lost"
    assert set(numbers.values()) == {1}, "an event was handled twice"
    by_worker = Counter(label for label, _ in handled)
    assert by_worker["a"] > 0 and by_worker["b"] > 0, by_worker


async def test_one_stream_per_name_and_readiness_covers_them_all(
    provider: RunningProvider,
) -> None:
    seen: list[str] = []
    both = trio.Event()

    async def record(event: Event, publisher: Publisher) -> None:
        seen.append(event.name)
        if len(seen) == 2:
            both.set()

    worker = Worker(["example.one", "example.two"], record, retry=FAST)
    async with EventsClient(provider.url, provider.token()) as client:
        async with trio.open_nursery() as nursery:
            readiness = await nursery.start(run_worker, client, worker)
            assert readiness.is_ready
            await client.send("example.one")
            await client.send("example.two")
            with trio.fail_after(5):
                await both.wait()
            nursery.cancel_scope.cancel()
    assert sorted(seen) == ["example.one", "example.two"]


async def test_handler_errors_are_logged_and_the_loop_goes_on(
    provider: RunningProvider, caplog: pytest.LogCaptureFixture
) -> None:
    handled: list[int] = []
    last = trio.Event()

    async def picky(event: Event, publisher: Publisher) -> None:
        n = event.payload_as(int)
        if n == 1:
            raise ValueError("one is not welcome")
        handled.append(n)
        if n == 2:
            last.set()

    caplog.set_level(logging.ERROR, logger="busevents.worker")
    async with EventsClient(provider.url, provider.token()) as client:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_worker, client, Worker("example.picky", picky, retry=FAST))
            accepted = [await client.send("example.picky", n) for n in range(3)]
            with trio.fail_after(5):
                await last.wait()
            nursery.cancel_scope.cancel()
    assert sorted(handled) == [0, 2]
    (record,) = [r for r in caplog.records if r.name == "busevents.worker"]
    message = record.getMessage()
    assert (
        "example.picky" in message and accepted[1].id in message and "one is not welcome" in message
    )
    assert record.exc_info is not None and record.exc_info[0] is ValueError


async def test_stop_on_error_stops_the_worker_with_a_handler_error(
    provider: RunningProvider,
) -> None:
    finished: list[str] = []

    async def handler(event: Event, publisher: Publisher) -> None:
        if event.payload_obj() == "slow":
            await trio.sleep(0.3)
            finished.append("slow")  # in flight when the error came: gets its grace
            return
        raise RuntimeError("boom")

    worker = Worker("example.fragile", handler, stop_on_error=True, grace_period=5, retry=FAST)
    async with EventsClient(provider.url, provider.token()) as client:
        with pytest.RaisesGroup(HandlerError) as caught:
            async with trio.open_nursery() as nursery:
                await nursery.start(run_worker, client, worker)
                await client.send("example.fragile", "slow")
                await trio.sleep(0.05)
                accepted = await client.send("example.fragile", "bad")
                with trio.fail_after(5):
                    await trio.sleep_forever()
    (error,) = caught.value.exceptions
    assert isinstance(error, HandlerError)
    assert (error.event_id, error.event_name) == (accepted.id, "example.fragile")
    assert isinstance(error.__cause__, RuntimeError)
    assert "boom" in str(error)
    assert finished == ["slow"]


async def test_the_concurrency_limit_bounds_handlers_in_flight(provider: RunningProvider) -> None:
    running = peak = done = 0
    gate, all_done = trio.Event(), trio.Event()

    async def blocked(event: Event, publisher: Publisher) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        done += 1
        if done == 20:
            all_done.set()

    async with EventsClient(provider.url, provider.token()) as client:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                run_worker, client, Worker("example.busy", blocked, concurrency=3, retry=FAST)
            )
            for i in range(20):
                await client.send("example.busy", i)
            await wait_for(lambda: running == 3, 5)
            await trio.sleep(0.2)  # the other 17 are waiting for a slot, not running
            assert running == peak == 3
            gate.set()
            with trio.fail_after(5):
                await all_done.wait()
            nursery.cancel_scope.cancel()
    assert peak == 3 and done == 20


async def test_cancelling_a_worker_gives_in_flight_handlers_their_grace_period(
    provider: RunningProvider,
) -> None:
    outcome: dict[str, str] = {}
    both_started = trio.Event()

    async def handler(event: Event, publisher: Publisher) -> None:
        kind = event.payload_as(str)
        outcome[kind] = "started"
        if len(outcome) == 2:
            both_started.set()
        try:
            await trio.sleep(0.2 if kind == "quick" else 60)
            await publisher.send("example.done", kind)  # the client still works in the grace
            outcome[kind] = "finished"
        except trio.Cancelled:
            outcome[kind] = "cancelled"
            raise

    worker = Worker("example.graceful", handler, grace_period=0.5, retry=FAST)
    async with EventsClient(provider.url, provider.token()) as client:
        async with client.listen("example.done") as done:
            async with trio.open_nursery() as nursery:
                await nursery.start(run_worker, client, worker)
                await client.send("example.graceful", "quick")
                await client.send("example.graceful", "stuck")
                with trio.fail_after(5):
                    await both_started.wait()
                started = trio.current_time()
                nursery.cancel_scope.cancel()
            elapsed = trio.current_time() - started
            (finished,) = await collect(done, 1)
    assert outcome == {"quick": "finished", "stuck": "cancelled"}
    assert finished.payload_obj() == "quick"
    assert 0.4 < elapsed < 20, elapsed  # waited for the grace period, not for the stuck handler


async def test_a_worker_fails_fast_on_403_and_401(provider: RunningProvider) -> None:
    async def never(event: Event, publisher: Publisher) -> None:
        raise AssertionError("no event expected")

    slow_retry = RetryPolicy(min_delay=30, max_delay=60)  # a retry would blow the deadline
    async with EventsClient(provider.url, provider.token(scopes="events:listen")) as client:
        with trio.fail_after(5), pytest.raises(Forbidden) as forbidden:
            await run_worker(client, Worker("bus.vm.start", never, retry=slow_retry))
    assert forbidden.value.required_scopes == ("vm:write",)  # start: a lifecycle action
    async with EventsClient(provider.url, "not-a-jwt") as client:
        with trio.fail_after(5), pytest.raises(Unauthorized):
            await run_worker(client, Worker("example.ping", never, retry=slow_retry))


async def test_a_required_listener_that_cannot_connect_raises(unused_url: str) -> None:
    async def never(event: Event, publisher: Publisher) -> None:
        raise AssertionError("no event expected")

    # Required with retrying off fails fast (with it on, it waits: test_worker_retry.py).
    required = RetryPolicy(enabled=False, min_delay=30, max_delay=60, required=True)
    async with EventsClient(unused_url, "token") as client:
        with trio.fail_after(5), pytest.raises(ListenerUnavailable) as caught:
            await run_worker(client, Worker("example.ping", never, retry=required))
    assert caught.value.name == "example.ping"
    assert "BUS_EVENTS_LISTENER_REQUIRED=1" in str(caught.value)
    assert "token" not in str(caught.value).replace("BUS_", "")


async def test_with_retry_off_an_optional_listener_stops_quietly(
    unused_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def never(event: Event, publisher: Publisher) -> None:
        raise AssertionError("no event expected")

    caplog.set_level(logging.DEBUG, logger="busevents")
    async with EventsClient(unused_url, "token") as client:
        with trio.fail_after(5):
            await run_worker(
                client, Worker("example.ping", never, retry=RetryPolicy(enabled=False))
            )
    # Quietly: it returns, with one warning that says why, and no error or traceback.
    records = [r for r in caplog.records if r.name.startswith("busevents")]
    assert [r.levelno for r in records if r.levelno >= logging.WARNING] == [logging.WARNING]
    (warning,) = [r for r in records if r.levelno == logging.WARNING]
    assert "BUS_EVENTS_LISTENER_RETRY=0" in warning.getMessage()
    assert all(r.exc_info is None for r in records)


def test_worker_declarations_are_checked() -> None:
    async def handler(event: Event, publisher: Publisher) -> None:
        pass

    worker = Worker("example.a", handler)
    assert worker.names == ("example.a",) and worker.delivery is Delivery.BROADCAST
    assert worker.label == "test_worker_declarations_are_checked.<locals>.handler"
    assert Worker(("a.b", "c.d"), handler, delivery="unicast", group="g").delivery == "unicast"
    for kwargs, words in [
        ({"names": ()}, "at least one"),
        ({"names": ["a.b", "a.b"]}, "twice"),
        ({"delivery": "anycast"}, "invalid delivery"),
        ({"group": "g"}, "unicast"),
        ({"concurrency": 0}, "concurrency"),
        ({"grace_period": -1}, "grace_period"),
        ({"stall_timeout": 0}, "stall_timeout"),
    ]:
        args = {"names": "example.a", "handler": handler, **kwargs}
        with pytest.raises(ConfigError, match=words):
            Worker(**args)  # type: ignore[arg-type]
