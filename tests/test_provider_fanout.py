"""Reference provider: fan-out to many listeners over raw sockets.

The provider frames a single event's chunk once and shares the bytes between the
streams it goes to, and writes straight to the socket (``_h11server.BodyWriter``).
These tests read the raw bytes each listener gets and check the framing strictly:
every listener has exactly its own events, in the provider's order, once each —
single events and bursts, HTTP/1.1 (chunked) and HTTP/1.0 (close-delimited), end
users (their own events only) and a service (all of them) — and a listener that
stops reading is cut without costing the others an event.
"""

from __future__ import annotations

import socket
from typing import Any

import httpx
import msgspec
import trio

from busevents.provider import INTERNAL_AUDIENCE, ProviderConfig, RunningProvider, open_provider
from busevents.provider.backends._memory import MemoryBackend

SECRET = b"fanout-tests-secret-0123456789abcdef"
NAME = "example.fan"
WAIT = 10.0


def memory(provider: RunningProvider) -> MemoryBackend:
    backend = provider.backend
    assert isinstance(backend, MemoryBackend)
    return backend


async def subscribed(provider: RunningProvider, count: int) -> None:
    """Wait until ``count`` streams of ``NAME`` are subscribed (the backend's own count)."""
    with trio.fail_after(WAIT):
        # Polling: the backend signals no event when a stream subscribes.
        while memory(provider).subscriber_count(NAME) < count:  # noqa: ASYNC110
            await trio.sleep(0.01)


