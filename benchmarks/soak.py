"""Soak: what users run, for as long as asked, while a fault proxy breaks connections.

    python -m benchmarks.soak --minutes 30 [--rate 10] [--json out.json]

Runs, against ``bus-events serve`` (memory backend) behind
:class:`benchmarks._fault_proxy.FaultProxy` on 127.0.0.1:

* publishers sending numbered events (``soak.tick``, payload ``{"seq": n}``)
  at a steady total rate, with ``publish(retries=…)``;
* a :class:`WorkerHost` with two workers in one unicast group (each handled
  event is answered with a reply, so worker replies run through refresh too);
* a broadcast SDK listener with replay-on-reconnect (a broadcast ``Worker``
  with ``replay=True`` and a de-duplication window larger than the run);
* ``bus-events listen --retry --replay -o FILE`` as a subprocess.

Every client reads its token from one token file with refresh on
(``BUS_EVENTS_TOKEN_REFRESH=1``); the harness mints tokens with a short TTL and
rewrites the file every ``--rotate`` seconds.  The chaos driver cuts a random
connection every few seconds and stalls others.

At the end the provider's own history (read directly, not through the proxy)
is the truth: for each consumer the report counts events **lost** (stored,
never received), **duplicated** (received more than once, by id) and
**out of order** (an id lower than one received before it).  Targets: the
broadcast listener and the CLI file lose and duplicate nothing; the unicast
workers duplicate nothing, and lose only events in flight on a connection that
was cut (unicast delivery is at most once: an event handed to a connection
that dies before the worker reads it is gone), counted as *explained* when the
event was accepted within ``--explain-window`` seconds of a cut of a unicast
stream.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from busevents import Event, EventsClient, Publisher, RetryPolicy, Worker, WorkerHost, find_token
from busevents.provider import mint_token

from ._fault_proxy import FaultProxy

NAME = "soak.tick"
REPLY = "soak.tock"
SCOPES = "events:send events:listen"


@dataclass
class Options:
    seconds: float = 60.0
    rate: float = 10.0  # events per second, all publishers together
    publishers: int = 2
    token_ttl: float = 20.0
    rotate: float = 10.0
    cut_every: float = 4.0
    stall_every: float = 6.0
    stall_max: float = 3.0
    drain: float = 30.0
    explain_window: float = 5.0
    seed: int | None = None


@dataclass
class ConsumerFigures:
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    lost_explained: int | None = None
    #: For lost events: seconds from acceptance to the nearest cut of a unicast stream.
    lost_to_nearest_cut: list[float] = field(default_factory=list)


@dataclass
class Report:
    duration_s: float = 0.0
    rate_per_s: float = 0.0
    events_published: int = 0  # stored by the provider (the truth)
    publish_gave_up: int = 0
    replies_failed: int = 0
    publisher_duplicates: int = 0  # one seq stored twice: a retried publish whose answer was lost
    connections: int = 0
    connections_cut: int = 0
    cuts_by_kind: dict[str, int] = field(default_factory=dict)
    stalls: int = 0
    token_rotations: int = 0
    token_refreshes_sdk: int = 0
    consumers: dict[str, ConsumerFigures] = field(default_factory=dict)

    def ok(self) -> bool:
        """The targets: nothing lost or duplicated by broadcast/CLI, nothing duplicated
        and no unexplained loss by the workers."""
        b, c, w = (self.consumers[k] for k in ("broadcast-sdk", "cli-file", "workers"))
        return (
            b.lost == b.duplicated == c.lost == c.duplicated == w.duplicated == 0
            and (w.lost_explained or 0) == w.lost
        )

    def text(self) -> str:
        lines = [
            f"duration            {self.duration_s:.0f} s",
            f"events published    {self.events_published} "
            f"({self.rate_per_s:g}/s; publishes given up {self.publish_gave_up}, "
            f"stored twice by a retried publish {self.publisher_duplicates}; "
            f"worker replies failed {self.replies_failed})",
            f"connections cut     {self.connections_cut} of {self.connections} "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.cuts_by_kind.items())),
            f"stalls              {self.stalls}",
            f"token rotations     {self.token_rotations} (SDK client refreshes "
            f"{self.token_refreshes_sdk})",
            "",
            f"{'consumer':<16}{'received':>10}{'lost':>8}{'dup':>6}{'out-of-order':>14}"
            f"{'lost explained':>16}",
        ]
        for name, c in self.consumers.items():
            explained = "-" if c.lost_explained is None else str(c.lost_explained)
            lines.append(
                f"{name:<16}{c.received:>10}{c.lost:>8}{c.duplicated:>6}{c.out_of_order:>14}"
                f"{explained:>16}"
            )
        lines.append("")
        lines.append("targets met" if self.ok() else "TARGETS MISSED")
        return "\n".join(lines)


def _id_key(event_id: str) -> tuple[int, ...]:
    """The reference provider's ids ``<ms>-<seq>`` compare as integer pairs."""
    try:
        return tuple(int(part) for part in event_id.split("-"))
    except ValueError:
        return (0,)


