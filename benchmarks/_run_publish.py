"""Publishing workers (run by :mod:`._run`): the SDK, a minimal trio publisher, latency.

Every kind takes its parameters as a dict and returns its result as a dict.
CPU figures are this process's user + system time (``time.process_time``)
over the timed section: what a request costs the publishing client.
"""

from __future__ import annotations

import sys
from typing import Any
from urllib.parse import urlsplit

from ._timer import Timer, now_ns

__all__ = ["KINDS"]

Params = dict[str, Any]
Result = dict[str, Any]


def _publish(params: Params) -> Result:
    """SDK: publish ``count`` events with ``concurrency`` tasks to ``url``.

    ``mode``: ``reuse`` (one client, its pooled connections), ``new-connection``
    (one client, no keep-alive: a TCP connection per event) or ``new-client``
    (an ``EventsClient`` built and closed per event, as a naive script would).
    Before timing, a reused client opens ``concurrency`` connections.
    """
    import httpx
    import trio

    from busevents import EventsClient

    url, token, mode = params["url"], params["token"], params["mode"]
    total, concurrency = params["count"], params["concurrency"]
    name = "bench.publish"

    def make_client() -> EventsClient:
        if mode == "new-connection":
            transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_keepalive_connections=0))
            return EventsClient(url, token, transport=transport)
        return EventsClient(url, token)

    async def main() -> Result:
        next_index = 0
        accepted = 0
        shared = make_client() if mode != "new-client" else None

        async def worker() -> None:
            nonlocal next_index, accepted
            while next_index < total:
                index = next_index
                next_index += 1
                if shared is not None:
                    reply = await shared.send(name, {"i": index, "ok": True})
                else:
                    async with EventsClient(url, token) as client:
                        reply = await client.send(name, {"i": index, "ok": True})
                accepted += reply.accepted

        try:
            if shared is not None:  # connect before timing
                async with trio.open_nursery() as nursery:
                    for _ in range(concurrency):
                        nursery.start_soon(shared.send, name, {"warmup": True})
            timer = Timer()
            with timer:
                async with trio.open_nursery() as nursery:
                    for _ in range(concurrency):
                        nursery.start_soon(worker)
        finally:
            if shared is not None:
                await shared.aclose()
        return {**timer.best(), "events": accepted, "last_id": None}

    result: Result = trio.run(main)
    return result


class _RawConnection:
    """One keep-alive HTTP/1.1 connection, as little as publishing needs: the whole request
    in one ``send_all``, the response's status line and Content-Length parsed, its body read."""

    def __init__(self, stream: Any, request_head: bytes) -> None:
        self.stream = stream
        self.head = request_head
        self.buffer = b""

    async def post(self, body: bytes) -> int:
        """Send one POST; return the response's status code once its body has arrived."""
        await self.stream.send_all(self.head % len(body) + body)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self.buffer += await self._more()
        head, rest = self.buffer[:end], self.buffer[end + 4 :]
        status = int(head[9:12])
        length = 0
        at = head.lower().find(b"content-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at)
            length = int(head[at + 15 : stop if stop >= 0 else len(head)])
        while len(rest) < length:
            rest += await self._more()
        self.buffer = rest[length:]
        return status

    async def _more(self) -> bytes:
        data: bytes = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("the provider closed the connection")
        return data


async def _raw_connections(url: str, token: str, count: int) -> list[_RawConnection]:
    import trio

    parts = urlsplit(url)
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        "Content-Length: %d\r\n\r\n"
    ).encode()
    return [
        _RawConnection(await trio.open_tcp_stream(parts.hostname, parts.port or 80), head)
        for _ in range(count)
    ]


def _publish_raw(params: Params) -> Result:
    """A minimal trio publisher: ``concurrency`` keep-alive sockets, ``count`` POSTs."""
    import trio

    url, token = params["url"], params["token"]
    total, concurrency = params["count"], params["concurrency"]

    async def main() -> Result:
        connections = await _raw_connections(url, token, concurrency)
        next_index = 0
        accepted = 0
        failed: dict[int, int] = {}

        async def worker(connection: _RawConnection) -> None:
            nonlocal next_index, accepted
            while next_index < total:
                index = next_index
                next_index += 1
                body = b'{"name":"bench.publish","payload":{"i":%d,"ok":true}}' % index
                status = await connection.post(body)
                if 200 <= status < 300:
                    accepted += 1
                else:
                    failed[status] = failed.get(status, 0) + 1

        for connection in connections:  # one request each before timing
            await connection.post(b'{"name":"bench.publish","payload":{"warmup":true}}')
        timer = Timer()
        with timer:
            async with trio.open_nursery() as nursery:
                for connection in connections:
                    nursery.start_soon(worker, connection)
        for connection in connections:
            await connection.stream.aclose()
        return {**timer.best(), "events": accepted, "failed": failed, "last_id": None}

    result: Result = trio.run(main)
    return result


