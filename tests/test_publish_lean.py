"""The lean publish path (h11 over trio streams): keep-alive, closing servers, errors,
timeouts, TLS, concurrency."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path

import msgspec
import pytest
import trio
import trustme

from busevents import ConnectError, EventsClient, ServerError, Timeout, TransportError
from busevents.provider import RunningProvider

ACCEPT = b'{"accepted":true,"id":"1-0","name":"example.ping"}'


class Server:
    """A keep-alive HTTP/1.1 server on 127.0.0.1 with a scripted reply per request;
    counts connections and records requests."""

    def __init__(self, reply: Callable[[int, bytes], Awaitable[tuple[bytes, bool]]]) -> None:
        self.reply = reply  # (request number, raw request) -> (bytes to send, then close?)
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        buffer = b""
        async with stream:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while True:
                    while b"\r\n\r\n" not in buffer:
                        more = await stream.receive_some(65536)
                        if not more:
                            return
                        buffer += more
                    head, _, rest = buffer.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        key, _, value = line.partition(b":")
                        if key.strip().lower() == b"content-length":
                            length = int(value)
                    while len(rest) < length:
                        more = await stream.receive_some(65536)
                        if not more:
                            return
                        rest += more
                    request, buffer = head + b"\r\n\r\n" + rest[:length], rest[length:]
                    self.requests.append(request)
                    data, close = await self.reply(len(self.requests), request)
                    await stream.send_all(data)
                    if close:
                        return


def ok(body: bytes = ACCEPT, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)
    )


@asynccontextmanager
async def serving(server: Server, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(
        await trio.open_tcp_listeners(0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]  # type: ignore[attr-defined]
    scheme = "http"
    if ssl_context is not None:
        listeners = [
            trio.SSLListener(listener, ssl_context, https_compatible=True) for listener in listeners
        ]
        scheme = "https"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, server.handle, listeners))
        yield f"{scheme}://127.0.0.1:{port}/api/v1/events"
        nursery.cancel_scope.cancel()


async def always_ok(n: int, request: bytes) -> tuple[bytes, bool]:
    return ok(), False


async def test_keep_alive_reuses_one_connection() -> None:
    server = Server(always_ok)
    async with serving(server) as url, EventsClient(url, "tok-secret") as client:
        for i in range(5):
            accepted = await client.send("example.ping", {"i": i})
            assert accepted.id == "1-0"
    assert server.connections == 1
    assert len(server.requests) == 5
    head, _, body = server.requests[-1].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /api/v1/events HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer tok-secret" in head
    assert b"\r\nContent-Type: application/json" in head
    assert msgspec.json.decode(body) == {"name": "example.ping", "payload": {"i": 4}}


@pytest.mark.parametrize("announced", [True, False], ids=["connection-close", "silent-close"])
async def test_server_that_closes_after_each_response(announced: bool) -> None:
    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        return ok(extra=b"Connection: close\r\n" if announced else b""), True

    server = Server(reply)
    async with serving(server) as url, EventsClient(url, "tok") as client:
        for i in range(4):
            await client.send("example.ping", i)
            # let the FIN of a silent close arrive before the next send looks at the socket
            await trio.sleep(0.05)
    assert server.connections == 4
    assert len(server.requests) == 4


async def test_5xx_body_becomes_server_error() -> None:
    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        body = b'{"error":"backend_down","message":"the store is unavailable"}'
        return (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        ), False

    server = Server(reply)
    async with serving(server) as url, EventsClient(url, "tok") as client:
        with pytest.raises(ServerError) as info:
            await client.send("example.ping", 1)
        # the connection stays usable after a complete error response
        with pytest.raises(ServerError):
            await client.send("example.ping", 2)
    assert info.value.status == 503
    assert info.value.code == "backend_down"
    assert "the store is unavailable" in str(info.value)
    assert server.connections == 1


async def test_chunked_and_close_delimited_replies_are_read_whole() -> None:
    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        if n == 1:
            half = len(ACCEPT) // 2
            return (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
                % (half, ACCEPT[:half], len(ACCEPT) - half, ACCEPT[half:])
            ), False
        return b"HTTP/1.1 200 OK\r\n\r\n" + ACCEPT, True  # body ends at close

    server = Server(reply)
    async with serving(server) as url, EventsClient(url, "tok") as client:
        assert (await client.send("example.ping", 1)).name == "example.ping"
        assert (await client.send("example.ping", 2)).name == "example.ping"
        await trio.sleep(0.05)
        assert (await client.send("example.ping", 3)).name == "example.ping"
    assert server.connections == 2


async def test_slow_server_hits_the_timeout_and_the_connection_is_dropped() -> None:
    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        if n == 1:
            await trio.sleep_forever()
        return ok(), False

    server = Server(reply)
    async with serving(server) as url, EventsClient(url, "tok", timeout=0.3) as client:
        with pytest.raises(Timeout) as info:
            await client.send("example.ping", 1)
        assert info.value.url == url
        # the timed-out connection is in an unknown state: a new one carries the next send
        assert (await client.send("example.ping", 2)).accepted
    assert server.connections == 2


async def test_server_closing_without_an_answer_is_a_transport_error() -> None:
    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        return b"", True

    async with serving(Server(reply)) as url, EventsClient(url, "tok-secret") as client:
        with pytest.raises(TransportError) as info:
            await client.send("example.ping", 1)
    assert "without sending a response" in str(info.value)
    assert "tok-secret" not in str(info.value)


async def test_garbage_reply_is_a_transport_error() -> None:
    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        return b"SMTP ready\r\n\r\n", True

    async with serving(Server(reply)) as url, EventsClient(url, "tok") as client:
        with pytest.raises(TransportError, match="invalid HTTP response"):
            await client.send("example.ping", 1)


async def test_closed_port_is_a_connect_error(unused_url: str) -> None:
    async with EventsClient(unused_url, "tok") as client:
        with pytest.raises(ConnectError, match="cannot connect"):
            await client.send("example.ping", 1)


async def test_redirect_is_not_followed() -> None:
    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        return (
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n",
            False,
        )

    server = Server(reply)
    async with serving(server) as url, EventsClient(url, "tok") as client:
        with pytest.raises(Exception) as info:
            await client.send("example.ping", 1)
    assert getattr(info.value, "status", None) == 307
    assert len(server.requests) == 1


async def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = Server(always_ok)
    async with serving(server, server_context) as url:
        async with EventsClient(url, "tok", ca_file=str(ca_file)) as client:
            for _ in range(3):
                assert (await client.send("example.ping")).id == "1-0"
        # without the CA, the server's certificate is refused, and the error says what to do
        async with EventsClient(url, "tok") as untrusting:
            with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED") as info:
                await untrusting.send("example.ping")
    assert "--ca-file" in str(info.value) and "BUS_EVENTS_CA_FILE" in str(info.value)
    assert server.connections == 2  # keep-alive over TLS, then the refused handshake
    assert len(server.requests) == 3  # nothing was sent over the refused connection


async def test_pool_bounds_connections_under_100_concurrent_sends() -> None:
    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        await trio.sleep(0.001 * (n % 5))
        return ok(), False

    server = Server(reply)
    results: list[str] = []
    async with serving(server) as url, EventsClient(url, "tok", max_connections=10) as client:
        async with trio.open_nursery() as nursery:
            for i in range(100):

                async def one(i: int = i) -> None:
                    results.append((await client.send("example.ping", i)).id)

                nursery.start_soon(one)
    assert len(results) == 100
    assert len(server.requests) == 100
    assert 1 <= server.connections <= 10


async def test_100_concurrent_sends_to_the_provider(provider: RunningProvider) -> None:
    ids: list[str] = []
    async with EventsClient(provider.url, provider.token()) as client:
        async with trio.open_nursery() as nursery:
            for i in range(100):

                async def one(i: int = i) -> None:
                    ids.append((await client.send("example.ping", {"i": i})).id)

                nursery.start_soon(one)
        async with client.listen("example.ping", replay=True, follow=False) as stream:
            seen = [event.payload_obj()["i"] async for event in stream]
    assert len(set(ids)) == 100
    assert sorted(seen) == list(range(100))
