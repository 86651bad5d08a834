"""Backends benchmark: publishes/s and delivered events/s, memory vs Redis vs PostgreSQL.

Run from the repository root (the shared Redis and PostgreSQL must answer)::

    python -m benchmarks.backends                 # all backends, 1 and 2 processes
    python -m benchmarks.backends --seconds 10 --backends redis

For each backend and each process count it starts that many ``bus-events serve``
processes (separate ports, one backend), one broadcast listener per process (a
raw socket that counts envelopes), and one ``wrk`` per process POSTing small
events (2 threads each, ``--connections`` in all).  It prints a Markdown table of
absolute rates and ratios to the one-process memory row of the same run, beside
what the backend alone does (``redis-benchmark`` XADD, ``pgbench`` of the
provider's INSERT).  Redis keys (a fresh prefix) and PostgreSQL tables (a fresh
schema) are removed afterwards.  Nothing leaves 127.0.0.1.

Memory with two processes means two *independent* providers (nothing shared):
the row shows what the HTTP layer alone scales to, not a deployment.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECRET = "backends-benchmark-secret-0123456789abcdef"
REDIS_ADDR = os.environ.get("BUS_EVENTS_TEST_REDIS_ADDR", "127.0.0.1:6379")
POSTGRES_DSN = os.environ.get(
    "BUS_EVENTS_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
NAME = "bench.backend"
PAYLOAD = '{"name":"bench.backend","payload":{"order":12345,"item":"widget","qty":3}}'

_LUA = """
wrk.method = "POST"
wrk.body = os.getenv("BUS_BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BUS_BENCH_TOKEN")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _wait_port(port: int, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"serve on port {port} did not start within {limit} s")


def _token(audience: str = "ai.hg.fi/api") -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from busevents.provider import mint_token

    return mint_token(
        SECRET.encode(),
        subject="bench",
        scopes="events:send events:listen",
        audience=audience,
        ttl=3600,
    )


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    env["PYTHONPATH"] = str(ROOT / "src")
    env["BUS_API_JWT_SECRET"] = SECRET
    env.update(extra)
    return env


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _servers(backend: str, count: int, extra: dict[str, str]) -> Iterator[list[tuple[int, int]]]:
    ports = [_free_port() for _ in range(count)]
    procs = []
    try:
        for port in ports:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "busevents",
                        "serve",
                        "--addr",
                        f"127.0.0.1:{port}",
                        "--events-backend",
                        backend,
                    ],
                    env=_env(extra),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in ports:
            _wait_port(port)
        yield [(port, proc.pid) for port, proc in zip(ports, procs, strict=True)]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class _Listener(threading.Thread):
    """A broadcast stream on one process, counting envelopes (``{"id":"``) as they arrive."""

    def __init__(self, port: int, token: str) -> None:
        super().__init__(daemon=True)
        self.count = 0
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.sendall(
            f"GET /api/v1/events/stream?name={NAME} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        self._stop = False

    def run(self) -> None:
        tail = b""
        while not self._stop:
            try:
                data = self._sock.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            chunk = tail + data
            self.count += chunk.count(b'{"id":"') - tail.count(b'{"id":"')
            tail = chunk[-8:]

    def stop(self) -> None:
        self._stop = True
        self._sock.close()


def _wrk(
    port: int, seconds: int, connections: int, token: str, script: Path
) -> tuple[float, int, int]:
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/api/v1/events",
        ],
        env={**os.environ, "BUS_BENCH_TOKEN": token, "BUS_BENCH_BODY": PAYLOAD},
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rate, int(bad.group(1)) if bad else 0, total


