"""Reference provider: running it (serve, open_provider), configuration and packaging."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from contextlib import AsyncExitStack
from functools import partial

import httpx
import pytest
import trio

import busevents.provider
from busevents.provider import ProviderConfig, create_app, open_provider, serve

SECRET = b"server-tests-secret-0123456789abcdef"


def _count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())


async def test_open_provider_reports_real_urls_and_cleans_up() -> None:
    before = _count_tasks()
    async with open_provider() as provider, httpx.AsyncClient() as http:
        match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/api/v1/events", provider.url)
        assert match and int(match.group(1)) > 0
        assert provider.origin == f"http://127.0.0.1:{match.group(1)}"
        assert len(provider.config.secret) == 32
        token = provider.token("alice", scopes=["events:send"])
        response = await http.post(
            provider.url, json={"name": "a.b"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 202
        origin = provider.origin
    assert _count_tasks() == before
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(origin)


async def test_leaving_open_provider_ends_open_streams() -> None:
    async with httpx.AsyncClient() as http, AsyncExitStack() as stack:
        with trio.fail_after(5):
            async with open_provider() as provider:
                token = provider.token("alice")
                response = await stack.enter_async_context(
                    http.stream(
                        "GET",
                        provider.url + "/stream",
                        params={"name": "example.ping"},
                        headers={"Authorization": f"Bearer {token}"},
                    )
                )
                assert response.status_code == 200
            # The provider stopped while the stream was open and idle: the stream
            # ended cleanly (terminating chunk), not cut off.
            assert await response.aread() == b""


async def test_serve_starts_with_the_events_url(nursery: trio.Nursery) -> None:
    config = ProviderConfig(secret=SECRET)
    url = await nursery.start(partial(serve, config, "127.0.0.1", 0))
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api/v1/events", url)
    async with httpx.AsyncClient() as http:
        response = await http.post(url, json={"name": "example.x"})
    assert response.status_code == 401
    nursery.cancel_scope.cancel()


async def test_serve_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    async with open_provider() as provider, httpx.AsyncClient() as http:
        await http.post(provider.url, json={"name": "example.x"})
        await http.get(provider.origin + "/nope")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


async def test_serve_logs_nothing_above_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with open_provider() as provider, httpx.AsyncClient() as http:
        token = provider.token("alice")
        await http.post(
            provider.url, json={"name": "example.x"}, headers={"Authorization": f"Bearer {token}"}
        )
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_port_in_use_raises_oserror() -> None:
    async with open_provider() as provider:
        port = int(provider.origin.rsplit(":", 1)[1])
        with pytest.raises(OSError):
            async with open_provider(port=port):
                pass  # pragma: no cover


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown provider backend 'cassandra'"):
        create_app(ProviderConfig(secret=SECRET, backend="cassandra"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"secret": b""},
        {"secret": SECRET, "max_body_bytes": 0},
        {"secret": SECRET, "listener_queue": 0},
        {"secret": SECRET, "history_limit": -1},
        {"secret": SECRET, "keepalive": 0},
        {"secret": SECRET, "keepalive": float("nan")},
    ],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ProviderConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults() -> None:
    config = ProviderConfig(secret=SECRET)
    assert config.max_body_bytes == 1024 * 1024
    assert config.listener_queue == 10_000
    assert config.history_limit == 100_000
    assert config.keepalive == 15.0
    assert config.allow_wildcards is False
    assert config.policy == busevents.provider.ScopePolicy.default()


async def test_history_limit_drops_the_oldest() -> None:
    config = ProviderConfig(secret=SECRET, history_limit=3)
    async with open_provider(config) as provider, httpx.AsyncClient() as http:
        headers = {"Authorization": f"Bearer {provider.token('alice')}"}
        for n in range(5):
            await http.post(provider.url, json={"name": "example.h", "payload": n}, headers=headers)
        await http.post(provider.url, json={"name": "example.other"}, headers=headers)
        response = await http.get(
            provider.url + "/stream",
            params={"name": "example.h", "replay": "true", "follow": "false"},
            headers=headers,
        )
    assert [line.count(b'"payload":') for line in response.content.splitlines()] == [1, 1]
    assert b'"payload":3' in response.content and b'"payload":4' in response.content


def test_public_names() -> None:
    assert set(busevents.provider.__all__) == {
        "API_AUDIENCE",
        "BackendUnavailable",
        "PostgresOptions",
        "RedisOptions",
        "make_backend",
        "INTERNAL_AUDIENCE",
        "EventsApp",
        "ProviderConfig",
        "RunningProvider",
        "ScopePolicy",
        "ScopeRule",
        "create_app",
        "mint_token",
        "open_provider",
        "openapi_document",
        "secret_from_env",
        "serve",
    }
    for name in busevents.provider.__all__:
        assert hasattr(busevents.provider, name)


@pytest.mark.parametrize("missing", ["jwt", "prometheus_client"])
def test_missing_extra_says_what_to_install(missing: str) -> None:
    code = (
        f"import sys; sys.modules[{missing!r}] = None\n"
        "try:\n"
        "    import busevents.provider\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__mro__[1].__name__, exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.strip() == (
        "ImportError the reference provider needs extra packages: pip install 'busevents[provider]'"
    )


def test_client_import_does_not_load_the_provider() -> None:
    code = (
        "import sys, busevents\n"
        "loaded = [m for m in ('busevents.provider', 'hypercorn', 'jwt') if m in sys.modules]\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.strip() == "[]"


# -- the HTTP/1.1 layer (h11 over trio): framing a well-behaved client never tests --------


async def _raw_exchange(url: str, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection, half-close, and read to the server's EOF."""
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()  # type: ignore[union-attr]
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(20):
            while chunk := await stream.receive_some(65536):
                received += chunk
        return received
    finally:
        await stream.aclose()


