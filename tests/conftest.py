"""Shared fixtures: a real reference provider on 127.0.0.1 and the CLI as a subprocess."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from busevents.provider import RunningProvider, open_provider

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
async def provider() -> AsyncIterator[RunningProvider]:
    """A reference provider on a free loopback port, stopped after the test."""
    async with open_provider() as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A plain httpx client, for requests the SDK would not make."""
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture
def unused_url() -> str:
    """An events URL on a loopback port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/v1/events"


@dataclass
class Result:
    """What a user sees of one CLI run."""

    status: int
    stdout: bytes
    stderr: str

    @property
    def out(self) -> str:
        return self.stdout.decode()


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment: no BUS_* settings leak in, HOME and config root are private."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("BUS_", "XDG_", "NO_COLOR"))
    }
    env["HOME"] = str(home)
    env["PYTHONPATH"] = SRC
    return env


@pytest.fixture
def run_cli(cli_env: dict[str, str], tmp_path: Path):
    """Run ``bus-events ARGS`` as a subprocess (``python -m busevents``)."""

    async def run(
        *args: str,
        env: Mapping[str, str] | None = None,
        stdin: bytes = b"",
        cwd: Path | None = None,
    ) -> Result:
        merged = {**cli_env, **(env or {})}
        proc = await trio.run_process(
            [sys.executable, "-m", "busevents", *args],
            env=merged,
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=str(cwd or tmp_path),
        )
        return Result(proc.returncode, proc.stdout, proc.stderr.decode())

    return run


# -- backend services (Redis, PostgreSQL) ------------------------------------------

REDIS_ENV = "BUS_EVENTS_TEST_REDIS_ADDR"
POSTGRES_ENV = "BUS_EVENTS_TEST_POSTGRES_DSN"
#: Set by .ci/run: a missing service fails the tests that need it instead of skipping them.
REQUIRE_ENV = "BUS_EVENTS_TEST_REQUIRE_SERVICES"


def _missing_service(what: str, variable: str, detail: str) -> None:
    message = f"{what} not reachable ({detail}); set {variable} to run these tests"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1: services are required here)")
    pytest.skip(message)


def delete_redis_prefix(addr: str, prefix: str) -> None:
    """Delete every key starting with ``prefix`` (with redis-cli, which the test machine has)."""
    import subprocess

    host, _, port = addr.rpartition(":")
    base = ["redis-cli", "-h", host, "-p", port]
    found = subprocess.run(
        [*base, "--scan", "--pattern", prefix + "*"], capture_output=True, check=True, timeout=20
    )
    keys = found.stdout.decode().split()
    if keys:
        subprocess.run([*base, "DEL", *keys], capture_output=True, check=True, timeout=20)


@pytest.fixture(scope="session")
def redis_addr() -> str:
    """``host:port`` of the test Redis; skips (or fails under CI) when it does not answer."""
    addr = os.environ.get(REDIS_ENV, "127.0.0.1:6379")
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            answer = sock.recv(64)
    except OSError as exc:
        _missing_service(f"Redis at {addr}", REDIS_ENV, str(exc))
    if not answer.startswith(b"+PONG"):
        _missing_service(f"Redis at {addr}", REDIS_ENV, f"answered {answer[:40]!r}")
    return addr


@pytest.fixture(scope="session")
def postgres_base_dsn() -> str:
    """DSN of the test database; skips (or fails under CI) when it does not answer."""
    dsn = os.environ.get(POSTGRES_ENV, "postgresql://postgres@127.0.0.1:5432/test")
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        _missing_service("PostgreSQL", POSTGRES_ENV, str(exc).splitlines()[0])
    return dsn


@pytest.fixture
def redis_prefix(redis_addr: str) -> Iterator[str]:
    """A fresh key prefix in the test Redis; its keys are deleted after the test."""
    import secrets

    prefix = f"bus-test-{secrets.token_hex(6)}:"
    yield prefix
    delete_redis_prefix(redis_addr, prefix)


@pytest.fixture
def postgres_dsn(postgres_base_dsn: str) -> Iterator[str]:
    """A DSN whose search_path is a fresh schema; the schema is dropped after the test."""
    import secrets

    import psycopg
    from psycopg.conninfo import make_conninfo

    schema = f"bus_test_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_base_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield make_conninfo(postgres_base_dsn, options=f"-c search_path={schema}")
    finally:
        with psycopg.connect(postgres_base_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
