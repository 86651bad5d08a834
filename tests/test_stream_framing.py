"""How a stream's lines and its end are read, against loopback servers that send
exactly the bytes under test: a bare CR inside a line with ``after=`` on every
iterator (issue 21), a following stream without chunked framing (an HTTP/1.0 hop)
and one cut in the middle of its chunks (issue 23)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest
import trio

from busevents import EventsClient, EventStream, StreamInterrupted

from .faults import chunk, serve_raw

TOKEN = "canary.header.signature-DO-NOT-PRINT"
NAME = "example.framing"


def cr_line(i: int) -> bytes:
    """An envelope with bare CRs between its tokens: JSON whitespace, not line ends."""
    return b'{"id":"5-%d",\r"name":"%s",\r"payload":{"n":\r%d}}\n' % (i, NAME.encode(), i)


def chunked_head() -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )


async def ignores_after(stream: trio.SocketStream, head: bytes) -> None:
    """A provider that ignores ``after``: it sends the whole history, events 0-5."""
    body = b"".join(cr_line(i) for i in range(6))
    await stream.send_all(chunked_head() + chunk(body[:50]) + chunk(body[50:]) + b"0\r\n\r\n")


async def _ids_of(stream: EventStream, how: str) -> list[str]:
    if how == "events":
        return [event.id async for event in stream]
    if how == "batches":
        return [event.id async for batch in stream.batches() for event in batch]
    blocks = [block async for block in stream.raw_batches()]
    data = b"".join(blocks)
    assert b"\r" in data and b"\r\n" not in data  # the bytes as received
    return [line.split(b'"')[3].decode() for line in data.split(b"\n")[:-1]]


@pytest.mark.parametrize("how", ["events", "batches", "raw"])
async def test_after_skips_lines_with_a_bare_cr_on_every_iterator(how: str) -> None:
    """Before the fix raw_batches() raised a raw msgspec.DecodeError: the cursor
    skipping cut lines at the bare CR (``splitlines``)."""
    async with serve_raw(ignores_after) as base:
        async with (
            EventsClient(f"{base}/api/v1/events", TOKEN) as client,
            client.listen(NAME, after="5-2", follow=False) as stream,
        ):
            ids = await _ids_of(stream, how)
    assert ids == ["5-3", "5-4", "5-5"]


@pytest.mark.parametrize("how", ["events", "batches", "raw"])
async def test_filters_on_lines_with_a_bare_cr(how: str) -> None:
    """The correlation filter and the limit cut lines at ``\\n`` only, on every iterator."""

    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        body = b"".join(
            b'{"id":"7-%d",\r"name":"%s","correlationId":\r"%s","payload":1}\n'
            % (i, NAME.encode(), b"c" if i % 2 else b"d")
            for i in range(10)
        )
        await stream.send_all(chunked_head() + chunk(body) + b"0\r\n\r\n")

    async with serve_raw(handler) as base:
        async with (
            EventsClient(f"{base}/api/v1/events", TOKEN) as client,
            client.listen(NAME, follow=False, correlation_id="c") as stream,
        ):
            stream.filter(limit=3)
            ids = await _ids_of(stream, how)
            assert stream.events_delivered == 3
            assert not stream.ended  # the limit stopped the reading, not the provider
    assert ids == ["7-1", "7-3", "7-5"]


def http10_stream(lines: int) -> Callable[[trio.SocketStream, bytes], Awaitable[None]]:
    """What nginx with its default ``proxy_http_version 1.0`` relays: HTTP/1.0, no
    chunks, no length; the end of the body is the end of the connection."""

    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(
            b"HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n"
            + b"".join(cr_line(i) for i in range(lines))
        )

    return handler


async def test_an_unframed_following_stream_warns_once_and_its_end_is_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before the fix the end of such a stream was taken for a clean end, silently."""
    caplog.set_level(logging.WARNING, logger="busevents")
    async with serve_raw(http10_stream(3)) as base:
        async with EventsClient(f"{base}/api/v1/events", TOKEN) as client:
            for _ in range(2):
                got: list[str] = []
                with pytest.raises(StreamInterrupted, match="without an end marker") as info:
                    async with client.listen(NAME) as stream:
                        async for event in stream:
                            got.append(event.id)
                assert got == ["5-0", "5-1", "5-2"]  # delivered before the error
                assert "proxy_http_version 1.1" in str(info.value)
            # A snapshot (follow=False) ends with the body: no error, no warning.
            async with client.listen(NAME, follow=False) as stream:
                assert [event.id async for event in stream] == ["5-0", "5-1", "5-2"]
                assert stream.ended
    warnings = [r.getMessage() for r in caplog.records if "chunked framing" in r.getMessage()]
    assert len(warnings) <= 1  # once per process (an earlier test may have said it)
    if warnings:
        assert 'proxy_set_header Connection ""' in warnings[0]


async def _cli(run_cli, base: str, *args: str):  # type: ignore[no-untyped-def]
    return await run_cli(
        "--api-url",
        f"{base}/api/v1/events",
        "listen",
        "--name",
        NAME,
        *args,
        env={"BUS_API_TOKEN": TOKEN},
    )


async def test_cli_listen_over_http10_exits_1_and_names_the_fix(run_cli) -> None:  # type: ignore[no-untyped-def]
    async with serve_raw(http10_stream(2)) as base:
        result = await _cli(run_cli, base)
        snapshot = await _cli(run_cli, base, "--no-follow")
    assert result.status == 1, result.stderr
    assert result.stdout.count(b"\n") == 2  # what arrived is written
    assert result.stderr.count("chunked framing") == 1  # the warning, once
    assert "proxy_http_version 1.1" in result.stderr
    assert 'proxy_set_header Connection ""' in result.stderr
    assert "without an end marker" in result.stderr
    assert TOKEN not in result.stderr
    assert snapshot.status == 0, snapshot.stderr
    assert snapshot.stdout.count(b"\n") == 2


async def test_cli_listen_cut_mid_chunked_stream_exits_1(run_cli) -> None:  # type: ignore[no-untyped-def]
    """A provider that dies in the middle of its chunks (no terminating chunk)."""

    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        body = cr_line(0) + cr_line(1)
        await stream.send_all(chunked_head() + chunk(body) + b"40\r\n" + cr_line(2)[:10])

    async with serve_raw(handler) as base:
        result = await _cli(run_cli, base)
    assert result.status == 1, result.stderr
    assert result.stdout.count(b"\n") == 2
    assert "error" in result.stderr


async def test_cli_listen_ends_cleanly_on_a_terminating_chunk(run_cli) -> None:  # type: ignore[no-untyped-def]
    """The contrast: a following stream the provider finished properly is exit 0."""

    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(chunked_head() + chunk(cr_line(0)) + b"0\r\n\r\n")

    async with serve_raw(handler) as base:
        result = await _cli(run_cli, base)
    assert result.status == 0, result.stderr
    assert result.stdout.count(b"\n") == 1
    assert "chunked framing" not in result.stderr
