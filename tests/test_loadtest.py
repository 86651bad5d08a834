"""The bench engine in-process against the reference provider: counts, integrity, merging."""

from __future__ import annotations

import random
import secrets

import msgspec
import pytest
import trio
from hdrh.histogram import HdrHistogram

from busevents import ConfigError, EventsClient, Forbidden, PublishRequest
from busevents._bench import Bench, BenchPlan, BenchReport, check_plan
from busevents._bench._report import ListenerResult, PartResult, PublisherResult, build_report
from busevents._bench._stats import HIGHEST_US, SIGNIFICANT_FIGURES, Recorder, Tally
from busevents.provider import ProviderConfig, RunningProvider, open_provider

from .faults import chunk, response, serve_raw, stream_head
from .helpers import wait_for


def plan(**fields: object) -> BenchPlan:
    fields.setdefault("name", "bench.test")
    fields.setdefault("warmup", 0.0)
    return check_plan(BenchPlan(**fields))  # type: ignore[arg-type]


async def run(provider: RunningProvider, the_plan: BenchPlan, **token: str) -> BenchReport:
    bench = Bench(the_plan, url=provider.url, token=provider.token(**token), timeout=10)
    return await bench.run()


def assert_well_formed(report: BenchReport) -> None:
    """The report survives JSON, its percentiles are ordered, its histograms decode."""
    encoded = msgspec.json.encode(report)
    assert msgspec.json.decode(encoded, type=BenchReport) == report
    as_json = msgspec.json.decode(encoded)
    for latency in (report.publish.latency_us, report.delivery.latency_us):
        if latency.count:
            assert latency.min <= latency.p50 <= latency.p90 <= latency.p99 <= latency.p99_9
            assert latency.p99_9 <= latency.max
            assert latency.min <= latency.mean <= latency.max
            assert HdrHistogram.decode(latency.hdr.encode()).get_total_count() == latency.count
    assert "p99.9" in as_json["publish"]["latency_us"]
    assert report.publish.latency_us.count == report.publish.accepted
    assert sum(p.accepted for p in report.publish.publishers) == report.publish.accepted


async def test_broadcast_bench_delivers_every_event_to_every_listener(provider) -> None:
    the_plan = plan(publishers=3, listeners=2, events=700, warmup=0.2)
    bench = Bench(the_plan, url=provider.url, token=provider.token(), timeout=10)
    report = await bench.run()
    pub, dlv = report.publish, report.delivery
    # The live counts (they end the drain) agree with the report.
    progress = bench.progress()
    assert progress.receivers == [dlv.expected] * 2 and progress.sent == dlv.expected
    assert (pub.accepted, pub.attempted, pub.errors) == (700, 700, {})
    assert [p.accepted for p in pub.publishers] == [234, 233, 233]
    assert dlv.expected == 700 + pub.warmup_accepted == provider.backend.stats.published
    for listener in dlv.listeners:
        assert (listener.received, listener.lost, listener.duplicated) == (700, 0, 0)
        assert listener.out_of_order == 0 and listener.ended_early is None
    assert dlv.warmup_received == 2 * pub.warmup_accepted
    assert dlv.latency_us.count == dlv.received == 1400
    assert (dlv.lost, dlv.duplicated, dlv.in_flight, dlv.foreign) == (0, 0, 0, 0)
    assert report.verdict.ok and report.verdict.checked and not report.interrupted
    assert_well_formed(report)


async def test_unicast_bench_delivers_every_event_to_the_group_once(provider) -> None:
    the_plan = plan(publishers=3, listeners=3, delivery="unicast", group="g1", events=700)
    report = await run(provider, the_plan)
    dlv = report.delivery
    assert (dlv.mode, dlv.group, dlv.receivers, dlv.expected) == ("unicast", "g1", 1, 700)
    assert sum(li.received for li in dlv.listeners) == dlv.received == 700
    assert (dlv.lost, dlv.duplicated, dlv.out_of_order) == (0, 0, 0)
    assert report.verdict.ok
    assert_well_formed(report)


async def test_events_it_did_not_publish_are_ignored(provider) -> None:
    bench = Bench(plan(listeners=2, events=100), url=provider.url, token=provider.token())

    async def intrude() -> None:
        await wait_for(lambda: provider.backend.subscriber_count("bench.test") == 2)
        async with EventsClient(provider.url, provider.token()) as client:
            for i in range(5):
                await client.send("bench.test", {"someone": "else", "i": i})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(intrude)
        report = await bench.run()
    assert report.delivery.foreign == 10
    assert report.delivery.received == 200 and report.verdict.ok


