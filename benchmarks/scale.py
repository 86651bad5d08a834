"""Scale rows (issue 20): idle streams per process, fan-out to many listeners, GC stalls.

Run alone with ``python -m benchmarks.scale [--backend memory|redis|postgres]``, or
through the harness (``python -m benchmarks --only scale``).  Every provider is a real
``bus-events serve`` child process; clients are raw loopback sockets, so what is
measured is the provider, not a client library:

* ``scale.idle`` — RSS of the provider with 0 and ``N`` idle following streams (over
  20 names): memory per stream; and the longest ``/healthz`` answer while the streams
  open and just after (a full garbage-collection pass shows here as a stall).
* ``scale.fanout`` — p50/p99 publish → receive at 1,000 events/s to 100 listeners of
  one name.  Listeners run in two child processes with a bare ``epoll`` loop (one
  clock read per read call), the publisher is paced over 10 keep-alive sockets and
  stamps each event with ``CLOCK_MONOTONIC`` as it writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

SECRET = "scale-bench-secret-0123456789abcdef"
_STAMP = re.compile(rb'"t":(\d+)')


def _token() -> str:
    from busevents.provider import mint_token

    return mint_token(SECRET.encode(), subject="bench", scopes="events:send events:listen")


def _env(backend: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    env["BUS_API_JWT_SECRET"] = SECRET
    if backend == "redis":
        env["BUS_EVENTS_REDIS_ADDR"] = os.environ.get("BUS_EVENTS_REDIS_ADDR", "127.0.0.1:6379")
        env["BUS_EVENTS_REDIS_PREFIX"] = f"bench-scale-{os.getpid()}:"
    if backend == "postgres":
        env["BUS_EVENTS_POSTGRES_DSN"] = os.environ.get(
            "BUS_EVENTS_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
        )
    return env


@contextmanager
def provider(backend: str) -> Iterator[tuple[str, int]]:
    """A ``bus-events serve`` child on a free port: its events URL and pid."""
    argv = [sys.executable, "-m", "busevents", "serve", "--addr", "127.0.0.1:0"]
    argv += ["--events-backend", backend, "--keepalive", "0"]
    proc = subprocess.Popen(argv, env=_env(backend), stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        seen = b""
        deadline = time.monotonic() + 30
        while not (match := re.search(rb"on (http://\S+/api/v1/events)", seen)):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"serve did not start: {seen.decode(errors='replace')}")
            seen += os.read(proc.stderr.fileno(), 4096)
        yield match.group(1).decode(), proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if backend == "redis":
            env = _env(backend)
            host, _, port = env["BUS_EVENTS_REDIS_ADDR"].rpartition(":")
            keys = subprocess.run(
                [
                    "redis-cli",
                    "-h",
                    host,
                    "-p",
                    port,
                    "--scan",
                    "--pattern",
                    env["BUS_EVENTS_REDIS_PREFIX"] + "*",
                ],
                capture_output=True,
                check=False,
            ).stdout.split()
            if keys:
                subprocess.run(
                    ["redis-cli", "-h", host, "-p", port, "DEL", *keys],
                    capture_output=True,
                    check=False,
                )


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _open_stream(url: str, name: str, token: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80))
    sock.sendall(
        f"GET {parts.path}/stream?name={name} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            raise RuntimeError(f"stream refused: {head[:200]!r}")
        head += data
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream refused: {head[:200]!r}")
    return sock


def _probe_worst(url: str, seconds: float) -> float:
    """Longest ``/healthz`` answer (seconds) over ``seconds`` of probes 20 ms apart."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80))
    request = f"GET /healthz HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    worst = 0.0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            started = time.monotonic()
            sock.sendall(request)
            got = b""
            while not got.endswith(b"}"):
                got += sock.recv(4096)
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.02)
    finally:
        sock.close()
    return worst


def measure_idle(backend: str, streams: int) -> dict[str, Any]:
    """RSS per idle stream and the worst ``/healthz`` stall while and after opening them."""
    import threading

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < streams + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, streams + 200), hard))
    token = _token()
    with provider(backend) as (url, pid):
        time.sleep(0.5)
        base = _rss(pid)
        stall: dict[str, float] = {}
        done = threading.Event()

        def probe() -> None:
            worst = 0.0
            while not done.is_set():
                worst = max(worst, _probe_worst(url, 0.5))
            stall["worst"] = max(worst, _probe_worst(url, 2.0))

        prober = threading.Thread(target=probe)
        prober.start()
        started = time.monotonic()
        socks = [_open_stream(url, f"bench.idle{i % 20}", token) for i in range(streams)]
        opened = time.monotonic() - started
        done.set()
        prober.join()
        loaded = _rss(pid)
        for sock in socks:
            sock.close()
    return {
        "backend": backend,
        "streams": streams,
        "open_seconds": round(opened, 2),
        "rss_base_mib": round(base / 2**20, 1),
        "rss_mib": round(loaded / 2**20, 1),
        "kib_per_stream": round((loaded - base) / streams / 1024, 1),
        "worst_healthz_ms": round(stall.get("worst", 0.0) * 1000, 1),
    }


