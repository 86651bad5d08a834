"""Streams against servers that compress, hold the query, or are read with a deadline
per read: nothing is lost and nothing ends quietly (issue 11, defects 2-4)."""

from __future__ import annotations

import gzip
import zlib

import pytest
import trio

from busevents import (
    Event,
    EventsClient,
    InvalidEvent,
    Publisher,
    RetryPolicy,
    ServerError,
    StreamError,
    StreamInterrupted,
    Worker,
    run_worker,
)

from .faults import chunk, response, serve_raw

TOKEN = "canary.header.signature-DO-NOT-PRINT"


def line(i: int) -> bytes:
    return b'{"id":"%d","name":"example.fault","payload":{"n":%d}}\n' % (i, i)


def _header(head: bytes, name: bytes) -> bytes | None:
    for row in head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, _, value = row.partition(b":")
        if key.strip().lower() == name:
            return value.strip().lower()
    return None


def allows_gzip(head: bytes) -> bool:
    """What nginx's ``gzip on`` checks: the request's Accept-Encoding names gzip."""
    accept = _header(head, b"accept-encoding") or b""
    return any(
        part.split(b";")[0].strip() in (b"gzip", b"*") and b"q=0" not in part.replace(b" ", b"")
        for part in accept.split(b",")
    )


def ndjson_head(encoding: str | None) -> bytes:
    extra = f"Content-Encoding: {encoding}\r\n" if encoding else ""
    return (
        "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        f"Transfer-Encoding: chunked\r\n{extra}Connection: close\r\n\r\n"
    ).encode()


EVENTS = b"".join(line(i) for i in range(200))


def gzipping_stream(*, always: bool, encoding: str = "gzip", wbits: int = 31):
    """A stream server that gzips when the request allows it (or ``always``), in
    many small compressed chunks, as a proxy that compresses on the fly does."""

    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        if not (always or allows_gzip(head)):
            await stream.send_all(ndjson_head(None) + chunk(EVENTS) + b"0\r\n\r\n")
            return
        compress = zlib.compressobj(6, zlib.DEFLATED, wbits)
        await stream.send_all(ndjson_head(encoding))
        for i in range(0, len(EVENTS), 1000):
            data = compress.compress(EVENTS[i : i + 1000]) + compress.flush(zlib.Z_SYNC_FLUSH)
            await stream.send_all(chunk(data))
        await stream.send_all(chunk(compress.flush()) + b"0\r\n\r\n")

    return handler


async def _ids(url: str) -> list[int]:
    async with (
        EventsClient(url, TOKEN) as client,
        client.listen("example.fault", replay=True, follow=False) as stream,
    ):
        return [int(event.id) async for event in stream]


async def test_listen_through_a_server_that_gzips_when_allowed() -> None:
    async with serve_raw(gzipping_stream(always=False)) as url:
        assert await _ids(url) == list(range(200))


@pytest.mark.parametrize(
    ("encoding", "wbits"), [("gzip", 31), ("x-gzip", 31), ("deflate", 15), ("deflate", -15)]
)
async def test_listen_through_a_server_that_compresses_whatever_was_asked(
    encoding: str, wbits: int
) -> None:
    async with serve_raw(gzipping_stream(always=True, encoding=encoding, wbits=wbits)) as url:
        assert await _ids(url) == list(range(200))