def _measure(
    backend: str, count: int, extra: dict[str, str], seconds: int, connections: int, script: Path
) -> dict[str, float]:
    token, service = _token(), _token("ai.hg.fi/internal")
    with _servers(backend, count, extra) as servers:
        ports = [port for port, _ in servers]
        listeners = [_Listener(port, service) for port in ports]
        for listener in listeners:
            listener.start()
        time.sleep(0.5)
        load0 = os.getloadavg()[0]
        cpu0 = sum(_cpu_seconds(pid) for _, pid in servers)
        results: list[tuple[float, int, int]] = []
        start = time.monotonic()
        threads = [
            threading.Thread(
                target=lambda p=port: results.append(
                    _wrk(p, seconds, max(connections // count, 2), token, script)
                )
            )
            for port in ports
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - start
        time.sleep(1.0)  # let the listeners catch up with the tail
        cpu = sum(_cpu_seconds(pid) for _, pid in servers) - cpu0
        delivered = sum(listener.count for listener in listeners)
        for listener in listeners:
            listener.stop()
        published = sum(total for _, _, total in results)
        return {
            "publish": sum(rate for rate, _, _ in results),
            "errors": sum(bad for _, bad, _ in results),
            # Provider CPU (publishing and delivering to the listeners) per event published:
            # unlike the rates, it hardly depends on what else the machine is doing.
            "cpu_ms": 1000 * cpu / max(published, 1),
            "delivered": delivered / elapsed,
            "load": max(load0, os.getloadavg()[0]),
        }


def _redis_alone(seconds: int) -> str:
    if shutil.which("redis-benchmark") is None:
        return "redis-benchmark not installed"
    host, _, port = REDIS_ADDR.rpartition(":")
    key = f"bench-backends-{secrets.token_hex(4)}"
    body = "x" * 100
    try:
        out = subprocess.run(
            [
                "redis-benchmark",
                "-h",
                host,
                "-p",
                port,
                "-q",
                "-c",
                "32",
                "-n",
                str(40_000 * seconds),
                "XADD",
                key,
                "MAXLEN",
                "~",
                "100000",
                "*",
                "i",
                "bench",
                "t",
                body,
            ],
            capture_output=True,
            text=True,
            timeout=seconds * 20,
            check=True,
        ).stdout
    finally:
        subprocess.run(["redis-cli", "-h", host, "-p", port, "DEL", key], capture_output=True)
    found = re.findall(r"([\d.]+) requests per second", out)
    return f"{float(found[-1]):,.0f} XADD/s (redis-benchmark, 32 clients)" if found else out


def _postgres_alone(schema: str, seconds: int) -> str:
    if shutil.which("pgbench") is None:
        return "pgbench not installed"
    sys.path.insert(0, str(ROOT / "src"))
    from busevents.provider.backends._postgres import _INSERT, _LOCK_PUBLISH

    sql = _INSERT.replace("%s, %s, %s", "'bench.backend', 'bench', '\\x00'::bytea")
    script = (
        f"SET search_path = {schema};\nBEGIN;\nSELECT pg_advisory_xact_lock({_LOCK_PUBLISH});\n"
        + " ".join(sql.split())
        + ";\nSELECT pg_notify('bench', 'x');\nCOMMIT;\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as fh:
        fh.write(script)
    try:
        out = subprocess.run(
            [
                "pgbench",
                "-n",
                "-c",
                "8",
                "-j",
                "2",
                "-T",
                str(seconds),
                "-f",
                fh.name,
                POSTGRES_DSN,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        ).stdout
    finally:
        os.unlink(fh.name)
    found = re.search(r"tps = ([\d.]+)", out)
    return (
        f"{float(found.group(1)):,.0f} publish transactions/s (pgbench, 8 clients)"
        if found
        else out
    )


def _psql(sql: str) -> None:
    subprocess.run(["psql", POSTGRES_DSN, "-qc", sql], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backends", description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections in all")
    parser.add_argument("--backends", default="memory,redis,postgres")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is missing: apt-get install -y wrk", file=sys.stderr)
        return 1
    backends = args.backends.split(",")
    prefix = f"bench-{secrets.token_hex(4)}:"
    schema = f"bench_{secrets.token_hex(4)}"
    rows: list[tuple[str, int, dict[str, float]]] = []
    notes: list[str] = []
    with ExitStack() as cleanup, tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_LUA)
        if "postgres" in backends:
            _psql(f"CREATE SCHEMA {schema}")
            cleanup.callback(_psql, f"DROP SCHEMA {schema} CASCADE")
        if "redis" in backends:
            host, _, port = REDIS_ADDR.rpartition(":")

            def drop_keys() -> None:
                keys = subprocess.run(
                    ["redis-cli", "-h", host, "-p", port, "--scan", "--pattern", prefix + "*"],
                    capture_output=True,
                    text=True,
                ).stdout.split()
                if keys:
                    subprocess.run(
                        ["redis-cli", "-h", host, "-p", port, "DEL", *keys], capture_output=True
                    )

            cleanup.callback(drop_keys)
        extras = {
            "memory": {},
            "redis": {"BUS_EVENTS_REDIS_ADDR": REDIS_ADDR, "BUS_EVENTS_REDIS_PREFIX": prefix},
            "postgres": {
                "BUS_EVENTS_POSTGRES_DSN": POSTGRES_DSN
                + ("&" if "?" in POSTGRES_DSN else "?")
                + f"options=-csearch_path%3D{schema}"
            },
        }
        for backend in backends:
            for count in (1, 2):
                print(f"measuring {backend} x{count} ...", file=sys.stderr)
                result = _measure(
                    backend, count, extras[backend], args.seconds, args.connections, script
                )
                rows.append((backend, count, result))
        if "redis" in backends:
            notes.append("Redis alone: " + _redis_alone(args.seconds))
        if "postgres" in backends:
            notes.append("PostgreSQL alone: " + _postgres_alone(schema, args.seconds))
    base = rows[0][2]["publish"] or 1.0
    one = {backend: r["publish"] for backend, count, r in rows if count == 1}
    print(
        f"Machine: {os.cpu_count()} CPUs; wrk -t2 per process, {args.connections} connections "
        f"in all, {args.seconds} s per row; ratios to the first row.\n"
    )
    print(
        "| backend | processes | publishes/s | ratio | x of 1 process | delivered/s "
        "| provider CPU ms/publish | non-2xx | load avg |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for backend, count, r in rows:
        scale = r["publish"] / (one.get(backend) or 1.0)
        print(
            f"| {backend} | {count} | {r['publish']:,.0f} | {r['publish'] / base:.2f} | "
            f"{scale:.2f} | {r['delivered']:,.0f} | {r['cpu_ms']:.2f} | {r['errors']:.0f} "
            f"| {r['load']:.2f} |"
        )
    print()
    for note in notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
