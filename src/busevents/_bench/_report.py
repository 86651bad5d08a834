"""The report of ``bus-events bench``: what each part measured, merged, with its verdict.

A bench run is made of *parts* (one per process); each part hands back a
:class:`PartResult` — counters, encoded HdrHistograms and the tallies of which
sequence numbers each receiver got — and :func:`build_report` merges the parts
into one :class:`BenchReport` with its verdict.  Everything here is plain data
plus arithmetic, so the merge is the same whether the parts ran in this
process or in worker processes (their results travel as JSON).

Latencies are microseconds, from HdrHistograms (:mod:`busevents._bench._stats`).
"""

from __future__ import annotations

from collections import Counter

import msgspec

from .._contracts import Delivery
from ._stats import Tally, hdr_histogram_class, new_histogram

__all__ = [
    "BenchPlan",
    "BenchReport",
    "DeliverySummary",
    "Latency",
    "ListenerResult",
    "ListenerStats",
    "PartResult",
    "PublishSummary",
    "PublisherResult",
    "PublisherStats",
    "Verdict",
    "build_report",
]


class BenchPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What a bench run does; see :func:`busevents._bench.check_plan` for the rules.

    ``events`` is the number of *measured* events (after the warmup), split
    among the publishers; ``duration`` the measured publishing time in seconds;
    exactly one of them is set once the plan is checked.  ``rate`` is the total
    events/s of all publishers (``None``: as fast as the deployment answers).
    ``listener_delay`` pauses each listener after every read, to play a slow
    consumer.
    """

    name: str
    publishers: int = 1
    listeners: int = 1
    delivery: Delivery = Delivery.BROADCAST
    group: str | None = None
    events: int | None = None
    duration: float | None = None
    rate: float | None = None
    payload_size: int = 256
    warmup: float = 1.0
    processes: int = 1
    listener_delay: float = 0.0
    allow_reserved: bool = False


# -- what a part hands back -------------------------------------------------------


class PublisherResult(msgspec.Struct, kw_only=True):
    """One publisher's counters.

    ``next_seq`` is the first sequence number it did not use; ``in_doubt`` the
    sequence numbers whose publish failed in a way that leaves it unknown
    whether the event was stored (5xx, network failure).  ``last_ns`` is the
    wall-clock time of its last measured acceptance (0: none).
    """

    id: int
    attempted: int = 0
    accepted: int = 0
    warmup_accepted: int = 0
    next_seq: int = 0
    in_doubt: list[int] = msgspec.field(default_factory=list)
    errors: dict[str, int] = msgspec.field(default_factory=dict)
    last_ns: int = 0
    latency: bytes = b""
    latency_sum_us: int = 0


class ListenerResult(msgspec.Struct, kw_only=True):
    """One listener's counters; ``tally`` is its own (broadcast) or ``None`` (unicast)."""

    id: int
    received: int = 0
    warmup_received: int = 0
    foreign: int = 0
    out_of_order: int = 0
    ended_early: str | None = None
    last_ns: int = 0
    latency: bytes = b""
    latency_sum_us: int = 0
    tally: dict[int, bytes] | None = None


class PartResult(msgspec.Struct, kw_only=True):
    """What one part (process) of a run hands back.

    ``measure_start_ns`` is when the warmup ended and ``publish_end_ns`` when
    the part's publishers stopped (wall clock, ns; 0: not reached).
    """

    part: int
    publishers: list[PublisherResult]
    listeners: list[ListenerResult]
    group_tally: dict[int, bytes] | None = None
    measure_start_ns: int = 0
    publish_end_ns: int = 0


# -- the report ------------------------------------------------------------------


class Latency(msgspec.Struct, kw_only=True, omit_defaults=True, rename={"p99_9": "p99.9"}):
    """Latency percentiles in microseconds; ``hdr`` is the encoded HdrHistogram."""

    count: int = 0
    min: int = 0
    mean: float = 0.0
    p50: int = 0
    p90: int = 0
    p99: int = 0
    p99_9: int = 0
    max: int = 0
    hdr: str = ""


class PublisherStats(msgspec.Struct, kw_only=True):
    """One publisher in the report (measured events only)."""

    id: int
    accepted: int
    errors: int
    events_per_s: float


