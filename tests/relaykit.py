"""Two reference providers as real ``serve`` processes, and the relay CLI as a process."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from busevents import Event, EventsClient
from busevents.provider import INTERNAL_AUDIENCE, mint_token

#: Fast backoff for tests (the shared policy reads these).
FAST_RETRY = {"BUS_EVENTS_LISTENER_RETRY_MIN": "50ms", "BUS_EVENTS_LISTENER_RETRY_MAX": "300ms"}


@dataclass
class Side:
    """One deployment: its URL, secret, a service token and the file holding it."""

    label: str
    url: str
    secret: bytes
    token: str
    token_file: Path

    def mint(self, **options: Any) -> str:
        options.setdefault("scopes", "events:send events:listen")
        return mint_token(self.secret, subject=options.pop("subject", "relay"), **options)

    def client(self) -> EventsClient:
        return EventsClient(self.url, self.token)

    async def publish(
        self, name: str, count: int, start: int = 0, *, concurrency: int = 1
    ) -> list[str]:
        """Publish payloads ``{"n": start..}``; their ids in publish order (by id)."""
        ids: list[str] = []
        numbers = iter(range(start, start + count))

        async def publisher(client: EventsClient) -> None:
            for n in numbers:
                ids.append((await client.send(name, {"n": n})).id)

        async with self.client() as client, trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(publisher, client)
        return sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))

    async def history(self, name: str) -> list[Event]:
        async with self.client() as client:
            async with client.listen(name, replay=True, follow=False) as stream:
                return [event async for event in stream]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_token(path: Path, token: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return path


def planned_side(label: str, tmp: Path, port: int = 0) -> Side:
    """A deployment not started yet: its secret, and its service token already in its file."""
    secret = secrets.token_hex(24).encode()
    token = mint_token(
        secret, subject="relay", scopes="events:send events:listen", audience=INTERNAL_AUDIENCE
    )
    url = f"http://127.0.0.1:{port}/api/v1/events"
    return Side(label, url, secret, token, write_token(tmp / f"{label}.token", token))


@asynccontextmanager
async def open_side(
    label: str, env: Mapping[str, str], tmp: Path, *, planned: Side | None = None
) -> AsyncIterator[Side]:
    """``bus-events serve`` with its own secret (that of ``planned``, on its port)."""
    side = planned or planned_side(label, tmp)
    child = {**env, "BUS_API_JWT_SECRET": side.secret.decode()}
    port = int(side.url.split(":")[2].split("/")[0])
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "busevents", "serve", "--addr", f"127.0.0.1:{port}"],
        env=child,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        seen = b""
        with trio.fail_after(30):
            while not (match := re.search(rb"on (http://\S+/api/v1/events)", seen)):
                chunk = await proc.stderr.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"serve ended: {seen.decode(errors='replace')}")
                seen += chunk
        side.url = match.group(1).decode()
        yield side
    finally:
        proc.send_signal(signal.SIGINT)
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@asynccontextmanager
async def open_pair(env: Mapping[str, str], tmp: Path) -> AsyncIterator[tuple[Side, Side]]:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_side("a", env, tmp))
        b = await stack.enter_async_context(open_side("b", env, tmp))
        yield a, b


def route_args(
    source: Side, dest: Side, state: Path, *names: str, environment: str | None = None
) -> list[str]:
    args = [
        "relay",
        "--from-url",
        source.url,
        "--to-url",
        dest.url,
        "--state-file",
        str(state),
        "--environment-id",
        environment or source.label,
        "--from-token-file",
        str(source.token_file),
        "--to-token-file",
        str(dest.token_file),
    ]
    for name in names:
        args += ["--name", name]
    return args


async def start_cli(env: Mapping[str, str], *args: str, cwd: Path) -> trio.Process:
    """``bus-events ARGS`` as a background process (stderr to a file beside the state)."""
    log = open(cwd / "relay.log", "ab")  # noqa: ASYNC230, SIM115 - handed to the child
    try:
        return await trio.lowlevel.open_process(
            [sys.executable, "-m", "busevents", *args],
            env={**env, **FAST_RETRY},
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=str(cwd),
        )
    finally:
        log.close()


async def stop(proc: trio.Process, sig: int = signal.SIGTERM, limit: float = 15) -> int:
    if proc.returncode is None:
        proc.send_signal(sig)
    with trio.move_on_after(limit):
        return await proc.wait()
    proc.kill()
    return await proc.wait()


async def wait_until_count(side: Side, name: str, count: int, limit: float = 30) -> list[Event]:
    """Poll ``side``'s history of ``name`` until it holds at least ``count`` events."""
    with trio.fail_after(limit):
        while True:
            events = await side.history(name)
            if len(events) >= count:
                return events
            await trio.sleep(0.1)
