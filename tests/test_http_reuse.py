"""The lean path never takes a response for another request's: unread bytes after a
response, both framings, high file descriptors, compressed replies."""

from __future__ import annotations

import gzip
import os
import resource
from collections.abc import Iterator

import pytest
import trio

from busevents import BadRequest, EventsClient

from .test_publish_lean import ACCEPT, Server, always_ok, ok, serving

FORGED = b'{"accepted":true,"id":"999-0","name":"FORGED"}'
REFUSED = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 48\r\n\r\n"
    b'{"error":"invalid_name","message":"real answer"}'
)


async def test_a_second_response_in_the_same_read_is_never_taken_for_the_next() -> None:
    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        # request 1 gets two responses at once; any later request gets the real 400
        return (ok() + ok(FORGED), False) if n == 1 else (REFUSED, False)

    server = Server(reply)
    async with serving(server) as url, EventsClient(url, "tok") as client:
        assert (await client.send("example.ping")).id == "1-0"
        with pytest.raises(BadRequest, match="real answer"):
            await client.send("example.ping")
    assert server.connections == 2
    assert len(server.requests) == 2


async def test_a_late_second_response_is_never_taken_for_the_next() -> None:
    answered, sent = trio.Event(), trio.Event()

    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        if n == 1:
            answered.set()
            return ok(), False
        return REFUSED, False

    class Late(Server):
        async def handle(self, stream: trio.abc.Stream) -> None:
            async def forge() -> None:
                await answered.wait()
                await trio.sleep(0.05)  # well after the first response
                await stream.send_all(ok(FORGED))
                sent.set()

            if self.connections == 0:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(forge)
                    await super().handle(stream)
            else:
                await super().handle(stream)

    server = Late(reply)
    async with serving(server) as url, EventsClient(url, "tok") as client:
        assert (await client.send("example.ping")).id == "1-0"
        await sent.wait()
        with pytest.raises(BadRequest, match="real answer"):
            await client.send("example.ping")
    assert server.connections == 2


async def test_content_length_with_transfer_encoding_closes_the_connection() -> None:
    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(ACCEPT), ACCEPT)
        head = (
            b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        return head + chunked, False

    server = Server(reply)
    async with serving(server) as url, EventsClient(url, "tok") as client:
        for _ in range(3):
            assert (await client.send("example.ping")).id == "1-0"
    assert server.connections == 3  # never reused after such a response


@pytest.fixture
def many_open_files() -> Iterator[int]:
    """1,100 more open file descriptors in this process (the soft limit raised)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        yield max(fds)
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_keep_alive_above_fd_1024(many_open_files: int) -> None:
    assert many_open_files > 1024
    server = Server(always_ok)
    async with serving(server) as url, EventsClient(url, "tok") as client:
        for i in range(20):
            assert (await client.send("example.ping", {"i": i})).id == "1-0"
    assert len(server.requests) == 20
    assert server.connections <= 2


async def test_a_gzip_encoded_acceptance_is_inflated() -> None:
    body = gzip.compress(ACCEPT)

    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        return ok(body, b"Content-Encoding: gzip\r\n"), False

    server = Server(reply)
    async with serving(server) as url, EventsClient(url, "tok") as client:
        accepted = await client.send("example.ping")
        accepted_again = await client.send("example.ping")
    assert accepted.id == accepted_again.id == "1-0"
    head = server.requests[0].partition(b"\r\n\r\n")[0].lower()
    assert b"\r\naccept-encoding: identity\r\n" in head + b"\r\n"
    assert server.connections == 1
