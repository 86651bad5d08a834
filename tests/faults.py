"""Small misbehaving HTTP servers on 127.0.0.1, for fault tests.

Each takes a handler ``async def handler(stream, request)`` that writes
whatever bytes it likes (a half line, HTML, nothing at all) and may stall.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial

import trio

Handler = Callable[[trio.SocketStream, bytes], Awaitable[None]]


async def read_head(stream: trio.SocketStream) -> bytes:
    """Read the whole request, body included (so closing does not reset the connection)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = await stream.receive_some(65536)
        if not more:
            return data
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for header in head.split(b"\r\n")[1:]:
        key, _, value = header.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        more = await stream.receive_some(65536)
        if not more:
            break
        body += more
    return head + b"\r\n\r\n" + body


@asynccontextmanager
async def serve_raw(handler: Handler, *, read_request: bool = True) -> AsyncIterator[str]:
    """Serve ``handler`` on a free loopback port; yield the base URL.

    ``read_request=False`` calls the handler at once, before any byte is read.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def connection(stream: trio.SocketStream) -> None:
        async with stream:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await handler(stream, await read_head(stream) if read_request else b"")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, connection, listeners))
        yield f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


def response(
    status: str, body: bytes, content_type: str = "application/json", extra: str = ""
) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    ).encode() + body


def answer(data: bytes) -> Handler:
    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(data)

    return handler


def stream_head(chunked: bool = False) -> bytes:
    encoding = "Transfer-Encoding: chunked\r\n" if chunked else ""
    return (
        "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        f"{encoding}Connection: close\r\n\r\n"
    ).encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)
