"""Every response body the client reads is bounded (issue 16, item 3): an endless
acceptance, a gzip bomb as an acceptance or as an error, on publish and on a stream."""

from __future__ import annotations

import functools
import tracemalloc
import zlib

import pytest
import trio

from busevents import APIError, EventsClient, ServerError

from .faults import chunk, serve_raw

TOKEN = "canary.header.signature-DO-NOT-PRINT"
#: What a bounded reader may hold at most, with room for everything else.
PEAK_LIMIT = 8 * 1024 * 1024


@functools.cache
def gzip_bomb() -> bytes:
    """A gzip body of about 300 KB that inflates to 64 MiB of zeros."""
    compress = zlib.compressobj(1, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join([*(compress.compress(zeros) for _ in range(64)), compress.flush()])


def head(status: str, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: chunked\r\n{extra}Connection: close\r\n\r\n"
    ).encode()


async def test_an_endless_acceptance_body_is_cut_off() -> None:
    async def endless(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(head("202 Accepted") + chunk(b'{"accepted":true,"id":"1","x":"'))
        block = chunk(b"x" * 65536)
        for _ in range(1024):  # 64 MiB, then silence
            await stream.send_all(block)
        await trio.sleep_forever()

    async with serve_raw(endless) as url, EventsClient(url, TOKEN, timeout=10) as client:
        tracemalloc.start()
        try:
            with pytest.raises(APIError, match=r"not an acceptance \(longer than 64 KiB\)") as info:
                await client.send("example.fault", 1)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert info.value.status == 202
    assert peak < PEAK_LIMIT, f"{peak / 2**20:.1f} MiB held at the peak"


@pytest.mark.parametrize(
    ("status", "error", "text"),
    [
        ("202 Accepted", APIError, "not an acceptance"),
        ("500 Internal Server Error", ServerError, "HTTP 500"),
    ],
)
async def test_a_gzip_bomb_is_never_inflated_beyond_the_bound(
    status: str, error: type[Exception], text: str
) -> None:
    bomb = gzip_bomb()

    async def bomber(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(head(status, "Content-Encoding: gzip\r\n"))
        for i in range(0, len(bomb), 16384):
            await stream.send_all(chunk(bomb[i : i + 16384]))
        await stream.send_all(b"0\r\n\r\n")

    async with serve_raw(bomber) as url, EventsClient(url, TOKEN, timeout=20) as client:
        tracemalloc.start()
        try:
            with pytest.raises(error, match=text):
                await client.send("example.fault", 1)
            with pytest.raises(error, match=text if status.startswith("5") else "HTTP 202"):
                async with client.listen("example.fault"):
                    pass
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"{peak / 2**20:.1f} MiB held at the peak"
