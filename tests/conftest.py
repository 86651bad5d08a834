"""Shared fixtures: a real reference provider on 127.0.0.1 and the CLI as a subprocess."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator, Mapping
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
def run_cli(cli_env: dict[str, str], tmp_path: Path):  # type: ignore[no-untyped-def]
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
