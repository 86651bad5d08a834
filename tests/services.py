"""Private Redis and PostgreSQL servers that a test may kill and restart.

Never the shared services: each server here runs on its own free loopback port
in the test's temporary directory, and is stopped when the test ends.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio


def _unavailable(reason: str) -> None:
    # Under .ci/run (BUS_EVENTS_TEST_REQUIRE_SERVICES=1) a missing tool fails, never skips.
    if os.environ.get("BUS_EVENTS_TEST_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (BUS_EVENTS_TEST_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def wait_port(port: int, limit: float = 15) -> None:
    with trio.fail_after(limit):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
            else:
                await stream.aclose()
                return


class PrivateRedis:
    """``redis-server`` on a free port; :meth:`stop` kills it, :meth:`start` starts it again.

    ``persistent``: with an append-only file synced on every write, so a restart
    keeps what Redis acknowledged; otherwise it keeps nothing (like the shared one).
    """

    def __init__(self, directory: Path, *, persistent: bool) -> None:
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self._dir = directory
        self._persistent = persistent
        self._proc: trio.Process | None = None

    async def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self._persistent
            else ["--appendonly", "no"]
        )
        self._proc = await trio.lowlevel.open_process(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *persistence,
                "--dir",
                str(self._dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await wait_port(self.port)

    async def stop(self) -> None:
        """Kill the server (SIGKILL: no chance to write anything more)."""
        if self._proc is not None:
            self._proc.kill()
            await self._proc.wait()
            self._proc = None


@asynccontextmanager
async def private_redis(
    directory: Path, *, persistent: bool = False
) -> AsyncIterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        _unavailable("redis-server is not installed")
    server = PrivateRedis(directory, persistent=persistent)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


class PrivatePostgres:
    """A PostgreSQL cluster made with ``initdb`` in a temporary directory.

    As root (CI and the development machines) the server runs as the
    ``postgres`` system user, as PostgreSQL requires.
    """

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._data = directory / "pgdata"
        self._log = directory / "pg.log"
        self._directory = directory
        self._ctl = _pg_bin("pg_ctl") or "pg_ctl"
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            self._prefix = ["runuser", "-u", "postgres", "--"]

    async def init(self) -> None:
        initdb = _pg_bin("initdb") or "initdb"
        if self._prefix:
            shutil.chown(self._directory, "postgres")
        await trio.run_process(
            [*self._prefix, initdb, "-D", str(self._data), "-U", "postgres", "--auth=trust", "-N"],
            capture_stdout=True,
            capture_stderr=True,
        )

    async def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self._directory} -F"
        await trio.run_process(
            [
                *self._prefix,
                self._ctl,
                "-D",
                str(self._data),
                "-l",
                str(self._log),
                "-w",
                "-o",
                options,
                "start",
            ],
            capture_stdout=True,
            capture_stderr=True,
        )

    async def stop(self, mode: str = "immediate") -> None:
        await trio.run_process(
            [*self._prefix, self._ctl, "-D", str(self._data), "-m", mode, "-w", "stop"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


@asynccontextmanager
async def private_postgres() -> AsyncIterator[PrivatePostgres]:
    if _pg_bin("initdb") is None or _pg_bin("pg_ctl") is None:
        _unavailable("the PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        _unavailable("running PostgreSQL as root needs runuser")
    # Not under pytest's tmp_path: the postgres user must be able to reach it.
    directory = Path(tempfile.mkdtemp(prefix="bus-events-pg-"))
    server = PrivatePostgres(directory)
    try:
        await server.init()
        await server.start()
        try:
            yield server
        finally:
            await server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