class PublishSummary(msgspec.Struct, kw_only=True):
    """Publishing: measured acceptances, errors by status, request round-trip latency."""

    attempted: int
    accepted: int
    warmup_accepted: int
    in_doubt: int
    errors: dict[str, int]
    window_s: float
    events_per_s: float
    latency_us: Latency
    publishers: list[PublisherStats]


class ListenerStats(msgspec.Struct, kw_only=True):
    """One listener in the report; ``lost``/``duplicated`` are per listener in broadcast."""

    id: int
    received: int
    events_per_s: float
    lost: int
    duplicated: int
    out_of_order: int
    ended_early: str | None
    latency_us: Latency


class DeliverySummary(msgspec.Struct, kw_only=True):
    """Delivery: what the listeners got, end-to-end latency, and the integrity counts.

    ``expected`` is how many events each receiver should get (every listener
    in broadcast, the group as a whole in unicast), warmup included.
    ``in_flight`` counts events after the last one a receiver got when the run
    was interrupted (not counted as lost).  ``foreign`` counts events on the
    name that this run did not publish (ignored).
    """

    mode: str
    group: str | None
    receivers: int
    expected: int
    received: int
    warmup_received: int
    window_s: float
    events_per_s: float
    lost: int
    duplicated: int
    out_of_order: int
    in_flight: int
    foreign: int
    latency_us: Latency
    listeners: list[ListenerStats]


class Verdict(msgspec.Struct, kw_only=True):
    """``ok`` is false when an event was lost or duplicated; ``problems`` says where."""

    ok: bool
    checked: bool
    problems: list[str]


class BenchReport(msgspec.Struct, kw_only=True):
    """The whole report of a run, as ``-f json`` and ``--report`` write it."""

    version: int = 1
    tool: str = "bus-events bench"
    run_id: str
    target: str
    started: str
    interrupted: bool
    elapsed_s: float
    plan: BenchPlan
    publish: PublishSummary
    delivery: DeliverySummary
    verdict: Verdict


def _latency(recorded: list[tuple[bytes, int]], *, keep_hdr: bool) -> Latency:
    """Percentiles of the encoded histograms added up; the mean from their exact sums."""
    cls = hdr_histogram_class()
    total = new_histogram()
    for blob, _ in recorded:
        if blob:
            total.add(cls.decode(blob))
    count = int(total.get_total_count())
    if not count:
        return Latency()
    values = total.get_percentile_to_value_dict([50.0, 90.0, 99.0, 99.9])
    return Latency(
        count=count,
        min=int(total.get_min_value()),
        mean=round(sum(total_us for _, total_us in recorded) / count, 1),
        p50=int(values[50.0]),
        p90=int(values[90.0]),
        p99=int(values[99.0]),
        p99_9=int(values[99.9]),
        max=int(total.get_max_value()),
        hdr=total.encode().decode("ascii") if keep_hdr else "",
    )


def _rate(events: int, start_ns: int, end_ns: int) -> float:
    seconds = (end_ns - start_ns) / 1e9
    return round(events / seconds, 1) if events and seconds > 0 else 0.0


class _Check:
    """Loss and duplication of one receiver, against what the publishers had accepted."""

    def __init__(self, tally: Tally, publishers: list[PublisherResult], interrupted: bool) -> None:
        self.lost = self.duplicated = self.in_flight = 0
        for pub in publishers:
            counts = tally.counts.get(pub.id, bytearray())
            window = counts[: pub.next_seq]
            window.extend(bytes(pub.next_seq - len(window)))
            # Sequence numbers whose fate is unknown are neither lost nor expected.
            doubt = [seq for seq in pub.in_doubt if not window[seq]]
            if interrupted:
                # Events after the last one that arrived may still be on their way.
                reached = len(window.rstrip(b"\0"))
                self.in_flight += pub.next_seq - reached - sum(seq >= reached for seq in doubt)
                self.lost += window[:reached].count(0) - sum(seq < reached for seq in doubt)
            else:
                self.lost += window.count(0) - len(doubt)
        received = sum(sum(c) for c in tally.counts.values())
        self.duplicated = received - tally.unique