async def test_a_stream_in_an_encoding_the_client_cannot_read_is_a_clear_error() -> None:
    async def brotli(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(ndjson_head("br") + chunk(b"\x8b\x02\x80not really") + b"0\r\n\r\n")

    async with serve_raw(brotli) as url:
        with pytest.raises(StreamError, match="Content-Encoding: br"):
            await _ids(url)


async def test_a_gzipped_error_body_on_a_stream_is_read() -> None:
    body = gzip.compress(b'{"error":"unavailable","message":"database down"}')

    async def failing(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(
            response("503 Service Unavailable", body, extra="Content-Encoding: gzip\r\n")
        )

    async with serve_raw(failing) as url:
        with pytest.raises(ServerError, match="HTTP 503 unavailable: database down"):
            await _ids(url)


# -- the configured query string (defect 4) -------------------------------------


async def test_the_configured_query_string_is_kept_on_the_stream_request() -> None:
    heads: list[bytes] = []

    async def recording(stream: trio.SocketStream, head: bytes) -> None:
        heads.append(head.split(b"\r\n", 1)[0])
        if head.startswith(b"GET"):
            await stream.send_all(ndjson_head(None) + chunk(line(1)) + b"0\r\n\r\n")
        else:
            await stream.send_all(
                response("202 Accepted", b'{"accepted":true,"id":"1","name":"example.fault"}')
            )

    async with serve_raw(recording) as url:
        async with EventsClient(f"{url}/api/v1/events?tenant=x&region=eu%2F1", TOKEN) as client:
            await client.send("example.fault", 1)
            async with client.listen("example.fault", replay=True, follow=False) as stream:
                assert [e.id async for e in stream] == ["1"]
    post, get = heads
    assert post == b"POST /api/v1/events?tenant=x&region=eu%2F1 HTTP/1.1"
    target = get.split(b" ")[1]
    path, _, query = target.partition(b"?")
    assert path == b"/api/v1/events/stream"
    assert sorted(query.split(b"&")) == [
        b"follow=false",
        b"name=example.fault",
        b"region=eu%2F1",
        b"replay=true",
        b"tenant=x",
    ]


# -- a cancelled read (defect 3) -----------------------------------------------


def _paused_stream(resume: trio.Event):
    """Three events, a pause until ``resume``, three more, then a clean end."""

    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(ndjson_head(None) + chunk(line(0) + line(1) + line(2)))
        await resume.wait()
        await stream.send_all(chunk(line(3) + line(4) + line(5)) + b"0\r\n\r\n")

    return handler


@pytest.mark.parametrize("iterate", ["events", "batches", "raw"])
async def test_a_cancelled_read_never_ends_the_stream_quietly(iterate: str) -> None:
    resume = trio.Event()
    async with serve_raw(_paused_stream(resume)) as url:
        async with EventsClient(url, TOKEN) as client, client.listen("example.fault") as stream:
            if iterate == "events":
                items = stream.__aiter__()
            elif iterate == "batches":
                items = stream.batches()  # type: ignore[assignment]
            else:
                items = stream.raw_batches()  # type: ignore[assignment]
            got = [await items.__anext__()]
            while stream.events_received < 3 or (iterate == "events" and len(got) < 3):
                got.append(await items.__anext__())
            with trio.move_on_after(0.2) as scope:
                await items.__anext__()  # nothing comes: the caller gives up on this read
            assert scope.cancelled_caught
            resume.set()
            more = []
            try:
                with trio.fail_after(10):
                    while True:
                        try:
                            more.append(await items.__anext__())
                        except StopAsyncIteration:
                            break
            except StreamInterrupted as exc:
                assert "cancelled" in str(exc) and url in str(exc)
                assert exc.event_number == 4
            else:  # the stream went on: then every event arrived
                assert stream.events_received == 6, "the stream ended quietly"


# -- a line nested 10,000 deep (issue 16, item 9) --------------------------------

DEEP = b'{"id":"bad","name":"example.fault","payload":' + b"[" * 10_000 + b"]" * 10_000 + b"}\n"


async def test_a_deeply_nested_line_is_an_invalid_event_naming_its_offset() -> None:
    async def deep(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(ndjson_head(None) + chunk(line(0) + DEEP + line(1)) + b"0\r\n\r\n")

    async with serve_raw(deep) as url:
        events: list[str] = []
        with pytest.raises(InvalidEvent, match=f"byte offset {len(line(0))} .event 2.") as info:
            async with EventsClient(url, TOKEN) as client, client.listen("example.fault") as stream:
                async for event in stream:
                    events.append(event.id)
    assert events == ["0"] and info.value.offset == len(line(0))


async def test_a_replaying_worker_survives_a_deeply_nested_line() -> None:
    connections = 0
    handled: list[str] = []
    done = trio.Event()

    async def provider(stream: trio.SocketStream, head: bytes) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:  # history with a poisoned line in it
            await stream.send_all(ndjson_head(None) + chunk(line(0) + DEEP + line(1)))
        else:  # the next connection: history without it, then a new event
            await stream.send_all(ndjson_head(None) + chunk(line(0) + line(2)))
        await trio.sleep_forever()

    async def handler(event: Event, publisher: Publisher) -> None:
        handled.append(event.id)
        if event.id == "2":
            done.set()

    worker = Worker(
        "example.fault",
        handler,
        replay=True,
        retry=RetryPolicy(min_delay=0.01, max_delay=0.05),
    )
    async with serve_raw(provider) as url, EventsClient(url, TOKEN) as client:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_worker, client, worker)
            with trio.fail_after(20):
                await done.wait()
            nursery.cancel_scope.cancel()
    assert handled == ["0", "2"] and connections == 2