@pytest.mark.parametrize("delivery", ["broadcast", "unicast"])
async def test_loss_is_detected_and_fails_the_verdict(delivery: str) -> None:
    # A slow listener and a 4-event buffer: the provider disconnects a broadcast
    # listener, or drops events for a unicast group (at-most-once under overload).
    config = ProviderConfig(secret=secrets.token_bytes(32), listener_queue=4)
    the_plan = plan(
        publishers=4,
        listeners=1,
        delivery=delivery,
        events=120,
        payload_size=200_000,
        listener_delay=0.05,
    )
    async with open_provider(config) as provider:
        report = await run(provider, the_plan)
        stats = provider.backend.stats
    dlv = report.delivery
    assert dlv.lost > 0 and dlv.duplicated == 0
    assert dlv.lost == dlv.expected - dlv.received
    if delivery == "unicast":
        assert dlv.lost == stats.dropped
        assert report.verdict.problems[0] == f"group bench: {dlv.lost} lost, 0 duplicated"
    else:
        assert stats.slow_disconnects == 1 and dlv.listeners[0].ended_early
    assert not report.verdict.ok
    assert_well_formed(report)


async def test_reordering_duplicates_and_loss_are_told_apart() -> None:
    # A deployment that accepts six events, then streams them back as 0 2 1 3 3 5.
    payloads: list[bytes] = []
    all_stored = trio.Event()

    async def deployment(stream: trio.SocketStream, request: bytes) -> None:
        head, _, body = request.partition(b"\r\n\r\n")
        if head.startswith(b"POST"):
            payloads.append(bytes(msgspec.json.decode(body, type=PublishRequest).payload))
            if len(payloads) == 6:
                all_stored.set()
            accepted = b'{"accepted":true,"id":"%d","name":"bench.test"}' % len(payloads)
            await stream.send_all(response("202 Accepted", accepted))
            return
        await stream.send_all(stream_head(chunked=True))  # the stream is open
        await all_stored.wait()
        lines = b"".join(
            b'{"id":"%d","name":"bench.test","payload":%s}\n' % (seq, payloads[seq])
            for seq in (0, 2, 1, 3, 3, 5)
        )
        await stream.send_all(chunk(lines) + b"0\r\n\r\n")

    async with serve_raw(deployment) as url:
        bench = Bench(plan(listeners=1, events=6), url=url, token="t", timeout=10)
        report = await bench.run()
    (listener,) = report.delivery.listeners
    assert (listener.received, listener.lost, listener.duplicated) == (6, 1, 1)
    assert listener.out_of_order == 1 and listener.ended_early
    assert report.verdict.problems[0] == "listener 0: 1 lost, 1 duplicated"
    assert not report.verdict.ok


async def test_cancelled_run_gives_a_partial_report(provider) -> None:
    the_plan = plan(publishers=2, listeners=2, duration=60.0, rate=300.0)
    bench = Bench(the_plan, url=provider.url, token=provider.token())
    with trio.move_on_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bench.run)
            await wait_for(lambda: provider.backend.stats.published >= 50)
            nursery.cancel_scope.cancel()
    assert not bench.completed
    report = bench.report()
    # Each publisher may have had one event stored but not yet acknowledged.
    assert report.interrupted and report.publish.accepted >= 50 - 2
    # What had not arrived yet is in flight, not lost.
    assert (report.delivery.lost, report.delivery.duplicated) == (0, 0)
    assert report.verdict.ok
    assert_well_formed(report)


async def test_rate_limit_spaces_the_sends(provider) -> None:
    report = await run(provider, plan(publishers=2, listeners=0, events=100, rate=200.0))
    # Scheduled sends never go early: the 100th event is due 99/200 s after the start.
    assert report.publish.accepted == 100 and report.publish.window_s >= 0.49
    assert not report.verdict.checked and report.verdict.ok


@pytest.mark.parametrize(
    ("scopes", "listeners"),
    [("events:listen", 1), ("events:send", 1)],
    ids=["cannot-publish", "cannot-listen"],
)
async def test_a_refusal_ends_the_run_with_that_error(
    provider, scopes: str, listeners: int
) -> None:
    with pytest.raises(Forbidden) as caught:
        await run(provider, plan(publishers=3, listeners=listeners, events=100), scopes=scopes)
    assert caught.value.status == 403


