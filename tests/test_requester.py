"""Request/reply through the reference provider: matching, errors, timeouts, sharing."""

from __future__ import annotations

import logging

import pytest
import trio

from busevents import (
    BusEventsError,
    ConfigError,
    Event,
    EventsClient,
    Forbidden,
    Publisher,
    ReplyTimeout,
    ResponseError,
    RetryPolicy,
    Timeout,
    Worker,
    WorkerError,
    open_requester,
    run_worker,
)
from busevents.provider import RunningProvider

FAST = RetryPolicy(min_delay=0.05, max_delay=0.2)


async def echo(event: Event, publisher: Publisher) -> None:
    payload = event.payload_obj()
    if isinstance(payload, dict) and payload.get("fail"):
        await publisher.reply_error(
            event, "example.echo.reply", "bad_request", "fail was asked", details={"n": 7}
        )
        return
    await publisher.reply(event, "example.echo.reply", {"echo": payload})


async def test_a_hundred_concurrent_requests_each_get_their_own_answer(
    provider: RunningProvider,
) -> None:
    answers: dict[int, object] = {}
    gate = trio.Event()

    async def gated_echo(event: Event, publisher: Publisher) -> None:
        await gate.wait()
        await echo(event, publisher)

    worker = Worker("example.echo", gated_echo, retry=FAST)
    async with (
        EventsClient(provider.url, provider.token()) as worker_client,
        EventsClient(provider.url, provider.token()) as client,
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_worker, worker_client, worker)
            async with open_requester(client, "example.echo.reply", retry=FAST) as requester:

                async def ask(n: int) -> None:
                    response = await requester.request("example.echo", {"n": n}, timeout=60)
                    answers[n] = response.payload_obj()

                async with trio.open_nursery() as requests:
                    for n in range(100):
                        requests.start_soon(ask, n)
                    with trio.fail_after(30):
                        # All in flight at once, on one listener (a counter: poll it).
                        while requester.pending < 100:  # noqa: ASYNC110
                            await trio.sleep(0.01)
                    gate.set()
            nursery.cancel_scope.cancel()
    assert answers == {n: {"echo": {"n": n}} for n in range(100)}
    assert requester.unmatched == 0 and requester.pending == 0


async def test_an_error_response_raises_response_error(provider: RunningProvider) -> None:
    async with EventsClient(provider.url, provider.token()) as client:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_worker, client, Worker("example.echo", echo, retry=FAST))
            async with open_requester(client, "example.echo.reply", retry=FAST) as requester:
                with pytest.raises(ResponseError) as caught:
                    await requester.request("example.echo", {"fail": True}, timeout=5)
                # The requester still works after an error response.
                ok = await requester.request("example.echo", "x", timeout=5)
            nursery.cancel_scope.cancel()
    error = caught.value
    assert isinstance(error, BusEventsError) and not isinstance(error, WorkerError)
    assert (error.code, error.message) == ("bad_request", "fail was asked")
    assert error.response.payload_obj() == {
        "n": 7,
        "error": "bad_request",
        "message": "fail was asked",
    }
    assert error.correlation_id == error.response.correlation_id
    assert "bad_request" in str(error) and "fail was asked" in str(error)
    assert ok.payload_obj() == {"echo": "x"}


async def test_payloads_that_merely_mention_error_are_responses(provider: RunningProvider) -> None:
    async def answer(event: Event, publisher: Publisher) -> None:
        await publisher.reply(event, "example.answer", event.payload_obj())

    async with EventsClient(provider.url, provider.token()) as client:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_worker, client, Worker("example.ask", answer, retry=FAST))
            async with open_requester(client, "example.answer", retry=FAST) as requester:
                for payload in [{"error": None}, {"error": ""}, ["error"], "error", {"error": 1}]:
                    response = await requester.request("example.ask", payload, timeout=5)
                    assert response.payload_obj() == payload
            nursery.cancel_scope.cancel()


async def test_no_answer_raises_request_timeout(provider: RunningProvider) -> None:
    async with EventsClient(provider.url, provider.token()) as client:
        async with open_requester(client, "example.nobody.reply", retry=FAST) as requester:
            started = trio.current_time()
            with pytest.raises(ReplyTimeout) as caught:
                await requester.request("example.nobody", {}, timeout=0.3)
            elapsed = trio.current_time() - started
            assert requester.pending == 0
    assert 0.3 <= elapsed < 20  # the request timeout, not a default wait
    error = caught.value
    assert isinstance(error, Timeout) and error.timeout == 0.3
    assert error.name == "example.nobody" and len(error.correlation_id) == 32
    assert error.correlation_id in str(error) and "0.3s" in str(error)


async def test_responses_nobody_waits_for_are_dropped_and_counted(
    provider: RunningProvider, caplog: pytest.LogCaptureFixture
) -> None:
    async def twice(event: Event, publisher: Publisher) -> None:
        await publisher.reply(event, "example.twice.reply", 1)
        await publisher.reply(event, "example.twice.reply", 2)  # a duplicate answer

    caplog.set_level(logging.DEBUG, logger="busevents.requester")
    async with EventsClient(provider.url, provider.token()) as client:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_worker, client, Worker("example.twice", twice, retry=FAST))
            async with open_requester(client, "example.twice.reply", retry=FAST) as requester:
                stray = await client.send("example.twice.reply", 0, correlation_id="nobody")
                response = await requester.request("example.twice", None, timeout=5)
                with trio.fail_after(5):
                    while requester.unmatched < 2:  # noqa: ASYNC110 - a counter: poll it
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert response.payload_obj() == 1
    assert requester.unmatched == 2
    dropped = [r.getMessage() for r in caplog.records if r.name == "busevents.requester"]
    assert any(stray.id in m and "nobody" in m for m in dropped), dropped
    assert all(
        r.levelno == logging.DEBUG for r in caplog.records if r.name == "busevents.requester"
    )


async def test_the_response_listener_is_open_before_the_request_is_sent(
    provider: RunningProvider,
) -> None:
    """A worker that answers instantly (here: before the request call even returns)."""

    async def instant(event: Event, publisher: Publisher) -> None:
        await publisher.reply(event, "example.fast.reply", "done")

    async with EventsClient(provider.url, provider.token()) as client:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_worker, client, Worker("example.fast", instant, retry=FAST))
            async with open_requester(client, "example.fast.reply", retry=FAST) as requester:
                assert requester.readiness.is_ready
                for _ in range(20):
                    response = await requester.request("example.fast", None, timeout=5)
                    assert response.payload_obj() == "done"
            nursery.cancel_scope.cancel()


async def test_requests_are_checked_and_listener_refusals_raise_at_open(
    provider: RunningProvider,
) -> None:
    async with EventsClient(provider.url, provider.token()) as client:
        async with open_requester(client, "example.same", retry=FAST) as requester:
            with pytest.raises(ConfigError, match="its own response"):
                await requester.request("example.same", None)
        with trio.fail_after(5), pytest.raises(Forbidden):
            async with open_requester(client, "bus.vm.reply", retry=FAST):
                raise AssertionError("the listener should have been refused")


async def test_an_error_in_the_block_comes_out_as_itself(provider: RunningProvider) -> None:
    async with EventsClient(provider.url, provider.token()) as client:
        with pytest.raises(KeyError):
            async with open_requester(client, "example.echo.reply", retry=FAST):
                raise KeyError("mine")
