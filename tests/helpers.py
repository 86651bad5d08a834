"""Small helpers shared by the tests: reading what a stream or a provider holds."""

from __future__ import annotations

import json
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
