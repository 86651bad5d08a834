"""Streams on the lean path (h11 over trio, large reads; issue 24) against loopback
servers that send exactly the bytes under test: the same bytes as the httpx path
whatever the chunking, a body cut short is an error after every complete event,
and each stream has a connection of its own that the client closes."""

from __future__ import annotations

import sys

import httpx
import pytest
import trio

from busevents import EventsClient, StreamInterrupted

from .faults import chunk, serve_raw

TOKEN = "canary.header.signature-DO-NOT-PRINT"
NAME = "example.transport"


def line(i: int) -> bytes:
    return b'{"id":"7-%d","name":"%s","payload":{"n":%d,"pad":"%s"}}\n' % (
        i,
        NAME.encode(),
        i,
        b"x" * (i % 13),
    )


EVENTS = [line(i) for i in range(400)]
#: The body as sent: keep-alive lines (blank, and CR LF) among the events.
BODY = b"\n" + b"".join(EVENTS[:150]) + b"\r\n" + b"".join(EVENTS[150:]) + b"\n"


def head(framing: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n" + framing + b"\r\n"


async def odd_chunks(stream: trio.SocketStream, request: bytes) -> None:
    """The body in chunks of 1, 2, 3 … bytes, several per write, some writes split
    inside a chunk's size line: every way a read can cut the framing."""
    pieces, pos, size = [], 0, 1
    while pos < len(BODY):
        pieces.append(chunk(BODY[pos : pos + size]))
        pos, size = pos + size, size % 97 + 1
    wire = head(b"Transfer-Encoding: chunked\r\n") + b"".join(pieces) + b"0\r\n\r\n"
    for start in range(0, len(wire), 1531):
        await stream.send_all(wire[start : start + 1531])


async def _raw(url: str, transport: httpx.AsyncBaseTransport | None) -> bytes:
    async with (
        EventsClient(url, TOKEN, transport=transport) as client,
        client.listen(NAME, replay=True, follow=False) as stream,
    ):
        data = b"".join([block async for block in stream.raw_batches()])
        assert stream.ended and stream.events_received == len(EVENTS)
    return data


async def test_the_lean_and_httpx_paths_deliver_the_same_bytes() -> None:
    async with serve_raw(odd_chunks) as base:
        lean = await _raw(base, None)
        through_httpx = await _raw(base, httpx.AsyncHTTPTransport())
    assert lean == through_httpx == b"".join(EVENTS)  # keep-alive lines left out


@pytest.mark.parametrize("iterate", ["events", "raw"])
async def test_a_body_shorter_than_its_content_length_is_interrupted(iterate: str) -> None:
    """A provider (or a proxy) that dies before the length it announced: every complete
    event is delivered, then the stream fails; it never ends as if finished."""
    body = b"".join(EVENTS[:3])

    async def handler(stream: trio.SocketStream, request: bytes) -> None:
        length = b"Content-Length: %d\r\n" % (len(body) + 500)
        await stream.send_all(head(length) + body + EVENTS[3][:20])

    got: list[str] = []
    async with serve_raw(handler) as base, EventsClient(base, TOKEN) as client:
        with pytest.raises(StreamInterrupted, match="after 3 events") as info:
            async with client.listen(NAME, replay=True, follow=False) as stream:
                if iterate == "events":
                    async for event in stream:
                        got.append(event.id)
                else:
                    async for block in stream.raw_batches():
                        got += [raw.split(b'"')[3].decode() for raw in block.splitlines()]
    assert not stream.ended
    assert got == ["7-0", "7-1", "7-2"]
    assert TOKEN not in str(info.value)


async def test_each_stream_has_its_own_connection_which_the_client_closes() -> None:
    """Counted on the server: one connection per stream, each closed by the client
    when its block is left (a following stream's connection is never reused)."""
    opened = closed = 0
    all_closed = trio.Event()

    async def handler(stream: trio.SocketStream, request: bytes) -> None:
        nonlocal opened, closed
        opened += 1
        # A following stream: one event, then nothing (no end of the body).
        await stream.send_all(head(b"Transfer-Encoding: chunked\r\n") + chunk(EVENTS[0]))
        with trio.fail_after(10):
            while await stream.receive_some(4096):
                pass  # the client sends nothing more; b"" is its close
        closed += 1
        if closed == 3:
            all_closed.set()

    async with serve_raw(handler) as base, EventsClient(base, TOKEN) as client:
        for _ in range(3):
            async with client.listen(NAME) as stream:
                first = await stream.__anext__()
                assert first.id == "7-0"
        with trio.fail_after(10):
            await all_closed.wait()
    assert (opened, closed) == (3, 3)


async def test_a_stream_on_the_default_transport_never_loads_httpx() -> None:
    """The lean path is the whole path: a listener process imports neither httpx nor
    httpcore (a real process, its modules listed at the end)."""

    async def handler(stream: trio.SocketStream, request: bytes) -> None:
        body = b"".join(EVENTS[:5])
        await stream.send_all(head(b"Content-Length: %d\r\n" % len(body)) + body)

    child = (
        "import sys, trio\n"
        "from busevents import EventsClient\n"
        "async def main():\n"
        "    async with EventsClient(sys.argv[1], 'a.b.c') as client:\n"
        f"        async with client.listen({NAME!r}, replay=True, follow=False) as stream:\n"
        "            ids = [event.id async for event in stream]\n"
        "    print(len(ids), sorted({'httpx', 'httpcore'} & set(sys.modules)))\n"
        "trio.run(main)\n"
    )
    async with serve_raw(handler) as base:
        done = await trio.run_process(
            [sys.executable, "-c", child, base], capture_stdout=True, capture_stderr=True
        )
    assert done.stdout.decode().split(None, 1) == ["5", "[]\n"], done.stderr


async def test_hundreds_of_concurrent_streams_from_one_client() -> None:
    """600 streams open at once from one client (1,200 descriptors in this process with
    the server's ends): each gets its event, none waits for the publish pool's 100
    slots, and every connection is closed when its block is left (counted on the
    server)."""
    streams = 600
    opened = closed = 0
    all_closed = trio.Event()

    async def handler(stream: trio.SocketStream, request: bytes) -> None:
        nonlocal opened, closed
        opened += 1
        await stream.send_all(head(b"Transfer-Encoding: chunked\r\n") + chunk(EVENTS[0]))
        with trio.fail_after(60):
            while await stream.receive_some(4096):
                pass
        closed += 1
        if closed == streams:
            all_closed.set()

    got: list[str] = []
    all_open = trio.Event()

    async def one(client: EventsClient) -> None:
        async with client.listen(NAME) as stream:
            got.append((await stream.__anext__()).id)
            if len(got) == streams:
                all_open.set()
            await all_open.wait()  # every stream is open at this point

    async with serve_raw(handler) as base, EventsClient(base, TOKEN) as client:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(streams):
                    nursery.start_soon(one, client)
            await all_closed.wait()
    assert got == ["7-0"] * streams
    assert (opened, closed) == (streams, streams)