def _latency_listen(params: Params) -> Result:
    """Follow ``name`` on ``streams`` streams (one client); print ``ready`` once all are
    subscribed; time each event's trip on each stream (one clock read per batch).

    A stream is done when it has seen its ``count`` measured events (whatever their
    order: a paced publisher uses several connections); all stop after ``idle``
    seconds without an event once one arrived (a lost event is then a missing sample).
    """
    import msgspec
    import trio

    from busevents import EventsClient

    count, warmup = params["count"], params["warmup"]
    name, streams = params.get("name", "bench.latency"), params.get("streams", 1)
    idle = params.get("idle", 3.0)

    class Stamp(msgspec.Struct):
        t: int
        i: int

    latencies: list[int] = []
    seen = 0
    last_arrival = float("inf")

    async def one(client: EventsClient, ready: Any) -> None:
        nonlocal seen, last_arrival
        measured = 0
        async with client.listen(name) as stream:
            ready()
            async for batch in stream.batches():
                now = now_ns()
                last_arrival = trio.current_time()
                for event in batch:
                    stamp = event.payload_as(Stamp)
                    seen += 1
                    if stamp.i >= warmup:
                        latencies.append(now - stamp.t)
                        measured += 1
                if measured >= count:
                    return

    async def main() -> None:
        opened = 0

        def ready() -> None:
            nonlocal opened
            opened += 1
            if opened == streams:
                sys.stdout.write("ready\n")
                sys.stdout.flush()

        with trio.fail_after(params["timeout"]):
            async with (
                EventsClient(params["url"], params["token"], max_connections=streams + 1) as client,
                trio.open_nursery() as nursery,
            ):
                async with trio.open_nursery() as listeners:
                    for _ in range(streams):
                        listeners.start_soon(one, client, ready)

                    async def watchdog() -> None:
                        while True:
                            await trio.sleep(0.1)
                            if trio.current_time() - last_arrival >= idle:
                                listeners.cancel_scope.cancel()
                                return

                    nursery.start_soon(watchdog)
                nursery.cancel_scope.cancel()

    trio.run(main)
    latencies.sort()
    return {"events": seen, "samples": len(latencies), "latencies_ns": latencies}


def _latency_publish(params: Params) -> Result:
    """SDK: publish ``warmup + count`` stamped events, one at a time, ``interval`` apart."""
    import trio

    from busevents import EventsClient

    async def main() -> Result:
        sent = 0
        async with EventsClient(params["url"], params["token"]) as client:
            for i in range(params["warmup"] + params["count"]):
                await client.send("bench.latency", {"t": now_ns(), "i": i})
                sent += 1
                await trio.sleep(params["interval"])
        return {"events": sent}

    result: Result = trio.run(main)
    return result


def _paced_publish(params: Params) -> Result:
    """Minimal trio publisher at a fixed ``rate``: event *i* is due at start + i/rate and
    goes out on connection i mod ``connections`` (each waits for its previous answer).
    The stamp is the time the request is written, so a late send is not hidden as latency
    but counted in ``late``."""
    import trio

    rate, total = params["rate"], params["warmup"] + params["count"]
    connections_n = params.get("connections", 10)
    name = params.get("name", "bench.fanout").encode()

    async def main() -> Result:
        connections = await _raw_connections(params["url"], params["token"], connections_n)
        start = trio.current_time() + 0.05
        sent = late = 0
        failed = 0

        async def worker(k: int, connection: _RawConnection) -> None:
            nonlocal sent, late, failed
            for i in range(k, total, connections_n):
                due = start + i / rate
                if trio.current_time() > due + 0.001:
                    late += 1
                await trio.sleep_until(due)
                body = b'{"name":"%s","payload":{"t":%d,"i":%d}}' % (name, now_ns(), i)
                status = await connection.post(body)
                sent += 1
                failed += not 200 <= status < 300

        async with trio.open_nursery() as nursery:
            for k, connection in enumerate(connections):
                nursery.start_soon(worker, k, connection)
        elapsed = trio.current_time() - start
        for connection in connections:
            await connection.stream.aclose()
        return {"events": sent, "late": late, "failed": failed, "seconds": elapsed}

    result: Result = trio.run(main)
    return result


KINDS = {
    "publish": _publish,
    "publish-raw": _publish_raw,
    "latency-listen": _latency_listen,
    "latency-publish": _latency_publish,
    "paced-publish": _paced_publish,
}
