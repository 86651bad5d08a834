"""Scale: many idle streams on one `serve` process, on every backend (issue 20).

A following stream costs memory in the provider, not a backend connection: 2,000
streams over a few names hold at most ``names + 16`` Redis connections, publishes
still answer, ``/readyz`` stays 200, and every listener gets its name's event.
The streams are raw loopback sockets (an HTTP/1.1 request each), so the test
process stays light; the provider is a real child process.
"""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from busevents.provider import mint_token

from .conftest import SRC
from .helpers import serve_subprocess

SECRET = "scale-test-secret-0123456789abcdef"
STREAMS = 2_000
NAMES = 20


def token(subject: str) -> str:
    return mint_token(SECRET.encode(), subject=subject, scopes="events:send events:listen")


def serve_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    env["BUS_API_JWT_SECRET"] = SECRET
    env["PYTHONPATH"] = SRC
    return env


@pytest.fixture(params=["memory", "redis", "postgres"])
def backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    env = serve_env()
    if request.param == "redis":
        env["BUS_EVENTS_REDIS_ADDR"] = request.getfixturevalue("redis_addr")
        env["BUS_EVENTS_REDIS_PREFIX"] = request.getfixturevalue("redis_prefix")
    elif request.param == "postgres":
        env["BUS_EVENTS_POSTGRES_DSN"] = request.getfixturevalue("postgres_dsn")
    return request.param, env


def enough_files(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count:
        if hard != resource.RLIM_INFINITY and hard < count:
            pytest.skip(f"needs {count} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


class RawStream:
    """One following stream on a raw socket: the request sent, the body read as it comes."""

    def __init__(self, sock: trio.SocketStream, name: str) -> None:
        self.sock = sock
        self.name = name
        self.seen = b""

    @classmethod
    async def open(cls, url: str, name: str, bearer: str) -> RawStream:
        parts = urlsplit(url)
        sock = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
        request = (
            f"GET {parts.path}/stream?name={name} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Authorization: Bearer {bearer}\r\n\r\n"
        )
        await sock.send_all(request.encode())
        stream = cls(sock, name)
        await stream.until(b"\r\n\r\n")
        assert stream.seen.startswith(b"HTTP/1.1 200"), stream.seen[:200]
        return stream

    async def until(self, needle: bytes) -> None:
        while needle not in self.seen:
            data = await self.sock.receive_some(65536)
            assert data, f"the stream ended before {needle!r}: {self.seen[-300:]!r}"
            self.seen += data


async def open_streams(url: str, bearer: str, prefix: str) -> list[RawStream]:
    streams: list[RawStream] = []
    limiter = trio.CapacityLimiter(64)

    async def one(i: int) -> None:
        async with limiter:
            streams.append(await RawStream.open(url, f"{prefix}{i % NAMES}", bearer))

    async with trio.open_nursery() as nursery:
        for i in range(STREAMS):
            nursery.start_soon(one, i)
    return streams


def redis_clients(addr: str, client_name: str) -> int:
    host, _, port = addr.rpartition(":")
    listing = subprocess.run(
        ["redis-cli", "-h", host, "-p", port, "CLIENT", "LIST"],
        capture_output=True,
        check=True,
        timeout=20,
    ).stdout.decode()
    return len(re.findall(rf"\bname={re.escape(client_name)}\s", listing))


@asynccontextmanager
async def closing(streams: list[RawStream]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for stream in streams:
            await stream.sock.aclose()


@pytest.mark.timeout(300)  # opening 2,000 streams takes long on a busy 2-core machine
async def test_two_thousand_idle_streams_cost_no_backend_connections(
    backend: tuple[str, dict[str, str]],
) -> None:
    kind, env = backend
    enough_files(2 * STREAMS + 500)
    bearer = token("scale-user")
    prefix = f"example.s{secrets.token_hex(3)}."
    async with serve_subprocess(env, "--events-backend", kind) as (url, proc):
        with trio.fail_after(240):
            streams = await open_streams(url, bearer, prefix)
        async with closing(streams), httpx.AsyncClient(timeout=30) as http:
            assert len(streams) == STREAMS
            if kind == "redis":
                clients = redis_clients(env["BUS_EVENTS_REDIS_ADDR"], f"bus-events:{proc.pid}")
                assert 0 < clients <= NAMES + 16
            ids: dict[str, str] = {}
            with trio.fail_after(60):
                for i in range(NAMES):
                    response = await http.post(
                        url,
                        json={"name": f"{prefix}{i}", "payload": {"i": i}},
                        headers={"Authorization": f"Bearer {bearer}"},
                    )
                    assert response.status_code == 202, response.text
                    ids[f"{prefix}{i}"] = response.json()["id"]
                ready = await http.get(url.split("/api/")[0] + "/readyz")
                assert ready.status_code == 200, ready.text
                async with trio.open_nursery() as nursery:
                    for stream in streams:
                        nursery.start_soon(stream.until, b'"name":"' + prefix.encode())
            received: dict[str, int] = {}
            for stream in streams:
                body = stream.seen.partition(b"\r\n\r\n")[2]
                line = next(line for line in body.split(b"\r\n") if line.startswith(b"{"))
                event = json.loads(line)
                assert event["name"] == stream.name
                assert ids[event["name"]] == event["id"]
                received[event["name"]] = received.get(event["name"], 0) + 1
            assert received == dict.fromkeys(ids, STREAMS // NAMES)