def _figures(truth: list[str], received: list[str]) -> ConsumerFigures:
    stored = set(truth)
    counts = Counter(received)
    out_of_order, highest = 0, (-1,)
    for event_id in received:
        key = _id_key(event_id)
        if key < highest:
            out_of_order += 1
        highest = max(highest, key)
    return ConsumerFigures(
        received=len(received),
        lost=len(stored - counts.keys()),
        duplicated=sum(n - 1 for n in counts.values() if n > 1),
        out_of_order=out_of_order,
    )


class Soak:
    def __init__(self, options: Options, workdir: Path) -> None:
        self.o = options
        self.rng = random.Random(options.seed)
        self.workdir = workdir
        self.secret = secrets.token_hex(32)
        self.token_file = workdir / "token"
        self.rotations = 0
        self.report = Report(rate_per_s=options.rate)
        self.worker_ids: list[str] = []
        self.broadcast_ids: list[str] = []
        self.sdk_clients: list[EventsClient] = []

    # -- pieces -----------------------------------------------------------------

    def write_token(self) -> None:
        token = mint_token(
            self.secret.encode(), subject="soak", scopes=SCOPES, ttl=self.o.token_ttl
        )
        tmp = self.token_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        os.replace(tmp, self.token_file)  # readers see the old or the new token, never half

    async def rotate_tokens(self) -> None:
        while True:
            await trio.sleep(self.o.rotate)
            self.write_token()
            self.rotations += 1

    def client(self, url: str) -> EventsClient:
        client = EventsClient(url, find_token(self.token_file), token_refresh=True, timeout=10)
        self.sdk_clients.append(client)
        return client

    async def publisher(self, url: str, index: int, seqs: trio.MemoryReceiveChannel[int]) -> None:
        async with self.client(url) as client:
            async for seq in seqs:
                await self._publish(client, seq)

    async def _publish(self, client: EventsClient, seq: int) -> None:
        from busevents import BusEventsError, PublishRequest

        request = PublishRequest(name=NAME, payload=_raw({"seq": seq}), correlation_id=f"seq-{seq}")
        try:
            await client.publish(request, retries=10)
        except BusEventsError as exc:
            self.report.publish_gave_up += 1
            print(f"soak: publish of seq {seq} gave up: {exc}", file=sys.stderr)

    async def publish_steadily(self, url: str, until: float) -> None:
        send, receive = trio.open_memory_channel[int](1000)
        async with trio.open_nursery() as nursery:
            for i in range(self.o.publishers):
                nursery.start_soon(self.publisher, url, i, receive.clone())
            receive.close()
            async with send:
                seq, start = 0, trio.current_time()
                while trio.current_time() < until:
                    seq += 1
                    await send.send(seq)
                    await trio.sleep_until(start + seq / self.o.rate)

    async def run_workers(self, url: str, *, task_status: trio.TaskStatus[None]) -> None:
        async def work(event: Event, publisher: Publisher) -> None:
            from busevents import BusEventsError

            self.worker_ids.append(event.id)
            try:
                await publisher.reply(event, REPLY, {"done": event.id})
            except BusEventsError:
                self.report.replies_failed += 1  # a cut publish connection; not retried

        async def watch(event: Event, publisher: Publisher) -> None:
            self.broadcast_ids.append(event.id)

        fast = RetryPolicy(min_delay=0.2, max_delay=2.0)
        async with self.client(url) as client:
            host = WorkerHost(
                client,
                [
                    Worker(NAME, work, delivery="unicast", group="soak", consumer="w1", label="w1"),
                    Worker(NAME, work, delivery="unicast", group="soak", consumer="w2", label="w2"),
                    Worker(NAME, watch, replay=True, dedup_window=10_000_000, label="broadcast"),
                ],
                retry=fast,
                handle_signals=False,
            )
            await host.run(task_status=task_status)

    async def run(self) -> Report:
        o = self.o
        self.write_token()
        env = {**os.environ, "BUS_API_JWT_SECRET": self.secret}
        env.pop("BUS_API_TOKEN", None)
        upstream = _free_port()
        provider = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "busevents",
                "serve",
                "--addr",
                f"127.0.0.1:{upstream}",
                "--history",
                "10000000",
            ],
            env=env,
            stderr=subprocess.PIPE,
        )
        cli: trio.Process | None = None
        started = time.monotonic()
        try:
            proxy = FaultProxy(upstream, rng=self.rng)
            async with trio.open_nursery() as nursery:
                port = await nursery.start(proxy.serve)
                url = f"http://127.0.0.1:{port}/api/v1/events"
                nursery.start_soon(self.rotate_tokens)
                out_file = self.workdir / "cli.ndjson"
                # Started while the provider starts: it retries until the API is up.
                cli = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        "-m",
                        "busevents",
                        "--api-url",
                        url,
                        "--token-file",
                        str(self.token_file),
                        "-o",
                        str(out_file),
                        "listen",
                        "--name",
                        NAME,
                        "--retry",
                        "--replay",
                    ],
                    env={
                        **env,
                        "BUS_EVENTS_TOKEN_REFRESH": "1",
                        "BUS_EVENTS_LISTENER_RETRY_MIN": "200ms",
                        "BUS_EVENTS_LISTENER_RETRY_MAX": "2s",
                    },
                    stderr=open(self.workdir / "cli.stderr", "wb"),  # noqa: SIM115, ASYNC230
                )
                provider_url = await _serving_url(provider)
                await nursery.start(self.run_workers, url)
                await _wait_for(lambda: out_file.exists(), 30)
                await trio.sleep(1)  # the CLI's stream is subscribed once its file exists
                nursery.start_soon(
                    lambda: proxy.chaos(
                        cut_every=o.cut_every, stall_every=o.stall_every, stall_max=o.stall_max
                    )
                )
                _phase(started, "consumers ready; publishing")
                publishing = time.monotonic()
                await self.publish_steadily(url, trio.current_time() + o.seconds)
                _phase(started, "published; draining")
                self.report.duration_s = time.monotonic() - publishing
                truth = await _history(provider_url, self.secret)
                await self._drain(truth, out_file)
                _phase(started, "drained; stopping")
                nursery.cancel_scope.cancel()
            cli.send_signal(signal.SIGINT)
            with trio.move_on_after(5):
                await cli.wait()
            received_cli = [json.loads(x)["id"] for x in out_file.read_bytes().splitlines() if x]
        finally:
            for proc in (cli, provider):
                if proc is not None and proc.returncode is None:
                    proc.kill()  # the memory provider has nothing to save; the CLI flushed
                    with trio.CancelScope(shield=True):
                        await proc.wait()
        self._fill(truth, received_cli, proxy)
        return self.report

    async def _drain(self, truth: list[tuple[str, int, float]], out_file: Path) -> None:
        """Let every consumer catch up (at most ``--drain`` seconds)."""
        ids = {i for i, _, _ in truth}
        with trio.move_on_after(self.o.drain):
            while True:
                cli = (await trio.Path(out_file).read_bytes()).count(b"\n")
                if len(ids - set(self.broadcast_ids)) == 0 and cli >= len(ids):
                    break
                await trio.sleep(0.5)
        # Workers: until nothing more arrived for longer than a stall and a reconnect.
        last, changed = len(self.worker_ids), trio.current_time()
        while trio.current_time() - changed < self.o.stall_max + 1:
            await trio.sleep(0.25)
            if len(self.worker_ids) != last:
                last, changed = len(self.worker_ids), trio.current_time()

    def _fill(self, truth: list[tuple[str, int, float]], cli: list[str], proxy: FaultProxy) -> None:
        r = self.report
        ids = [i for i, _, _ in truth]
        r.events_published = len(ids)
        r.publisher_duplicates = len(ids) - len({seq for _, seq, _ in truth})
        r.connections = proxy.connections
        r.connections_cut = len(proxy.cuts)
        r.cuts_by_kind = proxy.cut_counts()
        r.stalls = proxy.stalls
        r.token_rotations = self.rotations
        r.token_refreshes_sdk = sum(c.token_refreshes for c in self.sdk_clients)
        r.consumers["broadcast-sdk"] = _figures(ids, self.broadcast_ids)
        r.consumers["cli-file"] = _figures(ids, cli)
        workers = _figures(ids, self.worker_ids)
        workers.out_of_order = 0  # two competing workers: order across them means nothing
        times = {i: t for i, _, t in truth}
        unicast_cuts = [c.wall for c in proxy.cuts if c.kind == "stream-unicast"]
        window = self.o.explain_window + self.o.stall_max
        lost = set(ids) - set(self.worker_ids)
        workers.lost_to_nearest_cut = sorted(
            round(min((times.get(i, 0) - cut for cut in unicast_cuts), key=abs, default=1e9), 2)
            for i in lost
        )
        workers.lost_explained = sum(
            1
            for i in lost
            if any(
                cut - window <= times.get(i, 0) <= cut + self.o.explain_window
                for cut in unicast_cuts
            )
        )
        r.consumers["workers"] = workers


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _phase(started: float, what: str) -> None:
    print(f"soak: {time.monotonic() - started:6.1f}s {what}", file=sys.stderr, flush=True)