def _post(token: str, body: bytes, *extra: str, version: str = "1.1") -> bytes:
    head = [f"POST /api/v1/events HTTP/{version}", "Host: x", f"Authorization: Bearer {token}"]
    head += [f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    async with open_provider() as provider:
        token = provider.token("alice")
        bodies = [b'{"name":"example.pipe","payload":%d}' % n for n in range(5)]
        data = b"".join(_post(token, body) for body in bodies)
        data += _post(token, b'{"name":"example.pipe","payload":5}', "Connection: close")
        received = await _raw_exchange(provider.url, data)
        assert received.count(b"HTTP/1.1 202 ") == 6
        ids = re.findall(rb'"id":"(\d+-\d+)"', received)
        assert len(ids) == 6 and ids == sorted(ids, key=lambda i: tuple(map(int, i.split(b"-"))))


async def test_a_request_head_over_the_limit_gets_431_with_a_json_body() -> None:
    async with open_provider() as provider:
        data = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
        received = await _raw_exchange(provider.url, data)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")
    assert b'"error":"request_header_fields_too_large"' in body


async def test_a_malformed_request_gets_400_and_the_connection_closes() -> None:
    async with open_provider() as provider:
        received = await _raw_exchange(
            provider.url, b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n"
        )
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" in head.lower()
    assert b'"error":"bad_request"' in body


async def test_http_1_0_publish_and_expect_100_continue() -> None:
    async with open_provider() as provider:
        token = provider.token("alice")
        old = await _raw_exchange(
            provider.url, _post(token, b'{"name":"example.old"}', version="1.0")
        )
        assert old.startswith(b"HTTP/1.1 202 ") and b'"accepted":true' in old
        host, port = re.match(r"http://([^:/]+):(\d+)", provider.url).groups()  # type: ignore[union-attr]
        stream = await trio.open_tcp_stream(host, int(port))
        try:
            body = b'{"name":"example.wait"}'
            head = _post(token, body, "Expect: 100-continue", "Connection: close")
            await stream.send_all(head[: -len(body)])
            with trio.fail_after(10):
                interim = await stream.receive_some(65536)
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(body)
            rest = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    rest += chunk
            assert rest.startswith(b"HTTP/1.1 202 ")
        finally:
            await stream.aclose()


async def test_an_app_that_does_not_answer_gets_a_500_with_a_json_body(
    nursery: trio.Nursery,
) -> None:
    from busevents.provider._h11server import Server

    async def silent(scope: object, receive: object, send: object) -> None:
        return None

    server = Server()
    listeners = await nursery.start(
        partial(trio.serve_tcp, partial(server.handle, silent), 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    received = await _raw_exchange(f"http://127.0.0.1:{port}", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ")
    assert b'"error":"internal_error"' in body
