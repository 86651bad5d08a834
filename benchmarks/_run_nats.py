"""NATS workers (run by :mod:`._run`): the peer rows, with nats-py against the local server.

Messages are the workload's 200-byte event lines, so that a message is what a
busevents event is on the wire.  ``nats-pub`` publishes fire-and-forget and
flushes (what core NATS offers), ``nats-jspub`` publishes to a JetStream
stream with ``concurrency`` tasks each awaiting its acknowledgement (what an
HTTP publish answered with 202 is), ``nats-sub`` subscribes, prints
``ready``, and counts until every message arrived.  Subjects and the stream
are unique per run; the stream is deleted at the end.
"""

from __future__ import annotations

import sys
from typing import Any

from . import _workload
from ._timer import Timer

__all__ = ["KINDS"]

Params = dict[str, Any]
Result = dict[str, Any]


def _messages(n: int) -> list[bytes]:
    data = _workload.body(n)
    size = _workload.LINE_SIZE
    return [data[i : i + size] for i in range(0, len(data), size)]


def _last_id(payload: bytes | None) -> str | None:
    import msgspec

    return None if payload is None else str(msgspec.json.decode(payload)["id"])


def _publish(params: Params) -> Result:
    """Publish ``events`` messages to ``subject`` as fast as nats-py goes, then flush."""
    import asyncio

    import nats

    messages = _messages(params["events"])

    async def main() -> Result:
        nc = await nats.connect(params["server"], allow_reconnect=False)
        try:
            publish, subject = nc.publish, params["subject"]
            await publish(subject + ".warmup", b"warmup")  # not to the measured subject
            await nc.flush()
            timer = Timer()
            with timer:
                for message in messages:
                    await publish(subject, message)
                await nc.flush()
        finally:
            await nc.close()
        return {**timer.best(), "events": len(messages), "last_id": _last_id(messages[-1])}

    return asyncio.run(main())


def _js_publish(params: Params) -> Result:
    """Publish ``events`` messages to a fresh in-memory JetStream stream, ``concurrency``
    tasks each awaiting its acknowledgement; the stream is deleted afterwards."""
    import asyncio

    import nats
    from nats.js.api import StorageType

    messages = _messages(params["events"])
    subject, stream = params["subject"], params["stream"]

    async def main() -> Result:
        nc = await nats.connect(params["server"], allow_reconnect=False)
        js = nc.jetstream()
        acked = 0
        try:
            await js.add_stream(name=stream, subjects=[subject], storage=StorageType.MEMORY)
            await js.publish(subject, b"warmup")
            next_index = 0

            async def worker() -> None:
                nonlocal next_index, acked
                while next_index < len(messages):
                    index = next_index
                    next_index += 1
                    await js.publish(subject, messages[index])
                    acked += 1

            timer = Timer()
            with timer:
                await asyncio.gather(*(worker() for _ in range(params["concurrency"])))
        finally:
            try:
                await js.delete_stream(stream)
            finally:
                await nc.close()
        return {**timer.best(), "events": acked, "last_id": _last_id(messages[-1])}

    return asyncio.run(main())


def _subscribe(params: Params) -> Result:
    """Subscribe to ``subject``, print ``ready``, count ``events`` messages; time from the
    first message to the last (wall and this process's CPU)."""
    import asyncio
    import time

    import nats

    expected = params["events"]

    async def main() -> Result:
        nc = await nats.connect(params["server"], allow_reconnect=False)
        done = asyncio.Event()
        count = 0
        last: bytes | None = None
        first_wall = first_cpu = 0.0

        async def on_message(msg: Any) -> None:
            nonlocal count, last, first_wall, first_cpu
            if count == 0:
                first_wall, first_cpu = time.perf_counter(), time.process_time()
            count += 1
            last = msg.data
            if count == expected:
                done.set()

        try:
            await nc.subscribe(
                params["subject"],
                cb=on_message,
                pending_msgs_limit=expected + 1,
                pending_bytes_limit=(expected + 1) * 1024,
            )
            await nc.flush()  # the server knows the subscription now
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            await asyncio.wait_for(done.wait(), params["timeout"])
            wall, cpu = time.perf_counter() - first_wall, time.process_time() - first_cpu
        finally:
            await nc.close()
        return {"seconds": wall, "cpu": cpu, "events": count, "last_id": _last_id(last)}

    return asyncio.run(main())


KINDS = {"nats-pub": _publish, "nats-jspub": _js_publish, "nats-sub": _subscribe}
