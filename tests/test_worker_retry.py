"""Listener retry, readiness and de-duplication, on a virtual clock.

The provider here is a scripted httpx transport (``httpx.MockTransport``: no
sockets, so trio's ``autojump_clock`` can skip every backoff delay); the
client, the worker loop and the retry policy are the real ones.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from functools import partial

import httpx
import pytest
import trio

from busevents import (
    ConfigError,
    Event,
    EventsClient,
    Forbidden,
    Publisher,
    Readiness,
    RetryPolicy,
    Worker,
    run_worker,
)

URL = "http://provider.invalid/api/v1/events"


def line(event_id: str, name: str = "example.x") -> bytes:
    return json.dumps({"id": event_id, "name": name, "payload": event_id}).encode() + b"\n"


class Feed(httpx.AsyncByteStream):
    """A response body: ``chunks``, then wait ``hold`` (an event or seconds), then end."""

    def __init__(self, *chunks: bytes, hold: trio.Event | float | None = None) -> None:
        self.chunks = list(chunks)
        self.hold = hold

    def __aiter__(self) -> Feed:  # type: ignore[override]
        return self

    async def __anext__(self) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        hold, self.hold = self.hold, None
        if isinstance(hold, trio.Event):
            await hold.wait()
        elif hold is not None:
            await trio.sleep(hold)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        pass


def error(status: int, **headers: str) -> httpx.Response:
    body = {"error": "forbidden" if status == 403 else "unavailable", "message": "scripted"}
    # Streamed like a real transport's body (content given up front counts as already read).
    headers = {"content-type": "application/json", **headers}
    return httpx.Response(status, headers=headers, stream=Feed(json.dumps(body).encode()))


def stream(feed: Feed) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "application/x-ndjson"}, stream=feed)


class Script:
    """Answers the n-th stream request with ``steps[n]``; records when each came."""

    def __init__(self, steps: list[Callable[[], httpx.Response]]) -> None:
        self.steps = steps
        self.times: list[float] = []
        self.requests: list[httpx.Request] = []
        self.ready_when_asked: list[bool] = []
        self.readiness: Readiness | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.times.append(trio.current_time())
        self.requests.append(request)
        if self.readiness is not None:
            self.ready_when_asked.append(self.readiness.is_ready)
        return self.steps[len(self.times) - 1]()

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


async def nothing(event: Event, publisher: Publisher) -> None:
    pass


async def run_until_forbidden(script: Script, policy: RetryPolicy, **worker: object) -> None:
    async with EventsClient(URL, "token", transport=httpx.MockTransport(script)) as client:
        with pytest.raises(Forbidden):
            await run_worker(client, Worker("example.x", nothing, retry=policy, **worker))  # type: ignore[arg-type]


async def test_backoff_grows_within_bounds_and_resets_after_events(autojump_clock: object) -> None:
    unavailable = lambda: error(503)  # noqa: E731
    steps = [unavailable] * 10 + [lambda: stream(Feed(line("1")))] + [unavailable] * 3
    script = Script([*steps, lambda: error(403)])
    await run_until_forbidden(script, RetryPolicy(min_delay=1, max_delay=64))
    gaps = script.gaps
    # Retry n waits between min and min(max, min * 2**n).
    for n, gap in enumerate(gaps[:10], start=1):
        assert 1 - 1e-6 <= gap <= min(64, 2**n) + 1e-6, (n, gaps)
    assert max(gaps[5:10]) > 8, gaps  # it does grow (all five ≤ 8: chance 1 in 9**5)
    # The connection that delivered an event reset the backoff: retry 1, 2, 3 again
    # (without the reset, each would range up to 64 s: chance 1 in 63 * 21 * 9).
    for n, gap in enumerate(gaps[10:13], start=1):
        assert 1 - 1e-6 <= gap <= 2**n + 1e-6, (n, gaps)


async def test_a_connection_that_stays_up_resets_the_backoff(autojump_clock: object) -> None:
    unavailable = lambda: error(503)  # noqa: E731
    quiet_for_20s = lambda: stream(Feed(hold=20.0))  # noqa: E731
    steps = [*[unavailable] * 6, quiet_for_20s, *[unavailable] * 2, lambda: error(403)]
    script = Script(steps)
    await run_until_forbidden(script, RetryPolicy(min_delay=1, max_delay=64, healthy_after=10))
    after = [script.gaps[6] - 20, *script.gaps[7:9]]  # the connection itself lasted 20 s
    for n, gap in enumerate(after, start=1):  # retry 1, 2, 3 again
        assert 1 - 1e-6 <= gap <= 2**n + 1e-6, (n, script.gaps)


async def test_short_lived_connections_do_not_reset_the_backoff(autojump_clock: object) -> None:
    unavailable = lambda: error(503)  # noqa: E731
    up_for_1s = lambda: stream(Feed(hold=1.0))  # noqa: E731
    script = Script([*[unavailable] * 5, *[up_for_1s] * 4, lambda: error(403)])
    await run_until_forbidden(script, RetryPolicy(min_delay=1, max_delay=64, healthy_after=10))
    delays = [gap - 1 for gap in script.gaps[5:9]]  # each connection lived 1 s
    assert all(1 - 1e-6 <= d <= 64 + 1e-6 for d in delays), delays
    assert max(delays) > 8, delays  # still backing off (all four ≤ 8: chance 1 in 9**4)


async def test_retry_after_is_a_minimum_delay(autojump_clock: object) -> None:
    script = Script([lambda: error(429, **{"Retry-After": "7"}), lambda: error(403)])
    await run_until_forbidden(script, RetryPolicy(min_delay=1, max_delay=2))
    assert script.gaps == [pytest.approx(7)]


async def test_readiness_is_false_until_connected_and_before_each_reconnect(
    autojump_clock: object,
) -> None:
    release = trio.Event()
    script = Script(
        [
            lambda: error(503),
            lambda: stream(Feed(line("1"), hold=release)),
            lambda: stream(Feed(hold=trio.Event())),  # up for good
        ]
    )
    readiness = script.readiness = Readiness()
    assert not readiness.is_ready
    seen: list[str] = []

    async def record(event: Event, publisher: Publisher) -> None:
        seen.append(event.id)

    worker = Worker("example.x", record, retry=RetryPolicy(min_delay=1, max_delay=2))
    async with EventsClient(URL, "token", transport=httpx.MockTransport(script)) as client:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(60):  # virtual seconds: a hang fails at once
                started = await nursery.start(
                    partial(run_worker, client, worker, readiness=readiness)
                )
                assert started is readiness and readiness.is_ready
                assert len(script.times) == 2
                release.set()  # the provider ends the stream
                await readiness.wait_not_ready()
                assert len(script.times) == 2  # false before reconnecting
                await readiness.wait()
                assert len(script.times) == 3
            nursery.cancel_scope.cancel()
    assert script.ready_when_asked == [False, False, False]
    assert seen == ["1"]
    assert not readiness.is_ready


@pytest.mark.parametrize(("window", "expected"), [(3, list("abcd")), (2, list("abcabcd"))])
async def test_replay_after_a_reconnect_hands_no_event_twice_within_the_window(
    autojump_clock: object, window: int, expected: list[str]
) -> None:
    history = line("a") + line("b") + line("c")
    script = Script(
        [
            lambda: stream(Feed(history)),  # replayed history, then the stream ends
            lambda: stream(Feed(history, line("d"), hold=trio.Event())),
        ]
    )
    handled: list[str] = []
    done = trio.Event()

    async def record(event: Event, publisher: Publisher) -> None:
        handled.append(event.id)
        if event.id == "d":
            done.set()

    worker = Worker(
        "example.x",
        record,
        replay=True,
        concurrency=1,  # handled in arrival order
        dedup_window=window,
        retry=RetryPolicy(min_delay=1, max_delay=2),
    )
    async with EventsClient(URL, "token", transport=httpx.MockTransport(script)) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_worker, client, worker)
            with trio.fail_after(60):  # virtual seconds
                await done.wait()
            nursery.cancel_scope.cancel()
    assert handled == expected
    assert all(r.url.params["replay"] == "true" for r in script.requests)


def test_the_policy_comes_from_the_environment() -> None:
    assert RetryPolicy.from_env({}) == RetryPolicy(True, 1.0, 30.0, False)
    env = {
        "BUS_EVENTS_LISTENER_RETRY": "0",
        "BUS_EVENTS_LISTENER_RETRY_MIN": "250ms",
        "BUS_EVENTS_LISTENER_RETRY_MAX": "1m30s",
        "BUS_EVENTS_LISTENER_REQUIRED": "1",
    }
    assert RetryPolicy.from_env(env) == RetryPolicy(False, 0.25, 90.0, True)
    assert RetryPolicy.from_env(env, required=False).required is False
    for key, value, words in [
        ("BUS_EVENTS_LISTENER_RETRY", "maybe", "BUS_EVENTS_LISTENER_RETRY"),
        ("BUS_EVENTS_LISTENER_RETRY_MIN", "5", "BUS_EVENTS_LISTENER_RETRY_MIN.*missing unit"),
        ("BUS_EVENTS_LISTENER_RETRY_MAX", "100ms", "below its minimum"),
        ("BUS_EVENTS_LISTENER_RETRY_MIN", "0s", "must be positive"),
        ("BUS_EVENTS_LISTENER_REQUIRED", "2", "BUS_EVENTS_LISTENER_REQUIRED"),
    ]:
        with pytest.raises(ConfigError, match=words):
            RetryPolicy.from_env({key: value})


def test_delays_stay_within_their_bounds() -> None:
    policy = RetryPolicy(min_delay=0.5, max_delay=10)
    rng = random.Random(7)
    for attempt in range(1, 80):
        ceiling = min(10, 0.5 * 2**attempt)
        samples = [policy.delay(attempt, rng=rng) for _ in range(50)]
        assert all(0.5 <= s <= ceiling for s in samples)
        assert len(set(samples)) > 1  # jittered
    assert RetryPolicy(min_delay=3, max_delay=3).delay(5) == 3


async def test_a_worker_is_ready_only_when_every_stream_is_up(autojump_clock: object) -> None:
    b_up = trio.Event()
    b_attempts = 0

    async def provider(request: httpx.Request) -> httpx.Response:
        nonlocal b_attempts
        if request.url.params["name"] == "example.a":
            return stream(Feed(hold=trio.Event()))
        b_attempts += 1
        return stream(Feed(hold=trio.Event())) if b_up.is_set() else error(503)

    readiness = Readiness()
    worker = Worker(["example.a", "example.b"], nothing, retry=RetryPolicy(min_delay=1))
    async with EventsClient(URL, "token", transport=httpx.MockTransport(provider)) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(run_worker, client, worker, readiness=readiness))
            await trio.sleep(100)  # virtual: example.a is up, example.b keeps failing
            assert b_attempts > 3
            assert not readiness.is_ready
            b_up.set()
            with trio.fail_after(60):
                await readiness.wait()
            nursery.cancel_scope.cancel()
    assert not readiness.is_ready  # the worker is gone


# -- against real processes --------------------------------------------------------


async def test_required_with_retry_waits_for_an_api_that_starts_later(
    tmp_path: object, cli_env: dict[str, str]
) -> None:
    """BUS_EVENTS_LISTENER_REQUIRED=1 + BUS_EVENTS_LISTENER_RETRY=1: start-up order
    does not matter.  Not ready while the API is down, ready once it is up, then
    handles events; only a fatal answer would end it."""
    from .test_refresh import free_port, serve

    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1/events"
    secret = "c" * 64
    from busevents.provider import mint_token

    token = mint_token(secret.encode(), subject="w", scopes="events:send events:listen")
    env = {
        "BUS_EVENTS_LISTENER_REQUIRED": "1",
        "BUS_EVENTS_LISTENER_RETRY": "1",
        "BUS_EVENTS_LISTENER_RETRY_MIN": "50ms",
        "BUS_EVENTS_LISTENER_RETRY_MAX": "200ms",
    }
    handled: list[Event] = []

    async def handle(event: Event, publisher: Publisher) -> None:
        handled.append(event)

    worker = Worker("example.late", handle, retry=RetryPolicy.from_env(env))
    async with EventsClient(url, token) as client, trio.open_nursery() as nursery:
        readiness = Readiness()
        nursery.start_soon(partial(run_worker, client, worker, readiness=readiness))
        await trio.sleep(0.5)  # several attempts fail meanwhile: connection refused
        assert not readiness.is_ready
        async with serve(port, secret, cli_env):
            with trio.fail_after(30):
                await readiness.wait()
            sent = await client.send("example.late", {"n": 1})
            with trio.fail_after(10):
                while not handled:  # noqa: ASYNC110 (the handler has no event to wait on)
                    await trio.sleep(0.01)
            assert [e.id for e in handled] == [sent.id]
        nursery.cancel_scope.cancel()


async def test_required_with_retry_still_ends_on_a_fatal_answer(
    cli_env: dict[str, str],
) -> None:
    from busevents import BadRequest
    from busevents.provider import mint_token

    from .test_refresh import free_port, serve

    port = free_port()
    secret = "d" * 64
    token = mint_token(secret.encode(), subject="w", scopes="events:send events:listen")
    env = {"BUS_EVENTS_LISTENER_REQUIRED": "1", "BUS_EVENTS_LISTENER_RETRY": "1"}

    async def handle(event: Event, publisher: Publisher) -> None:
        pass

    worker = Worker("Not A Name", handle, retry=RetryPolicy.from_env(env))
    async with serve(port, secret, cli_env):
        async with EventsClient(f"http://127.0.0.1:{port}/api/v1/events", token) as client:
            with trio.fail_after(20), pytest.raises(BadRequest):
                await run_worker(client, worker)
