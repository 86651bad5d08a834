"""TLS trust: a private CA (trustme) in front of the reference provider, given by
``ca_file=``, ``--ca-file``, ``BUS_EVENTS_CA_FILE`` or ``SSL_CERT_FILE`` (read when
a client is built, not once per process); the verify error says what to do."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme

from busevents import ConnectError, EventsClient
from busevents.provider import RunningProvider

from .test_http_proxy import _copy, forward_proxy


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@asynccontextmanager
async def tls_front(provider: RunningProvider, ca: trustme.CA) -> AsyncIterator[str]:
    """The provider behind a TLS terminator on loopback (what nginx would do);
    yields the https:// events URL."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    backend_port = int(provider.url.split(":")[2].split("/")[0])

    async def handle(client: trio.abc.Stream) -> None:
        async with client:
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", backend_port)
            except OSError:
                return
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(_copy, upstream, client)
                await _copy(client, upstream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    tls = [trio.SSLListener(listener, context, https_compatible=True) for listener in listeners]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, handle, tls))
        yield f"https://localhost:{port}/api/v1/events"
        nursery.cancel_scope.cancel()


async def test_publish_and_stream_over_tls_with_ca_file(
    provider: RunningProvider, ca: trustme.CA, ca_file: str
) -> None:
    async with (
        tls_front(provider, ca) as url,
        EventsClient(url, provider.token(), ca_file=ca_file) as client,
    ):
        await client.send("example.tls", {"n": 1})
        async with client.listen("example.tls", replay=True, follow=False) as stream:
            assert [event.payload_obj() async for event in stream] == [{"n": 1}]


async def test_ssl_cert_file_set_after_a_first_client_is_honoured(
    provider: RunningProvider, ca: trustme.CA, ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    async with tls_front(provider, ca) as url:
        async with EventsClient(url, provider.token()) as client:
            with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED") as publish:
                await client.send("example.tls")
            with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED") as listen:
                async with client.listen("example.tls", replay=True, follow=False):
                    pass
        for info in (publish, listen):
            assert "--ca-file" in str(info.value) and "SSL_CERT_FILE" in str(info.value)
        monkeypatch.setenv("SSL_CERT_FILE", ca_file)
        async with EventsClient(url, provider.token()) as client:
            await client.send("example.tls")
            async with client.listen("example.tls", replay=True, follow=False) as stream:
                assert len([event async for event in stream]) == 1


async def test_verify_false_checks_no_certificate(
    provider: RunningProvider, ca: trustme.CA
) -> None:
    async with (
        tls_front(provider, ca) as url,
        EventsClient(url, provider.token(), verify=False) as client,
    ):
        assert (await client.send("example.tls")).name == "example.tls"


async def test_cli_trusts_a_ca_by_flag_or_environment(
    run_cli, provider: RunningProvider, ca: trustme.CA, ca_file: str, tmp_path: Path
) -> None:
    async with tls_front(provider, ca) as url:
        env = {"BUS_EVENTS_API_URL": url, "BUS_API_TOKEN": provider.token()}
        refused = await run_cli("send", "--name", "example.tls", env=env)
        assert refused.status == 1
        assert "certificate verify failed" in refused.stderr.lower()
        assert "--ca-file" in refused.stderr
        by_flag = await run_cli("--ca-file", ca_file, "send", "--name", "example.tls", env=env)
        assert by_flag.status == 0, by_flag.stderr
        assert by_flag.out.startswith("accepted example.tls ")
        by_env = {**env, "BUS_EVENTS_CA_FILE": ca_file}
        sent = await run_cli("send", "--name", "example.tls", "--payload", "[1]", env=by_env)
        assert sent.status == 0, sent.stderr
        listened = await run_cli(
            "listen", "--name", "example.tls", "--replay", "--no-follow", env=by_env
        )
        assert listened.status == 0, listened.stderr
        assert len(listened.out.splitlines()) == 2
        missing = await run_cli(
            "--ca-file", str(tmp_path / "nowhere.pem"), "send", "--name", "example.tls", env=env
        )
        assert missing.status == 2
        assert "nowhere.pem" in missing.stderr


async def test_stream_over_tls_through_a_connect_proxy(
    provider: RunningProvider, ca: trustme.CA, ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    async with tls_front(provider, ca) as url, forward_proxy() as (proxy, proxy_url):
        monkeypatch.setenv("HTTPS_PROXY", proxy_url)
        async with EventsClient(url, provider.token(), ca_file=ca_file) as client:
            await client.send("example.tls", {"n": 2})
            async with client.listen("example.tls", replay=True, follow=False) as stream:
                assert [event.payload_obj() async for event in stream] == [{"n": 2}]
    port = url.split(":")[2].split("/")[0]
    assert proxy.lines == [f"CONNECT localhost:{port} HTTP/1.1".encode()] * 2