def _listen(url: str, name: str, streams: int, count: int, warmup: int) -> None:
    """Child: ``streams`` raw listeners in one epoll loop; prints latencies (ns) as JSON."""
    token = _token()
    socks = [_open_stream(url, name, token) for _ in range(streams)]
    poller = select.epoll()
    for sock in socks:
        sock.setblocking(False)
        poller.register(sock.fileno(), select.EPOLLIN)
    by_fd = {sock.fileno(): sock for sock in socks}
    seen = dict.fromkeys(by_fd, 0)
    latencies: list[int] = []
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    total = (count + warmup) * streams
    received = 0
    last = time.monotonic()
    while received < total and time.monotonic() - last < 5:
        for fd, _ in poller.poll(1.0):
            data = by_fd[fd].recv(1 << 16)
            now = time.monotonic_ns()
            last = time.monotonic()
            for match in _STAMP.finditer(data):
                seen[fd] += 1
                received += 1
                if seen[fd] > warmup:
                    latencies.append(now - int(match.group(1)))
    sys.stdout.write(json.dumps(latencies) + "\n")


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) that process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat", "rb") as file:
        fields = file.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _raw_post(sock: socket.socket, host: str, path: str, token: str, body: bytes) -> None:
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    got = b""
    while b"\r\n\r\n" not in got or not got.endswith(b"}"):
        got += sock.recv(4096)


def measure_fanout(backend: str, listeners: int, rate: float, seconds: float) -> dict[str, Any]:
    """p50/p99 publish → receive at ``rate`` events/s to ``listeners`` raw listeners."""
    import threading

    count, warmup = int(rate * seconds), int(rate * 0.5)
    token = _token()
    with provider(backend) as (url, pid):
        children = []
        for share in (listeners // 2, listeners - listeners // 2):
            argv = [sys.executable, "-m", "benchmarks.scale", "--listen", url, "bench.fan"]
            argv += [str(share), str(count), str(warmup)]
            child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            children.append(child)
        parts = urlsplit(url)
        connections = 10
        start = time.monotonic() + 0.05
        late = [0]

        def publisher(k: int) -> None:
            sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(k, count + warmup, connections):
                due = start + i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -0.001:
                    late[0] += 1
                body = b'{"name":"bench.fan","payload":{"t":%d,"i":%d}}' % (
                    time.monotonic_ns(),
                    i,
                )
                _raw_post(sock, parts.netloc, parts.path, token, body)
            sock.close()

        threads = [threading.Thread(target=publisher, args=(k,)) for k in range(connections)]
        cpu = _process_cpu(pid)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        samples: list[int] = []
        for child in children:
            out, _ = child.communicate(timeout=60)
            samples += json.loads(out.strip().splitlines()[-1])
        # Until every listener has its events: the provider's whole work for them.
        cpu = _process_cpu(pid) - cpu
    samples.sort()
    if not samples:
        return {"backend": backend, "error": "no event arrived"}
    return {
        "backend": backend,
        "listeners": listeners,
        "rate": rate,
        "samples": len(samples),
        "expected": count * listeners,
        "late_sends": late[0],
        "provider_cpu_us_per_event": round(cpu / (count + warmup) * 1e6, 1),
        "p50_ms": round(samples[len(samples) // 2] / 1e6, 2),
        "p99_ms": round(samples[int(len(samples) * 0.99)] / 1e6, 2),
    }


def measure_scale(quick: bool, rows: list[str], out: dict[str, Any]) -> None:
    """The harness's ``scale`` rows (memory backend; Redis with ``python -m benchmarks.scale``)."""
    from ._rows import Row

    if "scale.idle" in rows:
        r = out["scale.idle"] = Row.of("scale.idle", unit="KiB/stream")
        idle = measure_idle("memory", 200 if quick else 2000)
        r.value = idle["kib_per_stream"]
        r.details = idle
        r.note = (
            f"{idle['streams']} streams: RSS {idle['rss_base_mib']} -> {idle['rss_mib']} MiB; "
            f"worst /healthz {idle['worst_healthz_ms']} ms"
        )
    if "scale.fanout" in rows:
        r = out["scale.fanout"] = Row.of("scale.fanout", unit="s")
        fan = measure_fanout(
            "memory", 10 if quick else 100, 200 if quick else 1000, 1 if quick else 5
        )
        r.details = fan
        if "p99_ms" not in fan:
            r.error = str(fan.get("error"))
            return
        r.value = r.seconds = fan["p99_ms"] / 1000
        r.events = fan["samples"]
        r.intact = fan["samples"] == fan["expected"]
        r.target = "< 0.01"
        r.met = r.value < 0.01
        r.note = (
            f"p50 {fan['p50_ms']} ms, p99 {fan['p99_ms']} ms, {fan['late_sends']} late sends; "
            f"provider CPU {fan['provider_cpu_us_per_event']:,.0f} µs/event"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    parser.add_argument("--backend", action="append", choices=["memory", "redis", "postgres"])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--listeners", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only", choices=["idle", "fanout"])
    parser.add_argument("--listen", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.listen:
        url, name, streams, count, warmup = args.listen
        _listen(url, name, int(streams), int(count), int(warmup))
        return 0
    print(f"load {os.getloadavg()}", flush=True)
    for backend in args.backend or ["memory", "redis"]:
        if args.only in (None, "idle"):
            print(
                json.dumps({"row": "scale.idle", **measure_idle(backend, args.streams)}), flush=True
            )
        if args.only in (None, "fanout"):
            row = measure_fanout(backend, args.listeners, args.rate, args.seconds)
            print(json.dumps({"row": "scale.fanout", **row}), flush=True)
    print(f"load {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
