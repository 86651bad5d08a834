"""Load: 12 listeners and 4 publishers, nothing lost, duplicated or re-ordered.

The slow-listener policy (a reader that stops reading is cut off, nobody waits for
it) is shown in test_provider_stream.py::test_slow_listener_is_disconnected….
"""

from __future__ import annotations

import secrets

import trio

from busevents import EventsClient
from busevents.provider import ProviderConfig, open_provider

LISTENERS = 12
PUBLISHERS = 4
PER_PUBLISHER = 100
TOTAL = PUBLISHERS * PER_PUBLISHER


async def test_many_listeners_four_publishers_exactly_once_in_order() -> None:
    config = ProviderConfig(secret=secrets.token_bytes(32))
    received: list[list[tuple[int, int]]] = [[] for _ in range(LISTENERS)]
    async with open_provider(config) as provider:
        token = provider.token()
        async with EventsClient(
            provider.url, token, max_connections=LISTENERS + PUBLISHERS + 5
        ) as client:

            async def listen(index: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
                async with client.listen("example.load") as stream:
                    task_status.started()
                    async for batch in stream.batches():
                        received[index] += [tuple(e.payload_as(tuple[int, int])) for e in batch]  # type: ignore[misc]
                        if len(received[index]) >= TOTAL:
                            return

            async def publish(publisher: int) -> None:
                for seq in range(PER_PUBLISHER):
                    await client.send("example.load", [publisher, seq])

            with trio.fail_after(55):
                async with trio.open_nursery() as nursery:
                    for index in range(LISTENERS):
                        await nursery.start(listen, index)
                    async with trio.open_nursery() as publishers:
                        for publisher in range(PUBLISHERS):
                            publishers.start_soon(publish, publisher)

    expected = {(p, s) for p in range(PUBLISHERS) for s in range(PER_PUBLISHER)}
    for events in received:
        assert len(events) == TOTAL  # nothing duplicated …
        assert set(events) == expected  # … nothing lost
        for publisher in range(PUBLISHERS):  # each publisher's events in its order
            seqs = [s for p, s in events if p == publisher]
            assert seqs == sorted(seqs)
