"""Bounds that hold on every backend (issue 20): replay memory, unicast groups, keys and rows.

Each test runs a real `bus-events serve` child process on the memory, Redis and
PostgreSQL backends, with the same options and the same numbers.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
import trio

from busevents.provider import (
    PostgresOptions,
    ProviderConfig,
    RedisOptions,
    mint_token,
    open_provider,
)

from .conftest import SRC
from .helpers import serve_subprocess

SECRET = "bounds-test-secret-0123456789abcdef"


def token(subject: str) -> str:
    return mint_token(SECRET.encode(), subject=subject, scopes="events:send events:listen")


def auth(subject: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(subject)}"}


@pytest.fixture(params=["memory", "redis", "postgres"])
def backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    env["BUS_API_JWT_SECRET"] = SECRET
    env["PYTHONPATH"] = SRC
    if request.param == "redis":
        env["BUS_EVENTS_REDIS_ADDR"] = request.getfixturevalue("redis_addr")
        env["BUS_EVENTS_REDIS_PREFIX"] = request.getfixturevalue("redis_prefix")
    elif request.param == "postgres":
        env["BUS_EVENTS_POSTGRES_DSN"] = request.getfixturevalue("postgres_dsn")
    return request.param, env


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def raw_request(url: str, target: str, headers: dict[str, str]) -> trio.SocketStream:
    parts = urlsplit(url)
    sock = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{key}: {value}" for key, value in headers.items()]
    await sock.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


async def read_all(sock: trio.SocketStream) -> bytes:
    parts = []
    while data := await sock.receive_some(1 << 20):
        parts.append(data)
    await sock.aclose()
    return b"".join(parts)


def ndjson_ids(response: bytes) -> list[str]:
    """The event ids in a raw chunked NDJSON response (lines may span chunks)."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    data = bytearray()
    while body:
        size_text, _, rest = body.partition(b"\r\n")
        size = int(size_text, 16)
        if size == 0:
            break
        data += rest[:size]
        body = rest[size + 2 :]
    return [json.loads(line)["id"] for line in bytes(data).splitlines() if line.strip()]


@pytest.mark.timeout(240)
async def test_replays_that_do_not_read_hold_bounded_memory(
    backend: tuple[str, dict[str, str]],
) -> None:
    kind, env = backend
    name = f"example.big{secrets.token_hex(3)}"
    payload = "x" * 1_000_000
    args = ["--events-backend", kind, "--max-body", str(2 << 20), "--history-bytes", str(96 << 20)]
    async with serve_subprocess(env, *args) as (url, proc):
        async with httpx.AsyncClient(timeout=60) as http:
            published = []
            for i in range(40):
                response = await http.post(
                    url, json={"name": name, "payload": [i, payload]}, headers=auth("big")
                )
                assert response.status_code == 202, response.text
                published.append(response.json()["id"])
        before = rss_bytes(proc.pid)
        target = f"{urlsplit(url).path}/stream?name={name}&replay=true&follow=false"
        socks = []
        for _ in range(8):
            socks.append(await raw_request(url, target, auth("big")))
        peak = before
        for _ in range(30):  # the replays start and stall; sample the provider meanwhile
            await trio.sleep(0.1)
            peak = max(peak, rss_bytes(proc.pid))
        assert peak - before < 128 << 20, f"RSS grew {(peak - before) >> 20} MiB"
        bodies: dict[int, bytes] = {}

        async def read(i: int) -> None:
            bodies[i] = await read_all(socks[i])

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(len(socks)):
                    nursery.start_soon(read, i)
    for body in bodies.values():
        assert ndjson_ids(body) == published


def redis_keys(addr: str, prefix: str) -> list[str]:
    host, _, port = addr.rpartition(":")
    found = subprocess.run(
        ["redis-cli", "-h", host, "-p", port, "--scan", "--pattern", prefix + "*"],
        capture_output=True,
        check=True,
        timeout=20,
    )
    return found.stdout.decode().split()