def _raw(value: Any) -> Any:
    import msgspec

    return msgspec.Raw(msgspec.json.encode(value))


async def _serving_url(proc: trio.Process) -> str:
    import re

    assert proc.stderr is not None
    seen = b""
    with trio.fail_after(30):
        while not (match := re.search(rb"on (http://\S+/api/v1/events)", seen)):
            chunk = await proc.stderr.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"bus-events serve ended: {seen.decode(errors='replace')}")
            seen += chunk

    async def discard() -> None:  # keep its stderr pipe from filling up
        assert proc.stderr is not None
        while await proc.stderr.receive_some(65536):
            pass

    trio.lowlevel.spawn_system_task(discard)
    return match.group(1).decode()


async def _wait_for(condition: Any, seconds: float) -> None:
    with trio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 (a file appearing has no event to wait on)
            await trio.sleep(0.05)


async def _history(url: str, secret: str) -> list[tuple[str, int, float]]:
    """The provider's stored ``soak.tick`` events: (id, seq, accepted at), in stored
    order, read directly (not through the proxy)."""
    token = mint_token(secret.encode(), subject="soak", scopes=SCOPES, ttl=600)
    out: list[tuple[str, int, float]] = []
    async with (
        EventsClient(url, token) as client,
        client.listen(NAME, replay=True, follow=False) as stream,
    ):
        async for event in stream:
            seq = json.loads(bytes(event.payload))["seq"]
            out.append((event.id, seq, _wall(event.time)))
    return out


def _wall(rfc3339: str | None) -> float:
    from datetime import datetime

    if not rfc3339:
        return 0.0
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=1.0, help="how long to publish")
    parser.add_argument("--rate", type=float, default=10.0, help="events per second in all")
    parser.add_argument("--token-ttl", type=float, default=20.0, help="seconds a token lives")
    parser.add_argument("--rotate", type=float, default=10.0, help="seconds between new tokens")
    parser.add_argument("--cut-every", type=float, default=4.0, help="mean seconds between cuts")
    parser.add_argument(
        "--stall-every", type=float, default=6.0, help="mean seconds between stalls"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    args = parser.parse_args(argv)
    options = Options(
        seconds=args.minutes * 60,
        rate=args.rate,
        token_ttl=args.token_ttl,
        rotate=args.rotate,
        cut_every=args.cut_every,
        stall_every=args.stall_every,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="busevents-soak-") as tmp:
        report = trio.run(Soak(options, Path(tmp)).run)
    print(report.text())
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
