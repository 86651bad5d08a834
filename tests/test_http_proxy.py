"""Proxies: HTTP_PROXY/HTTPS_PROXY/ALL_PROXY/NO_PROXY (any case) and ``proxy=``, through a
real forward proxy on loopback (absolute-form for http://, CONNECT for https://)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme

from busevents import ConnectError, EventsClient
from busevents._config import Proxies
from busevents.provider import RunningProvider

from .test_publish_lean import Server, always_ok, serving

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


class ForwardProxy:
    """A forward proxy: absolute-form requests (rewritten to origin-form upstream) and
    CONNECT tunnels, to loopback only; counts connections, records request lines."""

    def __init__(self) -> None:
        self.connections = 0
        self.lines: list[bytes] = []

    async def handle(self, client: trio.abc.Stream) -> None:
        self.connections += 1
        async with client:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                head, rest = await _read_head(client, b"")
                if head is None:
                    return
                line = head.split(b"\r\n", 1)[0]
                self.lines.append(line)
                method, target, _ = line.split(b" ", 2)
                if method == b"CONNECT":
                    host, _, port = target.rpartition(b":")
                    assert host in (b"127.0.0.1", b"localhost")
                    upstream = await trio.open_tcp_stream(host.decode(), int(port))
                    await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    await _pipe_both(client, upstream, rest)
                    return
                assert target.startswith(b"http://127.0.0.1:")
                port = int(target[len(b"http://127.0.0.1:") :].split(b"/", 1)[0])
                upstream = await trio.open_tcp_stream("127.0.0.1", port)
                async with upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(_copy, upstream, client)
                    while head is not None:
                        line = head.split(b"\r\n", 1)[0]
                        if line not in self.lines[-1:]:
                            self.lines.append(line)
                        method, target, version = line.split(b" ", 2)
                        path = b"/" + target.split(b"/", 3)[3]
                        head = b" ".join((method, path, version)) + head[len(line) :]
                        length = _content_length(head)
                        while len(rest) < length:
                            more = await client.receive_some(65536)
                            if not more:
                                return
                            rest += more
                        await upstream.send_all(head + rest[:length])
                        head, rest = await _read_head(client, rest[length:])
                    nursery.cancel_scope.cancel()


async def _read_head(stream: trio.abc.Stream, buffer: bytes) -> tuple[bytes | None, bytes]:
    while b"\r\n\r\n" not in buffer:
        more = await stream.receive_some(65536)
        if not more:
            return None, b""
        buffer += more
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return int(value)
    return 0


async def _copy(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await sink.aclose()


async def _pipe_both(client: trio.abc.Stream, upstream: trio.abc.Stream, first: bytes) -> None:
    async with upstream:
        if first:
            await upstream.send_all(first)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_copy, upstream, client)
            await _copy(client, upstream)
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def forward_proxy() -> AsyncIterator[tuple[ForwardProxy, str]]:
    proxy = ForwardProxy()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, proxy.handle, listeners))
        yield proxy, f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "Http_Proxy", "ALL_PROXY"])
async def test_publish_through_the_proxy_of_the_environment(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    server = Server(always_ok)
    async with serving(server) as url, forward_proxy() as (proxy, proxy_url):
        monkeypatch.setenv(variable, proxy_url)
        async with EventsClient(url, "tok") as client:
            for _ in range(3):
                assert (await client.send("example.ping")).id == "1-0"
    assert proxy.connections == 1  # keep-alive through the proxy
    assert proxy.lines == [f"POST {url} HTTP/1.1".encode()]
    assert len(server.requests) == 3


async def test_https_publish_through_a_connect_tunnel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = Server(always_ok)
    async with serving(server, server_context) as url, forward_proxy() as (proxy, proxy_url):
        monkeypatch.setenv("HTTPS_PROXY", proxy_url)
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # not for https:// URLs
        async with EventsClient(url, "tok", ca_file=str(tmp_path / "ca.pem")) as client:
            for _ in range(3):
                assert (await client.send("example.ping")).id == "1-0"
    port = url.split(":")[2].split("/")[0]
    assert proxy.lines == [f"CONNECT 127.0.0.1:{port} HTTP/1.1".encode()]
    assert proxy.connections == 1
    assert len(server.requests) == 3


async def test_publish_and_stream_through_the_explicit_proxy(provider: RunningProvider) -> None:
    async with forward_proxy() as (proxy, proxy_url):
        async with EventsClient(provider.url, provider.token(), proxy=proxy_url) as client:
            await client.send("example.proxied", {"n": 1})
            async with client.listen("example.proxied", replay=True, follow=False) as stream:
                events = [event async for event in stream]
    assert [event.payload_obj() for event in events] == [{"n": 1}]
    methods = sorted(line.split(b" ")[0] for line in proxy.lines)
    assert methods == [b"GET", b"POST"]


async def test_no_proxy_goes_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server(always_ok)
    async with serving(server) as url, forward_proxy() as (proxy, proxy_url):
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        monkeypatch.setenv("no_proxy", "example.com, 127.0.0.0/8")
        async with EventsClient(url, "tok") as client:
            assert (await client.send("example.ping")).id == "1-0"
    assert proxy.connections == 0
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypass"),
    [
        ("*", "api.example.com", 443, True),
        ("example.com", "api.example.com", 443, True),
        (".example.com", "example.com", 443, True),
        ("*.example.com", "api.example.com", 443, True),
        ("example.com", "badexample.com", 443, False),
        ("10.0.0.0/8", "10.1.2.3", 80, True),
        ("10.0.0.0/8", "11.1.2.3", 80, False),
        ("example.com:8443", "example.com", 443, False),
        ("example.com:8443", "example.com", 8443, True),
        ("[::1]:80, localhost", "::1", 80, True),
        ("localhost", "LOCALHOST.", 80, True),
    ],
)
def test_no_proxy_matching(no_proxy: str, host: str, port: int, bypass: bool) -> None:
    proxies = Proxies.from_env({"HTTPS_PROXY": "proxy:3128", "HTTP_PROXY": "proxy:3128",
                                "NO_PROXY": no_proxy})  # fmt: skip
    assert (proxies.for_url("https", host, port) is None) is bypass


async def test_a_dead_proxy_is_an_error_naming_it_never_a_direct_connection(
    monkeypatch: pytest.MonkeyPatch, provider: RunningProvider
) -> None:
    port = closed_port()
    monkeypatch.setenv("HTTP_PROXY", f"http://alice:s3cret-pw@127.0.0.1:{port}")
    async with EventsClient(provider.url, provider.token()) as client:
        with pytest.raises(ConnectError) as publish:
            await client.send("example.ping")
        with pytest.raises(ConnectError) as listen:
            async with client.listen("example.ping", replay=True, follow=False):
                pass
    for info in (publish, listen):
        assert f"proxy http://127.0.0.1:{port}" in str(info.value)
        assert "s3cret" not in str(info.value) and "alice" not in str(info.value)
    async with EventsClient(provider.url, provider.token(), trust_env=False) as client:
        async with client.listen("example.ping", replay=True, follow=False) as stream:
            assert [event async for event in stream] == []  # nothing went direct


async def test_cli_send_through_a_dead_proxy_fails_naming_it(run_cli, provider) -> None:
    port = closed_port()
    env = {
        "BUS_EVENTS_API_URL": provider.url,
        "BUS_API_TOKEN": provider.token(),
        "https_proxy": "http://127.0.0.1:9",
        "http_proxy": f"127.0.0.1:{port}",
    }
    result = await run_cli("send", "--name", "example.ping", env=env)
    assert result.status == 1
    assert f"through the proxy http://127.0.0.1:{port}" in result.stderr
    assert result.out == ""


async def test_a_socks_proxy_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    with pytest.raises(Exception, match="http:// proxies only"):
        EventsClient("http://127.0.0.1:1/api/v1/events", "tok")
