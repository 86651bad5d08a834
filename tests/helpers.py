"""Small helpers shared by the tests: what a stream or a provider holds, `serve` as a process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from busevents import Event, EventsClient, EventStream
from busevents.provider import RunningProvider


async def collect(stream: EventStream, count: int, limit: float = 10) -> list[Event]:
    """The next ``count`` events of ``stream``, failing after ``limit`` seconds."""
    events: list[Event] = []
    with trio.fail_after(limit):
        async for event in stream:
            events.append(event)
            if len(events) == count:
                break
    return events


async def wait_for(condition: Callable[[], bool], seconds: float = 30) -> None:
    """Poll ``condition`` (provider state has no event to wait on) for at most ``seconds``."""
    with trio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 (there is no event to wait on)
            await trio.sleep(0.01)


async def stored(provider: RunningProvider, name: str) -> list[dict[str, Any]]:
    """Every envelope the provider holds for ``name``, as JSON, read with a service token."""
    token = provider.token(audience="ai.hg.fi/internal")
    async with EventsClient(provider.url, token) as client:
        async with client.listen(name, replay=True, follow=False) as stream:
            return [
                json.loads(line)
                async for block in stream.raw_batches()
                for line in block.splitlines()
            ]


@asynccontextmanager
async def serve_subprocess(
    env: dict[str, str], *args: str
) -> AsyncIterator[tuple[str, trio.Process]]:
    """``bus-events serve`` in a child process on a free port; yields its URL and process.

    ``env`` must hold ``BUS_API_JWT_SECRET``.  On exit the process is resumed (if a
    test froze it) and stopped with SIGINT, as a user would; killed if it hangs.
    """
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "busevents", "serve", "--addr", "127.0.0.1:0", *args],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        seen = b""
        with trio.fail_after(20):
            while not (match := re.search(rb"on (http://\S+/api/v1/events)", seen)):
                seen += await proc.stderr.receive_some(4096)
        yield match.group(1).decode(), proc
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGINT)
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
