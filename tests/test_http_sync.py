"""SyncClient: the blocking publisher on the same HTTP (keep-alive, errors, retries with
one idempotency key, proxies, a private CA), and `bus-events send` on it without trio.

The servers run on the test's trio loop; the blocking calls run in a worker thread."""

from __future__ import annotations

import ssl
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from busevents import (
    BadRequest,
    ConnectError,
    EventsClient,
    PublishRequest,
    SyncClient,
    Timeout,
    Unauthorized,
)
from busevents.provider import RunningProvider

from .test_http_headers import header
from .test_http_proxy import closed_port, forward_proxy, no_proxy_variables  # noqa: F401
from .test_http_reuse import FORGED, REFUSED
from .test_publish_lean import Server, always_ok, ok, serving


async def blocking(function: Any, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(partial(function, *args, **kwargs))


async def test_publish_to_the_provider_and_read_it_back(provider: RunningProvider) -> None:
    with SyncClient(provider.url, provider.token()) as client:
        first = await blocking(client.send, "example.sync", {"n": 1})
        accepted, raw = await blocking(
            client.publish, PublishRequest(name="example.sync"), idempotency_key="k-1"
        )
    assert first.name == accepted.name == "example.sync"
    assert accepted.id.encode() in raw
    async with EventsClient(provider.url, provider.token()) as reader:
        async with reader.listen("example.sync", replay=True, follow=False) as stream:
            assert [event.id async for event in stream] == [first.id, accepted.id]


async def test_keep_alive_and_never_a_forged_response() -> None:
    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        return {1: ok(), 2: ok() + ok(FORGED)}.get(n, REFUSED), False

    server = Server(reply)
    async with serving(server) as url:
        with SyncClient(url, "tok") as client:
            assert (await blocking(client.send, "example.ping")).id == "1-0"
            assert (await blocking(client.send, "example.ping")).id == "1-0"
            with pytest.raises(BadRequest, match="real answer"):
                await blocking(client.send, "example.ping")
    assert server.connections == 2  # reused once, then closed for the bytes left over


async def test_retries_send_one_key_and_errors_are_the_async_clients() -> None:
    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        if n == 1:
            return b"HTTP/1.1 503 Busy\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n", False
        if n == 3:
            body = b'{"error":"invalid_auth","message":"token has expired"}'
            return b"HTTP/1.1 401 Unauthorized\r\nContent-Length: %d\r\n\r\n%s" % (
                len(body),
                body,
            ), False
        return ok(), False

    server = Server(reply)
    async with serving(server) as url:
        with SyncClient(url, "tok") as client:
            await blocking(client.send, "example.ping", retries=2)
            with pytest.raises(Unauthorized) as info:
                await blocking(client.send, "example.ping", retries=2)
    keys = [header(request, b"Idempotency-Key") for request in server.requests]
    assert keys[0] == keys[1] and keys[0] is not None and len(keys[0]) == 32
    assert info.value.hint is not None and "bus auth token" in info.value.hint


async def test_a_silent_server_is_a_timeout() -> None:
    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        await trio.sleep(30)
        return ok(), False

    server = Server(reply)
    async with serving(server) as url:
        with SyncClient(url, "tok", timeout=0.3) as client:
            with pytest.raises(Timeout, match="within 300ms"):
                await blocking(client.send, "example.ping")


async def test_https_through_a_proxy_with_a_private_ca(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = Server(always_ok)
    async with serving(server, server_context) as url, forward_proxy() as (proxy, proxy_url):
        monkeypatch.setenv("https_proxy", proxy_url)
        with SyncClient(url, "tok", ca_file=str(tmp_path / "ca.pem")) as client:
            for _ in range(3):
                assert (await blocking(client.send, "example.ping")).id == "1-0"
        with SyncClient(url, "tok", proxy=proxy_url) as untrusting:
            with pytest.raises(ConnectError, match=r"CERTIFICATE_VERIFY_FAILED.*--ca-file"):
                await blocking(untrusting.send, "example.ping")
    assert proxy.connections == 2 and len(server.requests) == 3


async def test_a_dead_proxy_is_an_error_naming_it(provider: RunningProvider) -> None:
    port = closed_port()
    with SyncClient(provider.url, provider.token(), proxy=f"http://u:pw@127.0.0.1:{port}") as c:
        with pytest.raises(ConnectError, match=f"proxy http://127.0.0.1:{port}") as info:
            await blocking(c.send, "example.ping")
    assert "pw" not in str(info.value)


async def test_cli_send_publishes_without_importing_trio(run_cli, provider) -> None:
    env = {
        "BUS_EVENTS_API_URL": provider.url,
        "BUS_API_TOKEN": provider.token(),
        "PYTHONPROFILEIMPORTTIME": "1",
    }
    result = await run_cli("send", "--name", "example.sync", "--payload", '{"a":1}', env=env)
    assert result.status == 0, result.stderr
    assert result.out.startswith("accepted example.sync ")
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "h11" in imported  # the lean HTTP, here blocking: no event loop at all
    assert not {"trio", "httpx", "httpcore", "anyio"} & imported