async def test_worker_processes_split_the_work_and_merge(provider) -> None:
    report = await run(provider, plan(publishers=2, listeners=2, events=200, processes=2))
    assert [p.id for p in report.publish.publishers] == [0, 1]
    assert [(li.id, li.received, li.lost) for li in report.delivery.listeners] == [
        (0, 200, 0),
        (1, 200, 0),
    ]
    assert report.verdict.ok
    assert_well_formed(report)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "bus.vm.start"}, "--allow-reserved"),
        ({"name": "bench.*"}, "not an event name"),
        ({"name": "Bench.Upper"}, "not an event name"),
        ({"events": 10, "duration": 5.0}, "not both"),
        ({"events": 0}, "at least 1"),
        ({"publishers": 0}, "--publishers"),
        ({"group": "g"}, "needs --delivery unicast"),
        ({"delivery": "unicast", "group": "a b"}, "--group"),
        ({"rate": 0.0}, "--rate"),
        ({"processes": 3, "publishers": 1, "listeners": 2}, "--processes"),
        ({"delivery": "multicast"}, "invalid delivery"),
    ],
)
def test_check_plan_guard_rails(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        plan(**fields)


def test_check_plan_defaults() -> None:
    assert plan().events == 10_000 and plan(duration=5.0).events is None
    assert plan(delivery="unicast").group == "bench" and plan().group is None
    assert plan(name="bus.vm.start", allow_reserved=True).name == "bus.vm.start"


def test_recorder_matches_recording_each_value() -> None:
    rng = random.Random(7)
    direct = HdrHistogram(1, HIGHEST_US, SIGNIFICANT_FIGURES)
    recorder = Recorder()
    samples = [int(rng.lognormvariate(8, 2)) for _ in range(40_000)]
    for value in samples:
        direct.record_value(min(value, HIGHEST_US))
        recorder.append(value)
    folded = HdrHistogram.decode(recorder.encode())
    assert recorder.total == sum(min(v, HIGHEST_US) for v in samples)
    percentiles = [1.0, 50.0, 90.0, 99.0, 99.9, 100.0]
    assert folded.get_total_count() == direct.get_total_count() == 40_000
    assert folded.get_percentile_to_value_dict(percentiles) == direct.get_percentile_to_value_dict(
        percentiles
    )
    assert (folded.get_min_value(), folded.get_max_value()) == (
        direct.get_min_value(),
        direct.get_max_value(),
    )


def tally(*pairs: tuple[int, int]) -> Tally:
    result = Tally()
    for pub, seq in pairs:
        result.note(pub, seq)
    return result


def parts_of_a_unicast_run() -> tuple[BenchPlan, list[PartResult]]:
    the_plan = plan(publishers=2, listeners=2, delivery="unicast", processes=2)
    pubs = [
        PublisherResult(id=0, accepted=9, next_seq=10, in_doubt=[7]),
        PublisherResult(id=1, accepted=5, next_seq=5),
    ]
    # Two processes' shares of one group: publisher 0's 9 and publisher 1's 4
    # never arrive, 7 is in doubt (a 5xx), 5 arrives twice.
    a = tally(*((0, s) for s in range(5)), (1, 0), (1, 1))
    b = tally((0, 5), (0, 6), (0, 8), (0, 5), (1, 2), (1, 3))
    parts = [
        PartResult(
            part=i,
            publishers=[pubs[i]],
            listeners=[ListenerResult(id=i, received=sum(map(sum, t.counts.values())))],
            group_tally=t.packed(),
            measure_start_ns=1,
            publish_end_ns=2,
        )
        for i, t in enumerate((a, b))
    ]
    return the_plan, parts


@pytest.mark.parametrize("interrupted", [False, True])
def test_merge_counts_loss_and_duplicates_across_parts(interrupted: bool) -> None:
    the_plan, parts = parts_of_a_unicast_run()
    report = build_report(
        the_plan, parts, run_id="r", target="t", started="s", elapsed_s=1, interrupted=interrupted
    )
    dlv = report.delivery
    assert dlv.expected == 14 and dlv.received == 13 and dlv.duplicated == 1
    if interrupted:  # the missing ones come after the last arrival: maybe on their way
        assert (dlv.lost, dlv.in_flight) == (0, 2)
        assert report.verdict.problems == ["group bench: 0 lost, 1 duplicated"]
    else:
        assert (dlv.lost, dlv.in_flight) == (2, 0)
        assert report.verdict.problems == ["group bench: 2 lost, 1 duplicated"]
    assert not report.verdict.ok


def test_broadcast_merge_judges_each_listener() -> None:
    the_plan = plan(publishers=1, listeners=2)
    pub = PublisherResult(id=0, accepted=3, next_seq=3)
    listeners = [
        ListenerResult(id=0, received=3, tally=tally((0, 0), (0, 1), (0, 2)).packed()),
        ListenerResult(id=1, received=3, tally=tally((0, 0), (0, 2), (0, 2)).packed()),
    ]
    part = PartResult(part=0, publishers=[pub], listeners=listeners)
    report = build_report(
        the_plan, [part], run_id="r", target="t", started="s", elapsed_s=1, interrupted=False
    )
    rows = [(li.lost, li.duplicated) for li in report.delivery.listeners]
    assert rows == [(0, 0), (1, 1)]
    assert report.verdict.problems == ["listener 1: 1 lost, 1 duplicated"]