def group_rows(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM bus_event_group_cursors").fetchone()
    return int(row[0]) if row else 0


async def open_group(url: str, subject: str, name: str, group: str) -> trio.SocketStream | int:
    """A unicast stream of ``group``: its socket when it opened (200), else the status."""
    target = f"{urlsplit(url).path}/stream?name={name}&delivery=unicast&group={group}"
    sock = await raw_request(url, target, auth(subject))
    head = b""
    while b"\r\n\r\n" not in head:
        data = await sock.receive_some(4096)
        assert data, head
        head += data
    status = int(head.split(b" ", 2)[1])
    if status == 200:
        return sock
    response = head + await read_all(sock)
    assert b'"too_many_groups"' in response or status != 429, response
    return status


@pytest.mark.timeout(120)
async def test_unicast_groups_are_bounded_and_freed_with_their_keys_and_rows(
    backend: tuple[str, dict[str, str]],
) -> None:
    kind, env = backend
    args = ["--events-backend", kind, "--max-groups", "5", "--max-groups-per-identity", "3"]
    args += ["--group-idle", "1s"]
    unpublished = f"example.none{secrets.token_hex(3)}"
    async with serve_subprocess(env, *args) as (url, _proc):
        with trio.fail_after(60):
            alice = [await open_group(url, "alice", f"{unpublished}.{i}", "g") for i in range(4)]
            bob = [await open_group(url, "bob", unpublished, f"g{i}") for i in range(3)]
            statuses = [r if isinstance(r, int) else 200 for r in alice + bob]
            # Three per identity, five in all: alice's fourth and bob's third are refused.
            assert statuses == [200, 200, 200, 429, 200, 200, 429]
            for sock in alice + bob:
                if not isinstance(sock, int):
                    await sock.aclose()
            # Idle groups are freed: then a new one can open again.
            again = await open_group(url, "carol", unpublished, "g")
            while isinstance(again, int):
                await trio.sleep(0.2)  # the provider frees idle groups on its own
                again = await open_group(url, "carol", unpublished, "g")
            await again.aclose()
            if kind == "redis":
                # Nothing was published: no stream key was made, and freed groups leave
                # nothing behind in the registry either.
                prefix = env["BUS_EVENTS_REDIS_PREFIX"]
                assert not [
                    k for k in redis_keys(env["BUS_EVENTS_REDIS_ADDR"], prefix) if ":s:" in k
                ]
                while redis_keys(env["BUS_EVENTS_REDIS_ADDR"], prefix):  # noqa: ASYNC110
                    await trio.sleep(0.2)
            if kind == "postgres":
                while group_rows(env["BUS_EVENTS_POSTGRES_DSN"]):  # noqa: ASYNC110
                    await trio.sleep(0.2)


@pytest.fixture(params=["redis", "postgres"])
def durable(request: pytest.FixtureRequest) -> ProviderConfig:
    if request.param == "redis":
        options = RedisOptions(
            addr=request.getfixturevalue("redis_addr"),
            prefix=request.getfixturevalue("redis_prefix"),
        )
        return ProviderConfig(
            secret=SECRET.encode(), backend="redis", redis=options, listener_queue=4
        )
    dsn = request.getfixturevalue("postgres_dsn")
    return ProviderConfig(
        secret=SECRET.encode(),
        backend="postgres",
        postgres=PostgresOptions(dsn=dsn, poll_interval=0.5),
        listener_queue=4,
    )


async def test_a_slow_listener_is_cut_on_the_durable_backends_too(
    durable: ProviderConfig,
) -> None:
    async with open_provider(durable) as provider, httpx.AsyncClient(timeout=10) as http:
        fanout = getattr(provider.backend, "fanout")  # noqa: B009 (durable backends only)
        host, port = provider.origin.removeprefix("http://").rsplit(":", 1)
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, int(port)))
        slow = trio.SocketStream(sock)
        await slow.send_all(
            b"GET /api/v1/events/stream?name=example.big HTTP/1.1\r\nHost: t\r\n"
            b"Authorization: Bearer " + token("alice").encode() + b"\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += await slow.receive_some(1)
        assert head.startswith(b"HTTP/1.1 200")
        published = 0
        while fanout.slow_disconnects == 0:
            assert published < 500, "the slow listener was never cut"
            response = await http.post(
                provider.url,
                json={"name": "example.big", "payload": "x" * 65536},
                headers=auth("alice"),
            )
            assert response.status_code == 202
            published += 1
            await trio.sleep(0.01)  # the name's reader hands it over meanwhile
        # The slow stream ends (chunked terminator) after what it held.
        data = b""
        with trio.fail_after(20):
            while not data.endswith(b"\r\n0\r\n\r\n"):
                data += await slow.receive_some(1 << 20)
        assert 0 < data.count(b'"name":"example.big"') < published
        await slow.aclose()