async def open_raw(
    provider: RunningProvider, token: str, *, version: str = "1.1", rcvbuf: int | None = None
) -> trio.SocketStream:
    """A stream of ``NAME`` on a raw socket, its head read (byte by byte: no body taken)."""
    port = int(provider.origin.rsplit(":", 1)[1])
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(
        f"GET /api/v1/events/stream?name={NAME} HTTP/{version}\r\nHost: t\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        data = await stream.receive_some(1)
        assert data, f"the stream closed before its head: {head!r}"
        head += data
    assert head.startswith(b"HTTP/1.1 200"), head
    return stream


async def read_to_end(stream: trio.SocketStream, *, chunked: bool = True) -> bytes:
    """The body bytes until the last chunk (chunked) or the connection's close."""
    data = b""
    with trio.fail_after(WAIT):
        while not ((chunked and data.endswith(b"\r\n0\r\n\r\n")) or data == b"0\r\n\r\n"):
            chunk = await stream.receive_some(1 << 16)
            if not chunk:
                break
            data += chunk
    await stream.aclose()
    return data


def dechunk(data: bytes) -> bytes:
    """The body of a chunked response, checking every size line and CRLF; ends with 0."""
    body = b""
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        assert sep, f"a chunk size line without CRLF: {size_line[:40]!r}"
        size = int(size_line, 16)
        if size == 0:
            assert data == b"\r\n", f"bytes after the last chunk: {data[:40]!r}"
            return body
        assert data[size : size + 2] == b"\r\n", "a chunk does not end with CRLF"
        body += data[:size]
        data = data[size + 2 :]


def ids(body: bytes) -> list[str]:
    """The event ids of an NDJSON body, in order (keep-alive lines skipped)."""
    assert not body or body.endswith(b"\n"), "the body ends inside a line"
    return [msgspec.json.decode(line)["id"] for line in body.split(b"\n") if line]


async def publish_all(
    http: httpx.AsyncClient, provider: RunningProvider, tokens: dict[str, str], rounds: int
) -> None:
    """Single events one by one, then bursts of concurrent ones (listeners get batches)."""

    async def one(subject: str, i: int) -> None:
        response = await http.post(
            provider.url,
            json={"name": NAME, "payload": {"i": i, "pad": "x" * (i % 7) * 100}},
            headers={"Authorization": f"Bearer {tokens[subject]}"},
        )
        assert response.status_code == 202, response.text

    for i in range(rounds):
        await one("alice" if i % 3 else "bob", i)
    for burst in range(rounds // 10):
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, "alice" if i % 2 else "bob", 1000 + burst * 10 + i)


async def history(provider: RunningProvider, http: httpx.AsyncClient) -> list[dict[str, Any]]:
    """Every event stored, in the provider's order (a service's replay)."""
    service = provider.token("svc", audience=INTERNAL_AUDIENCE)
    response = await http.get(
        provider.url + "/stream",
        params={"name": NAME, "replay": "true", "follow": "false"},
        headers={"Authorization": f"Bearer {service}"},
    )
    assert response.status_code == 200
    return [msgspec.json.decode(line) for line in response.content.splitlines() if line]


async def test_every_listener_gets_exactly_its_events_in_order() -> None:
    config = ProviderConfig(secret=SECRET, keepalive=None)
    # (owner seen, HTTP version): 1.1 streams are chunked, 1.0 close-delimited.
    kinds = [("alice", "1.1")] * 12 + [("bob", "1.1")] * 6 + [(None, "1.1")] * 6
    kinds += [("alice", "1.0"), (None, "1.0")]
    bodies: list[bytes] = [b""] * len(kinds)

    async def drain(index: int, stream: trio.SocketStream, version: str) -> None:
        bodies[index] = await read_to_end(stream, chunked=version == "1.1")

    async with httpx.AsyncClient(timeout=WAIT) as http, trio.open_nursery() as readers:
        # Leaving the provider's block ends every stream (last chunk, or close).
        async with open_provider(config) as provider:
            tokens = {s: provider.token(s) for s in ("alice", "bob")}
            service = provider.token("svc", audience=INTERNAL_AUDIENCE)
            for index, (owner, version) in enumerate(kinds):
                token = service if owner is None else tokens[owner]
                stream = await open_raw(provider, token, version=version)
                readers.start_soon(drain, index, stream, version)
            await subscribed(provider, len(kinds))
            await publish_all(http, provider, tokens, rounds=60)
            stored = await history(provider, http)
    assert len(stored) == 60 + 60
    for (owner, version), raw in zip(kinds, bodies, strict=True):
        body = dechunk(raw) if version == "1.1" else raw
        expected = [e["id"] for e in stored if owner is None or e["identity_id"] == owner]
        assert ids(body) == expected, (owner, version)


async def test_a_listener_that_stops_reading_is_cut_and_the_others_miss_nothing() -> None:
    config = ProviderConfig(secret=SECRET, keepalive=None, listener_queue=4)
    bodies: list[bytes] = [b""] * 8

    async def drain(index: int, stream: trio.SocketStream) -> None:
        bodies[index] = await read_to_end(stream)

    async with httpx.AsyncClient(timeout=WAIT) as http, trio.open_nursery() as readers:
        async with open_provider(config) as provider:
            token = provider.token("alice")
            auth = {"Authorization": f"Bearer {token}"}
            slow = await open_raw(provider, token, rcvbuf=4096)
            for index in range(len(bodies)):
                readers.start_soon(drain, index, await open_raw(provider, token))
            await subscribed(provider, 1 + len(bodies))
            published = 0
            while memory(provider).stats.slow_disconnects == 0:
                assert published < 500, "the slow listener was never cut"
                with trio.fail_after(2):  # publishing never waits for a listener
                    response = await http.post(
                        provider.url, json={"name": NAME, "payload": "x" * 65536}, headers=auth
                    )
                assert response.status_code == 202
                published += 1
            for i in range(5):  # after the cut, small events still reach the others
                response = await http.post(
                    provider.url, json={"name": NAME, "payload": i}, headers=auth
                )
                assert response.status_code == 202
            # The slow stream: what it held, in order, then its last chunk.
            held = ids(dechunk(await read_to_end(slow)))
            stored = [e["id"] for e in await history(provider, http)]
    assert memory(provider).stats.slow_disconnects == 1
    assert len(stored) == published + 5
    for body in bodies:
        assert ids(dechunk(body)) == stored
    assert 0 < len(held) < len(stored)
    assert held == stored[: len(held)]
