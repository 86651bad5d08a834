"""The provider's edges a new user or an operator runs into: exact paths, what the
metrics address says to a publish, /readyz naming the failed check, and the
nesting bound of publish bodies (counted, so the same on every Python)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from busevents.provider import ProviderConfig, RunningProvider, open_provider

from .helpers import serve_subprocess
from .services import private_redis

SECRET = b"edges-tests-secret-0123456789abcdef0123"


def auth(provider: RunningProvider) -> dict[str, str]:
    return {"Authorization": f"Bearer {provider.token('alice')}"}


@pytest.fixture
async def prov() -> AsyncIterator[RunningProvider]:
    async with open_provider(ProviderConfig(secret=SECRET), metrics=True) as running:
        yield running


# -- paths -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/foo/events"),
        ("POST", "/local/v1/events"),
        ("POST", "/events"),
        ("GET", "/events/stream?name=example.x"),
        ("GET", "/foo/events/stream?name=example.x"),
        ("GET", "/x/events/openapi.json"),
    ],
)
async def test_only_the_exact_api_paths_are_served(
    prov: RunningProvider, http: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await http.request(
        method, prov.origin + path, json={"name": "example.x"}, headers=auth(prov)
    )
    assert response.status_code == 404
    body = response.json()
    assert body["error"] == "not_found"
    assert "POST /api/v1/events" in body["message"]
    assert "GET /api/v1/events/stream" in body["message"]
    # Nothing was stored on the way.
    history = await http.get(
        prov.url + "/stream",
        params={"name": "example.x", "replay": "true", "follow": "false"},
        headers=auth(prov),
    )
    assert (history.status_code, history.content) == (200, b"")


async def test_the_api_paths_still_work(prov: RunningProvider, http: httpx.AsyncClient) -> None:
    sent = await http.post(prov.url, json={"name": "example.x"}, headers=auth(prov))
    assert sent.status_code == 202
    assert prov.url.endswith("/api/v1/events")
    assert (await http.get(prov.url + "/openapi.json")).status_code == 200


async def test_a_publish_to_the_metrics_address_is_told_where_to_go(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    assert prov.metrics_url is not None
    metrics_origin = prov.metrics_url.removesuffix("/metrics")
    response = await http.post(
        metrics_origin + "/api/v1/events", json={"name": "example.x"}, headers=auth(prov)
    )
    assert response.status_code == 404
    message = response.json()["message"]
    assert "metrics address" in message and "serve --addr" in message
    assert "use GET" not in message  # a GET would not publish either
    # What it serves still works, and a wrong method there is still a 405.
    assert (await http.get(prov.metrics_url)).status_code == 200
    assert (await http.post(prov.metrics_url)).status_code == 405


# -- /readyz -------------------------------------------------------------------------


async def test_readyz_names_the_failed_backend_check_and_its_error(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    async with private_redis(tmp_path) as redis:
        env = {
            **cli_env,
            "BUS_API_JWT_SECRET": SECRET.decode(),
            "BUS_EVENTS_REDIS_ADDR": redis.addr,
        }
        # A process of its own, as deployed (and the Redis client's leftovers after
        # losing its server stay there).
        async with serve_subprocess(env, "--events-backend", "redis") as (url, _):
            origin = url.removesuffix("/api/v1/events")
            async with httpx.AsyncClient(timeout=10) as http:
                ready = await http.get(origin + "/readyz")
                assert (ready.status_code, ready.json()["backend"]) == (200, "redis")
                await redis.stop()
                down = await http.get(origin + "/readyz")
        body = down.json()
        assert down.status_code == 503
        assert body["error"] == "backend_unavailable"
        assert (body["check"], body["backend"]) == ("backend_ping", "redis")
        # Which server, and the error it gave (not just an exception's type).
        assert f"Redis at {redis.addr} is unavailable" in body["message"]
        assert "Error" in body["message"] and ":" in body["message"]
        assert SECRET.decode() not in down.text


# -- nesting ------------------------------------------------------------------------


def nested(depth: int) -> bytes:
    """A publish body whose nesting is ``depth`` levels, its own object included."""
    inner = depth - 1
    return b'{"name":"example.deep","payload":' + b"[" * inner + b"]" * inner + b"}"


@pytest.mark.parametrize("depth", [513, 1000, 100_000])
async def test_publish_bodies_nested_too_deep_are_refused_on_every_python(
    prov: RunningProvider, http: httpx.AsyncClient, depth: int
) -> None:
    response = await http.post(
        prov.url,
        content=nested(depth),
        headers={**auth(prov), "Content-Type": "application/json"},
    )
    assert response.status_code == 400, (sys.version, response.text)
    message = response.json()["message"]
    assert "nests deeper than 512 levels" in message and "flatten" in message


async def test_the_deepest_allowed_body_and_brackets_in_strings_are_accepted(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    headers = {**auth(prov), "Content-Type": "application/json"}
    deepest = await http.post(prov.url, content=nested(512), headers=headers)
    assert deepest.status_code == 202, deepest.text
    # Brackets inside strings (escaped quotes too) are text, not nesting.
    text = b'"\\"' + b"[" * 2000 + b'"'
    shallow = b'{"name":"example.deep","payload":[' + text + b"]}"
    assert (await http.post(prov.url, content=shallow, headers=headers)).status_code == 202
