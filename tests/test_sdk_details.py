"""SDK details against the real reference provider (issue 13): bytes payloads,
typed payload errors, and the correlation-id filter of ``listen``."""

from __future__ import annotations

import msgspec
import pytest
import trio

from busevents import (
    BusEventsError,
    EventsClient,
    InvalidPayload,
    PublishRequest,
)
from busevents.provider import RunningProvider

from .faults import chunk, serve_raw


async def _history(client: EventsClient, name: str) -> list[object]:
    async with client.listen(name, replay=True, follow=False) as stream:
        return [event.payload_obj() async for event in stream]


async def test_bytes_are_sent_as_the_json_they_hold(provider: RunningProvider) -> None:
    async with EventsClient(provider.url, provider.token()) as client:
        await client.send("example.bytes", b'{"raw": true}')
        await client.send("example.bytes", bytearray(b" [1, 2] "))
        await client.send("example.bytes", memoryview(b'"text"'))
        await client.publish(PublishRequest("example.bytes", payload=b"3"))  # type: ignore[arg-type]
        assert await _history(client, "example.bytes") == [{"raw": True}, [1, 2], "text", 3]


@pytest.mark.parametrize("payload", [b'{"raw": tru', b"", b"1 2", b"\xff"])
async def test_bytes_that_are_not_one_json_value_send_nothing(
    provider: RunningProvider, payload: bytes
) -> None:
    async with EventsClient(provider.url, provider.token()) as client:
        with pytest.raises(ValueError, match="a bytes payload must hold one JSON value"):
            await client.send("example.badbytes", payload)
        with pytest.raises(ValueError, match="a bytes payload must hold one JSON value"):
            PublishRequest("example.badbytes", payload=payload)  # type: ignore[arg-type]
        assert await _history(client, "example.badbytes") == []


class Order(msgspec.Struct):
    sku: str
    lines: list[int]


async def test_payload_as_raises_an_error_of_the_tree_naming_event_and_path(
    provider: RunningProvider,
) -> None:
    async with EventsClient(provider.url, provider.token()) as client:
        accepted = await client.send("example.order", {"sku": "a-1", "lines": [1, "two"]})
        async with client.listen("example.order", replay=True, follow=False) as stream:
            (event,) = [e async for e in stream]
    with pytest.raises(InvalidPayload) as info:
        event.payload_as(Order)
    error = info.value
    assert isinstance(error, BusEventsError)
    assert error.event_id == accepted.id and error.event_name == "example.order"
    assert error.path == "$.lines[1]"
    assert str(error) == (
        f"the payload of example.order event {accepted.id} is not Order: "
        "Expected `int`, got `str` (at $.lines[1])"
    )
    assert isinstance(error.__cause__, msgspec.ValidationError)
    assert event.payload_as(dict[str, object]) == {"sku": "a-1", "lines": [1, "two"]}


async def test_listen_filters_by_correlation_id(provider: RunningProvider) -> None:
    async with EventsClient(provider.url, provider.token()) as client:
        for i in range(12):
            await client.send("example.corr", i, correlation_id="mine" if i % 3 == 0 else f"c{i}")
        await client.send("example.corr", 99)  # no correlation id at all

        async def listen(kind: str) -> list[object]:
            async with client.listen(
                "example.corr", replay=True, follow=False, correlation_id="mine"
            ) as stream:
                if kind == "events":
                    return [e.payload_obj() async for e in stream]
                if kind == "batches":
                    return [e.payload_obj() async for b in stream.batches() for e in b]
                raw = b"".join([block async for block in stream.raw_batches()])
                return [msgspec.json.decode(line)["payload"] for line in raw.split(b"\n")[:-1]]

        for kind in ("events", "batches", "raw"):
            assert await listen(kind) == [0, 3, 6, 9], kind

        async with client.listen("example.corr", correlation_id="mine") as stream:
            await client.send("example.corr", "other", correlation_id="theirs")
            await client.send("example.corr", "reply", correlation_id="mine")
            with trio.fail_after(10):
                event = await stream.__anext__()
        assert event.payload_obj() == "reply" and event.correlation_id == "mine"


async def test_the_raw_correlation_filter_keeps_lines_whole_with_a_cr_inside() -> None:
    lines = [
        b'{"id":"1","name":"a.b",\r"correlationId":"mine","payload":1}\n',
        b'{"id":"2","name":"a.b","correlationId":\r"other"}\r\n',
        b"\n",
        b'{"id":"3",\r"name":"a.b","correlationId":"mine"}\r\n',
    ]
    body = b"".join(lines)

    async def server(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + chunk(body[:30])
            + chunk(body[30:])
            + b"0\r\n\r\n"
        )

    async with serve_raw(server) as url, EventsClient(url, "token") as client:
        async with client.listen("a.b", correlation_id="mine") as stream:
            raw = b"".join([block async for block in stream.raw_batches()])
    assert raw == lines[0] + lines[3]
