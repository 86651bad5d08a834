"""The table's rows: which exist, what each measures, what its ratio needs, and the options.

A row is one line of the printed table and one object of the JSON report
(:class:`Row`).  :data:`ROWS` gives each row id its group (what ``--only``
also accepts) and its label; :data:`DEPENDS` says which other rows its ratio
needs, so that ``--only`` can pull them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._procs import ROOT

__all__ = [
    "DEFAULT_EVENTS",
    "DEFAULT_JSON",
    "DEPENDS",
    "LABELS",
    "QUICK_EVENTS",
    "ROWS",
    "Options",
    "Row",
    "meets",
    "register",
    "selected",
]

DEFAULT_EVENTS = 1_000_000
QUICK_EVENTS = 3_000
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "latest.json"

# (row id, group, label), in table order.
_TABLE: tuple[tuple[str, str, str], ...] = (
    # issue 3: the listen path, from the raw source server
    ("T", "transfer", "httpx aiter_raw(), no decode (transfer limit)"),
    ("T.lean", "transfer", "SDK lean transport aiter_raw(), no decode (its transfer limit)"),
    ("D", "decode", "msgspec decode_lines(Event), memory, 64 KiB"),
    ("D.check", "decode", "msgspec decode_lines(id+name check), memory"),
    ("D.feed", "decode", "SDK NDJSONDecoder.feed(Event), memory, 64 KiB"),
    ("H", "derived", "H = 1/(1/T + 1/D)"),
    ("sdk.iter", "sdk", "SDK listen: async for event in stream"),
    ("sdk.batches", "sdk", "SDK listen: stream.batches()"),
    ("sdk.raw", "sdk", "SDK listen: stream.raw_batches() (CLI path)"),
    ("cli", "cli", "bus-events listen --no-follow -o /dev/null"),
    ("httpx.lines", "peers", "httpx aiter_lines() + json.loads"),
    ("aiohttp.lines", "peers", "aiohttp line iteration + orjson"),
    ("curl.jq", "curl", "curl -sN URL | jq -c . > /dev/null"),
    ("curl", "curl", "curl -sN URL -o /dev/null"),
    # issue 14, target 3: the CLI into a pipe and into a file
    ("curl.pipe", "pipe", "curl -sN URL | wc -c"),
    ("cli.pipe", "pipe", "bus-events listen --no-follow | wc -c"),
    ("curl.file", "pipe", "curl -sN URL -o FILE"),
    ("cli.file", "pipe", "bus-events listen --no-follow -o FILE"),
    # issue 3: memory and start-up
    ("rss", "rss", "SDK listener RSS: end / early"),
    ("startup.python", "startup", "python -c pass"),
    ("startup.version", "startup", "bus-events --version"),
    ("startup.help", "startup", "bus-events --help"),
    # issue 14, target 4 (send.cli / send.python); issue 3: beside curl
    ("send.python", "send", "python -c pass (paired with send.cli)"),
    ("send.cli", "send", "bus-events send (wall)"),
    ("send.curl", "send", "curl -X POST (wall)"),
    # issue 3: connection reuse, against the source server
    ("publish.reuse", "publish", "SDK send x concurrency, one client"),
    ("publish.new-connection", "publish", "SDK send, a new connection per event"),
    ("publish.new-client", "publish", "SDK send, a new EventsClient per event"),
    # issue 14, target 1: against the reference provider
    ("publish.raw", "publish", "minimal trio publisher, 8 keep-alive sockets"),
    ("publish.sdk", "publish", "SDK EventsClient.send, 8 concurrent, one client"),
    ("publish.raw.cpu", "publish", "minimal trio publisher: client CPU per request"),
    ("publish.sdk.cpu", "publish", "SDK send: client CPU per request"),
    # issue 14, targets 2 and 6
    ("provider.wrk", "provider", "reference provider under wrk (POST, 8 connections)"),
    ("bench.cli", "bench", "bus-events bench --publishers 8 --listeners 0"),
    ("latency", "latency", "publish -> receive via reference provider"),
    (
        "latency.fanout",
        "latency",
        "publish -> SDK receive, 1,000 events/s, 10 SDK listeners in 2 processes "
        "(listener decode and CPU share included; provider alone: scale.fanout)",
    ),
    # issue 20: the subscription hub (benchmarks/scale.py)
    ("scale.idle", "scale", "idle following streams: provider RSS per stream"),
    ("scale.fanout", "scale", "publish -> receive, 1,000 events/s, 100 raw listeners"),
    # issue 14, item 7: the peer
    ("nats.pub", "nats", "nats-py publish (fire and forget, 200 B)"),
    ("nats.jspub", "nats", "nats-py JetStream publish (acked), 8 concurrent"),
    ("nats.sub", "nats", "nats-py subscriber, publisher in another process"),
    # issue 20, item 6
    ("cluster.publish", "cluster", "publish via a 3-master Redis Cluster / single Redis"),
)

#: Row ids in table order, with the group ``--only`` also accepts.
ROWS: dict[str, str] = {row: group for row, group, _ in _TABLE}
LABELS: dict[str, str] = {row: label for row, _, label in _TABLE}

#: What a row's ratio needs measured too (``--only`` pulls these in).
DEPENDS: dict[str, tuple[str, ...]] = {
    "H": ("T", "D"),
    "sdk.iter": ("H",),
    "sdk.batches": ("H",),
    "sdk.raw": ("T", "D.check"),
    "D.feed": ("D",),
    "cli": ("D", "T", "D.check", "T.lean"),
    "httpx.lines": ("sdk.iter",),
    "aiohttp.lines": ("sdk.iter", "sdk.batches"),
    "curl.jq": ("cli",),
    "curl": ("T",),
    "cli.pipe": ("curl.pipe",),
    "cli.file": ("curl.file", "curl.pipe"),
    "startup.version": ("startup.python",),
    "startup.help": ("startup.python",),
    "send.cli": ("send.python", "send.curl"),
    "publish.new-connection": ("publish.reuse",),
    "publish.new-client": ("publish.reuse",),
    "publish.sdk": ("publish.raw",),
    "publish.sdk.cpu": ("publish.raw.cpu",),
    "publish.raw.cpu": ("publish.raw",),
    "bench.cli": ("provider.wrk",),
    "nats.pub": ("publish.sdk",),
    "nats.jspub": ("publish.sdk",),
    "nats.sub": ("sdk.batches",),
}


def register(
    table: tuple[tuple[str, str, str], ...], depends: dict[str, tuple[str, ...]] | None = None
) -> None:
    """Add rows (id, group, label) of a row module to the catalogue (see ``_registry``)."""
    for row, group, label in table:
        ROWS[row] = group
        LABELS[row] = label
    DEPENDS.update(depends or {})


@dataclass
class Options:
    """What to run and how much."""

    events: int = DEFAULT_EVENTS
    quick: bool = False
    json_path: Path = DEFAULT_JSON
    only: set[str] | None = None
    rounds: int = 3
    repeats: int = 2  # streams per worker per round, for the interleaved rows (best kept)
    slow_events: int = DEFAULT_EVENTS // 8
    rss_events: int = 5 * DEFAULT_EVENTS
    rss_early: int = DEFAULT_EVENTS // 10
    startup_runs: int = 7
    send_runs: int = 9
    publish_count: int = 1000
    publish_concurrency: int = 16
    provider_publish_count: int = 4000  # per row of issue 14's publish rows
    provider_connections: int = 8
    wrk_seconds: float = 8.0
    bench_events: int = 8000
    latency_count: int = 500
    latency_interval: float = 0.004
    fanout_listeners: int = 10
    fanout_rate: float = 1000.0
    fanout_seconds: float = 5.0
    nats_events: int = 200_000
    install_tools: bool = True  # apt-get install wrk when missing (root only)
    worker_timeout: float = 300.0

    @classmethod
    def build(
        cls, events: int | None, quick: bool, json_path: Path, only: set[str] | None
    ) -> Options:
        n = events if events is not None else QUICK_EVENTS if quick else DEFAULT_EVENTS
        if quick:
            return cls(
                events=n,
                quick=True,
                json_path=json_path,
                only=only,
                rounds=1,
                repeats=1,
                slow_events=n,
                rss_events=5 * n,
                rss_early=max(1, n // 10),
                startup_runs=1,
                send_runs=1,
                publish_count=60,
                publish_concurrency=4,
                provider_publish_count=80,
                wrk_seconds=1.0,
                bench_events=200,
                latency_count=20,
                latency_interval=0.002,
                fanout_listeners=2,
                fanout_rate=200.0,
                fanout_seconds=0.5,
                nats_events=n,
                install_tools=False,
                worker_timeout=60.0,
            )
        return cls(
            events=n,
            json_path=json_path,
            only=only,
            slow_events=max(1, n // 8),
            rss_events=5 * n,
            rss_early=max(1, n // 10),
        )


@dataclass
class Row:
    """One row of the table: a measure, what it is compared with, and whether it met its target."""

    id: str
    label: str
    value: float | None = None  # events/s, seconds, ratio of RSS, …
    unit: str = "events/s"
    events: int | None = None
    seconds: float | None = None
    mb_per_s: float | None = None
    ratio: float | None = None
    ratio_cpu: float | None = None  # the same ratio from events per CPU-second of the client
    ratio_of: str | None = None
    target: str | None = None
    met: bool | None = None
    intact: bool | None = None
    note: str = ""
    error: str | None = None
    skipped: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, row: str, **fields: Any) -> Row:
        """A row with its catalogue label."""
        return cls(row, LABELS[row], **fields)

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def usable(self) -> bool:
        """Whether this row has a value to compare with."""
        return self.error is None and self.skipped is None and bool(self.value)


def selected(only: set[str] | None) -> list[str]:
    """Row ids to run: everything, or the ``--only`` rows/groups and what their ratios need."""
    if not only:
        return list(ROWS)
    wanted: set[str] = set()
    for token in only:
        matches = [r for r, g in ROWS.items() if token in (r, g)]
        if not matches:
            known = ", ".join(sorted(set(ROWS) | set(ROWS.values())))
            raise SystemExit(f"--only {token!r}: unknown row or group (known: {known})")
        wanted.update(matches)
    todo = list(wanted)
    while todo:
        for dep in DEPENDS.get(todo.pop(), ()):
            if dep not in wanted:
                wanted.add(dep)
                todo.append(dep)
    return [r for r in ROWS if r in wanted]


def meets(value: float | None, target: str | None) -> bool | None:
    """Whether ``value`` meets ``target`` (``">= 0.9"``, ``"<= 3"``, ``"< 0.005"``)."""
    if value is None or target is None:
        return None
    op, _, bound = target.partition(" ")
    limit = float(bound)
    if op == ">=":
        return value >= limit
    if op == "<=":
        return value <= limit
    if op == "<":
        return value < limit
    raise ValueError(f"unknown target operator in {target!r}")
