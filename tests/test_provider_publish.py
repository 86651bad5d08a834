"""Reference provider: publish, request validation and routing."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
import trio

from busevents.provider import ProviderConfig, RunningProvider, open_provider
from busevents.provider.backends._memory import MemoryBackend

SECRET = b"publish-tests-secret-0123456789abcdef"
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
ID = re.compile(r"(\d+)-(\d+)")


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def prov() -> AsyncIterator[RunningProvider]:
    async with open_provider(ProviderConfig(secret=SECRET, max_body_bytes=4096)) as running:
        yield running


async def replay(http: httpx.AsyncClient, prov: RunningProvider, name: str) -> list[bytes]:
    response = await http.get(
        prov.url + "/stream",
        params={"name": name, "replay": "true", "follow": "false"},
        headers=auth(prov.token("alice")),
    )
    assert response.status_code == 200
    return response.content.splitlines()


# -- publish -------------------------------------------------------------------


async def test_publish_is_accepted_and_stored_as_an_envelope(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    body = {
        "name": "example.ping",
        "correlationId": "req-1",
        "payload": {"ok": True, "list": [1, 2.5, None], "text": "päivää"},
        "metadata": {"team": "dev"},
    }
    response = await http.post(prov.url, json=body, headers=auth(prov.token("alice")))
    assert response.status_code == 202
    assert response.headers["content-type"] == "application/json"
    accepted = response.json()
    assert set(accepted) == {"accepted", "id", "name", "correlationId", "time"}
    assert accepted["accepted"] is True
    assert accepted["name"] == "example.ping" and accepted["correlationId"] == "req-1"
    assert ID.fullmatch(accepted["id"]) and TIME.fullmatch(accepted["time"])
    (line,) = await replay(http, prov, "example.ping")
    envelope = msgspec.json.decode(line)
    assert list(envelope) == [
        "id",
        "name",
        "correlationId",
        "payload",
        "identity_id",
        "metadata",
        "time",
    ]
    assert envelope == {
        "id": accepted["id"],
        "name": "example.ping",
        "correlationId": "req-1",
        "payload": body["payload"],
        "identity_id": "alice",
        "metadata": {"team": "dev"},
        "time": accepted["time"],
    }


async def test_payload_bytes_pass_through_and_default_to_null(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    raw = b'{"name":"example.raw","payload":{"b": 1.50, "a":[ ]}}'
    assert (await http.post(prov.url, content=raw, headers=auth(token))).status_code == 202
    minimal = await http.post(prov.url, content=b'{"name":"example.raw"}', headers=auth(token))
    assert "correlationId" not in minimal.json()
    first, second = await replay(http, prov, "example.raw")
    assert b'"payload":{"b": 1.50, "a":[ ]}' in first
    assert msgspec.json.decode(second)["payload"] is None
    assert b"correlationId" not in second and b"metadata" not in second


async def test_ids_are_unique_and_increasing(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice")
    ids = []
    for _ in range(40):
        response = await http.post(prov.url, json={"name": "example.ids"}, headers=auth(token))
        ids.append(response.json()["id"])
    pairs = [tuple(int(part) for part in ID.fullmatch(i).groups()) for i in ids]  # type: ignore[union-attr]
    assert pairs == sorted(set(pairs))


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "empty"),
        (b"not json", "not valid JSON"),
        (b'{"name": "example.x",', "not valid JSON"),
        (b'[{"name": "example.x"}]', "object"),
        (b'"example.x"', "object"),
        (b'{"payload": 1}', "name"),
        (b'{"name": 5}', "$.name"),
        (b'{"name": "example.x", "name": "example.y"}', "duplicate key 'name'"),
        (b'{"name": "example.x", "payload": {"a": 1, "a": 2}}', "duplicate key 'a'"),
        (b'{"name": "example.x", "correlationId": 7}', "correlationId"),
        (b'{"name": "example.x", "metadata": {"k": 1}}', "metadata"),
        (b'{"name": "example.x", "metadata": ["k"]}', "metadata"),
        (b'{"name": "example.x", "payload": NaN}', "not valid JSON"),
        (b'{"name": "Example.X"}', "name"),
        (b'{"name": "example.*"}', "wildcards are not allowed"),
        (b'{"name": ""}', "name"),
        (b'{"name": "example.\xff"}', "JSON"),
    ],
)
async def test_bad_publish_bodies_get_400(
    prov: RunningProvider, http: httpx.AsyncClient, content: bytes, needle: str
) -> None:
    response = await http.post(prov.url, content=content, headers=auth(prov.token("alice")))
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "bad_request"
    assert needle in body["message"], body["message"]
    assert await replay(http, prov, "example.x") == []


async def test_oversized_body_gets_413(prov: RunningProvider, http: httpx.AsyncClient) -> None:
    token = prov.token("alice")
    just_fits = b'{"name":"example.big","payload":"' + b"x" * (4096 - 35) + b'"}'
    assert len(just_fits) == 4096
    assert (await http.post(prov.url, content=just_fits, headers=auth(token))).status_code == 202
    too_big = just_fits[:-2] + b'x"}'
    response = await http.post(prov.url, content=too_big, headers=auth(token))
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    with trio.fail_after(5):  # a body far beyond the limit is refused promptly too
        huge = await http.post(prov.url, content=b"x" * 5_000_000, headers=auth(token))
    assert huge.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b" " * 1000

    chunked = await http.post(prov.url, content=chunks(), headers=auth(token))
    assert chunked.status_code == 413
    # The connection is still usable afterwards.
    again = await http.post(prov.url, json={"name": "example.big"}, headers=auth(token))
    assert again.status_code == 202


# -- stream parameters ---------------------------------------------------------

BAD_STREAMS: list[tuple[dict[str, str], str]] = [
    ({}, "name"),
    ({"name": ""}, "name"),
    ({"name": "example.*"}, "wildcards are not allowed"),
    ({"name": "example.>"}, "wildcards are not allowed"),
    ({"name": "example ping"}, "name"),
    ({"name": "example/ping"}, "name"),
    ({"name": "example.\nping"}, "name"),
    ({"name": "example.\x00"}, "name"),
    ({"name": "Example.Ping"}, "name"),
    ({"name": "exämple.ping"}, "name"),
    ({"name": "example..ping"}, "name"),
    ({"name": ".example"}, "name"),
    ({"name": "a" * 256}, "at most 255"),
    ({"name": "example.ping", "delivery": "multicast"}, "delivery"),
    ({"name": "example.ping", "delivery": "unicast", "group": "my group"}, "group"),
    ({"name": "example.ping", "group": "g" * 129}, "group"),
    ({"name": "example.ping", "group": ""}, "group"),
    ({"name": "example.ping", "consumer": "a/b"}, "consumer"),
    ({"name": "example.ping", "consumer": "tab\there"}, "consumer"),
    ({"name": "example.ping", "replay": "yes"}, "replay"),
    ({"name": "example.ping", "follow": "maybe"}, "follow"),
]


@pytest.mark.parametrize(("params", "needle"), BAD_STREAMS)
async def test_bad_stream_parameters_get_400_before_any_stream(
    prov: RunningProvider, http: httpx.AsyncClient, params: dict[str, str], needle: str
) -> None:
    with trio.fail_after(5):
        response = await http.get(
            prov.url + "/stream", params=params, headers=auth(prov.token("alice"))
        )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == "bad_request"
    assert needle in body["message"], body["message"]
    backend = prov.backend
    assert isinstance(backend, MemoryBackend)
    assert backend.subscriber_count("example.ping") == 0


async def test_repeated_parameter_gets_400(prov: RunningProvider, http: httpx.AsyncClient) -> None:
    response = await http.get(
        prov.url + "/stream?name=example.a&name=example.b", headers=auth(prov.token("alice"))
    )
    assert response.status_code == 400 and "more than once" in response.json()["message"]


@pytest.mark.parametrize("flag", ["true", "TRUE", "1", "false", "0", "False"])
async def test_flags_accept_true_false_1_0(
    prov: RunningProvider, http: httpx.AsyncClient, flag: str
) -> None:
    response = await http.get(
        prov.url + "/stream",
        params={"name": "example.ping", "replay": flag, "follow": "false"},
        headers=auth(prov.token("alice")),
    )
    assert response.status_code == 200


# -- routing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/api/v1/events", 405, "POST"),
        ("DELETE", "/api/v1/events", 405, "POST"),
        ("POST", "/api/v1/events/stream", 405, "GET"),
        ("GET", "/api/v1/other", 404, None),
        ("GET", "/", 404, None),
        ("GET", "/api/v1/events/stream/x", 404, None),
    ],
)
async def test_unknown_routes_and_methods(
    prov: RunningProvider,
    http: httpx.AsyncClient,
    method: str,
    path: str,
    status: int,
    allow: str | None,
) -> None:
    response = await http.request(method, prov.origin + path, headers=auth(prov.token("alice")))
    assert response.status_code == status
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "message"}
    assert response.headers.get("allow") == allow


async def test_pretty_printed_payload_is_stored_on_one_line() -> None:
    """A payload with newlines between tokens must not break NDJSON framing."""
    from busevents import EventsClient
    from busevents.provider import open_provider

    async with open_provider() as running, EventsClient(running.url, running.token()) as client:
        body = b'{"name":"example.pretty","payload":{\n  "x": 1,\r\n  "s": "a\\nb"\n}}'
        response = await client._http.post(running.url, content=body)
        assert response.status_code == 202
        async with client.listen("example.pretty", replay=True, follow=False) as stream:
            raw = b"".join([block async for block in stream.raw_batches()])
    assert raw.count(b"\n") == 1 and b'"payload":{"x":1,"s":"a\\nb"}' in raw


async def test_end_users_cannot_forge_platform_metadata() -> None:
    from busevents import EventsClient
    from busevents.provider import open_provider

    metadata = {"bus.origin.environment.id": "forged", "team": "a"}
    async with open_provider() as running:
        async with EventsClient(running.url, running.token()) as user:
            await user.send("example.meta", 1, metadata=metadata)
        service_token = running.token(audience="ai.hg.fi/internal")
        async with EventsClient(running.url, service_token) as service:
            await service.send("example.meta", 2, metadata=metadata)
            async with service.listen("example.meta", replay=True, follow=False) as stream:
                stored = [event.metadata async for event in stream]
    assert stored == [{"team": "a"}, metadata]
