"""``busevents.follow_stream``, the SDK's one reconnect loop, against the reference
provider through a fault proxy that cuts the stream: the ``after=`` cursor resumes
where the consumer stopped (the provider sends nothing twice), the callbacks tell
up, down and each retry, and ``--count``-style limits and snapshots end the loop."""

from __future__ import annotations

import trio
from benchmarks._fault_proxy import FaultProxy

from busevents import (
    BusEventsError,
    EventsClient,
    EventStream,
    RetryPolicy,
    TransportError,
    follow_stream,
)
from busevents.provider import RunningProvider

NAME = "example.follow"
FAST = RetryPolicy(min_delay=0.02, max_delay=0.05)


async def test_a_cut_stream_resumes_after_the_last_event_handed_out(
    provider: RunningProvider,
) -> None:
    token = provider.token()
    got: list[str] = []
    received: list[int] = []  # events each connection carried (re-sent ones included)
    log: list[str] = []
    async with EventsClient(provider.url, token) as client:
        ids = [(await client.send(NAME, {"n": n})).id for n in range(5)]
        async with trio.open_nursery() as nursery:
            proxy = FaultProxy(int(provider.origin.rsplit(":", 1)[1]))
            port = await nursery.start(proxy.serve)
            via_proxy = EventsClient(f"http://127.0.0.1:{port}/api/v1/events", token)

            async def consume(stream: EventStream) -> None:
                async for event in stream:
                    got.append(event.id)
                    if len(got) == 5 and proxy.connections == 1:
                        assert proxy.cut(("stream-broadcast",)) is not None
                    if len(got) == 8:
                        return  # the consumer stops: the loop ends

            def down(stream: EventStream) -> None:
                received.append(stream.events_received)
                log.append("down")

            def retry(error: BusEventsError | None, delay: float) -> None:
                log.append("retry")

            reconnected = trio.Event()

            def up(stream: EventStream) -> None:
                if "up" in log:
                    reconnected.set()
                log.append("up")

            async def publish_more() -> None:
                await reconnected.wait()
                for n in range(5, 8):
                    ids.append((await client.send(NAME, {"n": n})).id)

            nursery.start_soon(publish_more)
            async with via_proxy:
                with trio.fail_after(20):
                    await follow_stream(
                        via_proxy,
                        NAME,
                        consume,
                        policy=FAST,
                        replay=True,
                        dedupe=100,
                        on_up=up,
                        on_down=down,
                        on_retry=retry,
                    )
            nursery.cancel_scope.cancel()
    assert got == ids  # each event once, in order
    assert log == ["up", "down", "retry", "up", "down"]
    # The second connection asked for the events after the 5th: none was re-sent.
    assert received == [5, 3]


async def test_a_snapshot_ends_the_loop_and_retrying_off_raises(
    provider: RunningProvider, unused_url: str
) -> None:
    async with EventsClient(provider.url, provider.token()) as client:
        await client.send(NAME, {"n": 1})
        seen: list[str] = []

        async def consume(stream: EventStream) -> None:
            seen.extend([event.id async for event in stream])

        with trio.fail_after(10):
            await follow_stream(client, NAME, consume, policy=FAST, replay=True, follow=False)
        assert len(seen) == 1
    async with EventsClient(unused_url, "t") as dead:
        retries: list[float] = []
        try:
            await follow_stream(
                dead,
                NAME,
                consume,
                policy=FAST,
                max_retries=2,
                on_retry=lambda error, delay: retries.append(delay),
            )
        except BusEventsError as exc:
            assert "giving up after 2 reconnect(s)" in str(exc)
        else:
            raise AssertionError("a dead provider must end in an error")
        assert len(retries) == 2


async def test_cli_count_not_reached_by_the_deadline_says_so(
    provider: RunningProvider, run_cli, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """``--count 2 --timeout 3s`` with one event: exit 1, naming the deadline (it said
    "before the stream ended", issue 23's papercut)."""
    async with EventsClient(provider.url, provider.token()) as client:
        await client.send(NAME, {"n": 1})
    (tmp_path / "token").write_text(provider.token())
    result = await run_cli(
        "--api-url", provider.url, "--token-file", "token", "--timeout", "3s",
        "listen", "--name", NAME, "--replay", "--count", "2",
    )  # fmt: skip
    assert result.status == 1, result.stderr
    assert result.stdout.count(b"\n") == 1
    assert "1 of the 2 events asked for arrived before the --timeout deadline" in result.stderr


async def test_a_consumer_failing_mid_batch_resumes_after_its_last_event(
    provider: RunningProvider,
) -> None:
    """The cursor is the last event *handed out*, not the last one received: a
    consumer iterating event by event that fails (retryably) in the middle of a
    network read gets the rest of that read again, and nothing twice."""
    got: list[str] = []
    failed = False
    async with EventsClient(provider.url, provider.token()) as client:
        ids = [(await client.send(NAME, {"n": n})).id for n in range(12)]

        async def consume(stream: EventStream) -> None:
            nonlocal failed
            async for event in stream:
                got.append(event.id)
                if len(got) == 4 and not failed:
                    failed = True
                    # One network read carried all twelve: this stops in its middle.
                    assert stream.events_received == 12
                    assert (stream.last_id, stream.events_delivered) == (ids[3], 4)
                    raise TransportError("the consumer's own call failed", url=client.url)

        with trio.fail_after(20):
            await follow_stream(client, NAME, consume, policy=FAST, replay=True, follow=False)
    assert failed and got == ids