def build_report(
    plan: BenchPlan,
    parts: list[PartResult],
    *,
    run_id: str,
    target: str,
    started: str,
    elapsed_s: float,
    interrupted: bool,
) -> BenchReport:
    """Merge the parts of a run into its report and verdict."""
    publishers = sorted((p for part in parts for p in part.publishers), key=lambda p: p.id)
    listeners = sorted((li for part in parts for li in part.listeners), key=lambda li: li.id)
    starts = [part.measure_start_ns for part in parts if part.measure_start_ns]
    measure_start = min(starts) if starts else 0
    publish_end = max((part.publish_end_ns for part in parts), default=0)
    expected = sum(p.accepted + p.warmup_accepted for p in publishers)

    errors: Counter[str] = Counter()
    for p in publishers:
        errors.update(p.errors)
    accepted = sum(p.accepted for p in publishers)
    publish = PublishSummary(
        attempted=sum(p.attempted for p in publishers),
        accepted=accepted,
        warmup_accepted=sum(p.warmup_accepted for p in publishers),
        in_doubt=sum(len(p.in_doubt) for p in publishers),
        errors=dict(sorted(errors.items())),
        window_s=round(max(0, publish_end - measure_start) / 1e9, 3),
        events_per_s=_rate(accepted, measure_start, publish_end),
        latency_us=_latency([(p.latency, p.latency_sum_us) for p in publishers], keep_hdr=True),
        publishers=[
            PublisherStats(
                id=p.id,
                accepted=p.accepted,
                errors=sum(p.errors.values()),
                events_per_s=_rate(p.accepted, measure_start, p.last_ns),
            )
            for p in publishers
        ],
    )

    unicast = plan.delivery is Delivery.UNICAST
    problems: list[str] = []
    rows: list[ListenerStats] = []
    lost = duplicated = in_flight = 0
    for li in listeners:
        row_lost = row_dup = 0
        if li.tally is not None:
            check = _Check(Tally.merge([li.tally]), publishers, interrupted)
            row_lost, row_dup = check.lost, check.duplicated
            lost, duplicated, in_flight = (
                lost + check.lost,
                duplicated + check.duplicated,
                in_flight + check.in_flight,
            )
            if check.lost or check.duplicated:
                problems.append(
                    f"listener {li.id}: {check.lost} lost, {check.duplicated} duplicated"
                )
        rows.append(
            ListenerStats(
                id=li.id,
                received=li.received,
                events_per_s=_rate(li.received, measure_start, li.last_ns),
                lost=row_lost,
                duplicated=row_dup,
                out_of_order=li.out_of_order,
                ended_early=li.ended_early,
                latency_us=_latency([(li.latency, li.latency_sum_us)], keep_hdr=False),
            )
        )
        if li.ended_early:
            problems.append(f"listener {li.id}: {li.ended_early}")
    if unicast and listeners:
        packed = [part.group_tally for part in parts if part.group_tally is not None]
        check = _Check(Tally.merge(packed), publishers, interrupted)
        lost, duplicated, in_flight = check.lost, check.duplicated, check.in_flight
        if lost or duplicated:
            problems.insert(0, f"group {plan.group}: {lost} lost, {duplicated} duplicated")
    received = sum(li.received for li in listeners)
    last_receive = max((li.last_ns for li in listeners), default=0)
    delivery = DeliverySummary(
        mode=plan.delivery.value,
        group=plan.group,
        receivers=(1 if listeners else 0) if unicast else len(listeners),
        expected=expected,
        received=received,
        warmup_received=sum(li.warmup_received for li in listeners),
        window_s=round(max(0, last_receive - measure_start) / 1e9, 3),
        events_per_s=_rate(received, measure_start, last_receive),
        lost=lost,
        duplicated=duplicated,
        out_of_order=sum(li.out_of_order for li in listeners),
        in_flight=in_flight,
        foreign=sum(li.foreign for li in listeners),
        latency_us=_latency([(li.latency, li.latency_sum_us) for li in listeners], keep_hdr=True),
        listeners=rows,
    )
    return BenchReport(
        run_id=run_id,
        target=target,
        started=started,
        interrupted=interrupted,
        elapsed_s=round(elapsed_s, 3),
        plan=plan,
        publish=publish,
        delivery=delivery,
        verdict=Verdict(ok=not (lost or duplicated), checked=bool(listeners), problems=problems),
    )
