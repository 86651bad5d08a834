"""A worker survives a restart of the reference provider on the same port."""

from __future__ import annotations

from functools import partial

import trio

from busevents import Event, EventsClient, Publisher, Readiness, RetryPolicy, Worker, run_worker
from busevents.provider import open_provider


async def test_a_worker_reconnects_after_the_provider_restarts() -> None:
    handled: list[object] = []
    arrivals = {1: trio.Event(), 2: trio.Event()}
    transitions: list[bool] = []

    async def record(event: Event, publisher: Publisher) -> None:
        handled.append(event.payload_obj())
        arrivals[len(handled)].set()

    async def watch(readiness: Readiness) -> None:
        while True:
            await readiness.wait()
            transitions.append(True)
            await readiness.wait_not_ready()
            transitions.append(False)

    async def wait_handled(count: int) -> None:
        with trio.fail_after(5):
            await arrivals[count].wait()

    # Unicast: the group outlives nothing across a restart (memory backend), so
    # what counts is that the new provider sees the worker subscribed again.
    worker = Worker(
        "example.restart",
        record,
        delivery="unicast",
        group="g",
        retry=RetryPolicy(min_delay=0.05, max_delay=0.2),
    )
    readiness = Readiness()
    async with trio.open_nursery() as nursery:
        async with open_provider() as first:
            port = int(first.origin.rsplit(":", 1)[1])
            config = first.config  # same secret: the worker's token stays valid
            client = EventsClient(first.url, first.token(), timeout=5)
            await nursery.start(partial(run_worker, client, worker, readiness=readiness))
            nursery.start_soon(watch, readiness)
            await client.send("example.restart", "before")
            await wait_handled(1)
        # The provider is gone: the stream broke and readiness went false.
        with trio.fail_after(5):
            await readiness.wait_not_ready()
        await trio.sleep(0.3)  # a few refused reconnects
        assert not readiness.is_ready
        async with open_provider(config, port=port) as second:
            assert second.url == first.url
            with trio.fail_after(5):
                await readiness.wait()
            await client.send("example.restart", "after")
            await wait_handled(2)
            nursery.cancel_scope.cancel()
    await client.aclose()  # after the worker: its stream must close before the pool
    assert handled == ["before", "after"]
    assert transitions[:3] == [True, False, True]
