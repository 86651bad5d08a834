"""`bus-events serve --workers N`: real processes sharing one address (issue 20, item 5).

Which worker holds a connection is read from /proc: the socket inode of the
server side of the connection (``/proc/net/tcp``) among each worker's file
descriptors.  Redis backend: the workers share events through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import trio

from busevents.provider import mint_token

SECRET = "workers-tests-secret-0123456789abcdef0123456789"

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; SO_REUSEPORT")


def token() -> str:
    return mint_token(SECRET.encode(), subject="alice", scopes="events:send events:listen")


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        pids = {int(p) for p in file.read().split()}
    workers = set()
    for child in pids:  # not multiprocessing's resource tracker
        with open(f"/proc/{child}/cmdline", "rb") as file:
            if b"pipe_handle" in file.read():
                workers.add(child)
    return workers


def _owner_now(workers: set[int], wanted: str) -> int | None:
    with open("/proc/net/tcp") as file:
        inode = next(line.split()[9] for line in file if wanted in line)
    for pid in workers if inode != "0" else ():  # 0: still in the accept queue
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
    return None


async def owner(workers: set[int], server_port: int, client_port: int) -> int:
    """The worker whose socket is the server side of 127.0.0.1:client_port's connection,
    once a worker has accepted it."""
    wanted = f"0100007F:{server_port:04X} 0100007F:{client_port:04X}"
    with trio.fail_after(30):
        while (pid := _owner_now(workers, wanted)) is None:  # noqa: ASYNC110
            await trio.sleep(0.05)
    return pid


async def connect(url: str) -> tuple[trio.SocketStream, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    return stream, stream.socket.getsockname()[1]


def request(method: str, url: str, body: bytes = b"") -> bytes:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    head = f"{method} {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {token()}"
    if body:
        head += f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    return (head + "\r\n\r\n").encode() + body


async def read_until(stream: trio.SocketStream, marker: bytes, data: bytes = b"") -> bytes:
    while marker not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, data
        data += chunk
    return data


async def wait_until(predicate: object, seconds: float = 60) -> None:
    with trio.fail_after(seconds):
        while not predicate():  # type: ignore[operator]  # noqa: ASYNC110
            await trio.sleep(0.1)


@pytest.fixture
async def supervisor(
    cli_env: dict[str, str], redis_addr: str, redis_prefix: str
) -> AsyncIterator[tuple[str, trio.Process, str]]:
    env = {**cli_env, "BUS_API_JWT_SECRET": SECRET, "BUS_EVENTS_REDIS_ADDR": redis_addr}
    argv = [sys.executable, "-m", "busevents", "serve", "--addr", "127.0.0.1:0"]
    argv += ["--workers", "2", "--events-backend", "redis", "--redis-prefix", redis_prefix]
    # Redis readers block up to 1 s in a shielded XREAD: the grace leaves them time.
    argv += ["--shutdown-grace", "5s", "--metrics-addr", "127.0.0.1:0"]
    proc = await trio.lowlevel.open_process(argv, env=env, stderr=subprocess.PIPE)
    workers: set[int] = set()
    try:
        assert proc.stderr is not None
        seen = b""
        with trio.fail_after(90):  # two interpreters start; the machine may be busy
            while not (metrics := re.search(rb"metrics on (http://\S+/metrics)", seen)):
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, seen
                seen += chunk
        match = re.search(rb"on (http://\S+/api/v1/events)", seen)
        assert match is not None, seen
        workers = children(proc.pid)
        yield match.group(1).decode(), proc, metrics.group(1).decode()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        for pid in workers | (children(proc.pid) if proc.returncode is None else set()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_memory_backend_refuses_several_workers(run_cli) -> None:
    result = await run_cli("serve", "--workers", "2", env={"BUS_API_JWT_SECRET": SECRET})
    assert result.status == 2
    assert "--workers 2 needs a shared event store" in result.stderr
    assert "redis or postgres" in result.stderr


async def test_workers_that_cannot_reach_their_backend_exit_1(run_cli) -> None:
    result = await run_cli(
        *("serve", "--workers", "2", "--addr", "127.0.0.1:0", "--events-backend", "redis"),
        *("--redis-addr", "127.0.0.1:1"),
        env={"BUS_API_JWT_SECRET": SECRET},
    )
    assert result.status == 1, result.stderr
    assert "cannot start" in result.stderr and "Events API on" not in result.stderr


async def test_two_workers_share_one_port_and_their_events(
    supervisor: tuple[str, trio.Process, str],
) -> None:
    url, proc, _ = supervisor
    workers = children(proc.pid)
    assert len(workers) == 2
    port = urlsplit(url).port
    assert port is not None
    # Connections land on both workers (the kernel spreads them by address hash).
    socks: dict[int, list[tuple[trio.SocketStream, int]]] = {pid: [] for pid in workers}
    try:
        with trio.fail_after(60):
            while not all(socks.values()):
                sock, client_port = await connect(url)
                socks[await owner(workers, port, client_port)].append((sock, client_port))
        listener_pid, publisher_pid = sorted(workers)
        listener, _ = socks[listener_pid][0]
        publisher, _ = socks[publisher_pid][0]
        await listener.send_all(request("GET", url + "/stream?name=example.shared"))
        head = await read_until(listener, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        body = json.dumps({"name": "example.shared", "payload": {"via": "other"}}).encode()
        await publisher.send_all(request("POST", url, body))
        answer = await read_until(publisher, b"}")
        assert answer.startswith(b"HTTP/1.1 202"), answer
        event_id = json.loads(answer.partition(b"\r\n\r\n")[2])["id"]
        with trio.fail_after(20):
            got = await read_until(listener, event_id.encode(), head)
        line = next(x for x in got.split(b"\n") if event_id.encode() in x)
        assert json.loads(line)["payload"] == {"via": "other"}
    finally:
        for pairs in socks.values():
            for sock, _ in pairs:
                await sock.aclose()


async def test_sigterm_stops_every_worker_with_status_0(
    supervisor: tuple[str, trio.Process, str],
) -> None:
    url, proc, _ = supervisor
    workers = children(proc.pid)
    listener, _ = await connect(url)  # an open stream ends cleanly too
    try:
        await listener.send_all(request("GET", url + "/stream?name=example.bye"))
        head = await read_until(listener, b"\r\n\r\n")
        # Following for sure (an event arrived through it), then the stop.
        publisher, _ = await connect(url)
        await publisher.send_all(request("POST", url, b'{"name":"example.bye"}'))
        event_id = json.loads((await read_until(publisher, b"}")).partition(b"\r\n\r\n")[2])["id"]
        await publisher.aclose()
        await read_until(listener, event_id.encode(), head)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await proc.wait()
            rest = b""
            while chunk := await listener.receive_some(65536):
                rest += chunk
    finally:
        await listener.aclose()
    assert proc.returncode == 0
    assert rest.endswith(b"0\r\n\r\n")
    assert not [pid for pid in workers if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


async def test_a_killed_worker_is_restarted(supervisor: tuple[str, trio.Process, str]) -> None:
    url, proc, _ = supervisor
    before = children(proc.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    await wait_until(lambda: len(children(proc.pid) - {victim}) == 2)
    after = children(proc.pid)
    assert victim not in after and len(after - before) == 1
    port = urlsplit(url).port
    assert port is not None
    (new,) = after - before
    # The new worker serves: a connection that lands on it gets its publish stored.
    with trio.fail_after(60):
        while True:
            sock, client_port = await connect(url)
            try:
                if await owner(after, port, client_port) != new:
                    continue  # the old worker (or the new one not listening yet)
                await sock.send_all(request("POST", url, b'{"name":"example.again"}'))
                answer = await read_until(sock, b"}")
            finally:
                await sock.aclose()
            break
    assert answer.startswith(b"HTTP/1.1 202"), answer


async def test_every_worker_serves_the_metrics_address_on_one_port(
    supervisor: tuple[str, trio.Process, str],
) -> None:
    _, proc, metrics_url = supervisor
    port = urlsplit(metrics_url).port
    assert port is not None and port != 0
    workers = children(proc.pid)
    answered: set[int] = set()
    with trio.fail_after(60):
        while answered != workers:
            sock, client_port = await connect(metrics_url)
            try:
                answered.add(await owner(workers, port, client_port))
                await sock.send_all(
                    b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                reply = b""
                while chunk := await sock.receive_some(65536):  # Connection: close
                    reply += chunk
            finally:
                await sock.aclose()
            assert reply.startswith(b"HTTP/1.1 200") and b"busevents_provider_" in reply
