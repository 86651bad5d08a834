"""Token refresh (``BUS_EVENTS_TOKEN_REFRESH``, ``token_provider``) against real providers.

Tokens are minted with the provider's secret; a token file is rewritten as a
login tool would.  A provider restarted with a new secret makes every old
token invalid at once, which is what an expired token looks like to a client.
"""

from __future__ import annotations

import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from busevents import (
    ConfigError,
    Event,
    EventsClient,
    Publisher,
    RetryPolicy,
    TokenError,
    Unauthorized,
    Worker,
    find_token,
    run_worker,
)
from busevents._config import token_expiry, token_refresh_from_env
from busevents.provider import mint_token, open_provider

from .helpers import collect


def write_token(path: Path, token: str) -> None:
    path.write_text(token + "\n")
    path.chmod(0o600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def serve(port: int, secret: str, env: dict[str, str]) -> AsyncIterator[trio.Process]:
    """``bus-events serve`` on ``port`` with ``secret``, up once it answers; stopped after."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "busevents", "serve", "--addr", f"127.0.0.1:{port}"],
        env={**env, "BUS_API_JWT_SECRET": secret},
    )
    try:
        with trio.fail_after(30):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                break
        yield proc
    finally:
        proc.send_signal(signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await proc.wait()


def test_exp_is_read_without_verifying() -> None:
    before = time.time()
    token = mint_token(b"s" * 32, subject="a", scopes="x", ttl=100)
    expires = token_expiry(token)
    assert expires is not None and before + 99 <= expires <= time.time() + 100
    assert token_expiry("not-a-jwt") is None
    assert token_expiry("a.!!!.c") is None
    assert token_expiry("a.e30.c") is None  # {} has no exp


@pytest.mark.parametrize("value", ["yes", "2", "true ", "on"])
def test_refresh_variable_takes_only_0_or_1(value: str) -> None:
    with pytest.raises(ConfigError, match="BUS_EVENTS_TOKEN_REFRESH"):
        token_refresh_from_env({"BUS_EVENTS_TOKEN_REFRESH": value})
    assert token_refresh_from_env({"BUS_EVENTS_TOKEN_REFRESH": "1"}) is True
    assert token_refresh_from_env({"BUS_EVENTS_TOKEN_REFRESH": "0"}) is False
    assert token_refresh_from_env({}) is False


async def test_cli_rejects_an_invalid_refresh_value(run_cli, provider, tmp_path) -> None:
    token_file = tmp_path / "token"
    write_token(token_file, provider.token())
    result = await run_cli(
        "--api-url",
        provider.url,
        "--token-file",
        str(token_file),
        "send",
        "--name",
        "example.x",
        env={"BUS_EVENTS_TOKEN_REFRESH": "maybe"},
    )
    assert result.status == 2
    assert "BUS_EVENTS_TOKEN_REFRESH" in result.stderr


async def test_a_401_rereads_the_token_file_and_sends_again(tmp_path: Path) -> None:
    async with open_provider() as provider:
        token_file = tmp_path / "token"
        write_token(token_file, provider.token(ttl=-60))  # expired
        env = {"BUS_EVENTS_TOKEN_REFRESH": "1"}
        async with EventsClient.from_env(
            api_url=provider.url, token_file=str(token_file), env=env
        ) as client:
            write_token(token_file, provider.token())  # the login tool wrote a new one
            accepted = await client.send("example.refresh", {"n": 1})
            assert accepted.accepted
            assert client.token_refreshes == 1
            # The stream (re)connect uses the new token too.
            async with client.listen("example.refresh", replay=True, follow=False) as stream:
                assert [e.id for e in await collect(stream, 1)] == [accepted.id]
            assert client.token_refreshes == 1


async def test_without_refresh_a_401_is_final(tmp_path: Path) -> None:
    async with open_provider() as provider:
        token_file = tmp_path / "token"
        write_token(token_file, provider.token(ttl=-60))
        async with EventsClient.from_env(
            api_url=provider.url, token_file=str(token_file), env={}
        ) as client:
            write_token(token_file, provider.token())
            with pytest.raises(Unauthorized) as info:
                await client.send("example.refresh")
            assert "refresh" not in str(info.value)
            assert client.token_refreshes == 0


async def test_an_unchanged_token_after_a_401_is_fatal_and_says_so(tmp_path: Path) -> None:
    async with open_provider() as provider:
        token_file = tmp_path / "token"
        expired = provider.token(ttl=-60)
        write_token(token_file, expired)
        client = EventsClient(provider.url, find_token(token_file), token_refresh=True)
        async with client:
            with pytest.raises(Unauthorized, match="has not changed") as info:
                await client.send("example.refresh")
            assert str(token_file) in str(info.value)
            assert expired not in str(info.value) and expired not in repr(info.value)
            with pytest.raises(Unauthorized, match="has not changed"):
                async with client.listen("example.refresh"):
                    pass


async def test_a_token_from_the_environment_cannot_be_refreshed(tmp_path: Path) -> None:
    async with open_provider() as provider:
        expired = provider.token(ttl=-60)
        env = {"BUS_API_TOKEN": expired, "BUS_EVENTS_TOKEN_REFRESH": "1"}
        async with EventsClient.from_env(api_url=provider.url, env=env) as client:
            with pytest.raises(Unauthorized, match="BUS_API_TOKEN cannot be refreshed") as info:
                await client.send("example.refresh")
            assert "BUS_EVENTS_TOKEN_FILE" in str(info.value)
            assert expired not in str(info.value)
    with pytest.raises(TokenError, match="cannot be refreshed"):
        find_token(env={"BUS_API_TOKEN": "x"}).reread()


async def test_a_token_provider_is_asked_again_after_a_401() -> None:
    async with open_provider() as provider:
        handed = [provider.token(ttl=-60), provider.token()]
        calls = 0

        async def current() -> str:
            nonlocal calls
            calls += 1
            return handed[min(calls, len(handed)) - 1]

        async with EventsClient(provider.url, token_provider=current) as client:
            await client.send("example.refresh")
            assert (calls, client.token_refreshes) == (2, 1)
            await client.send("example.refresh")
            assert calls == 2  # a valid token is kept

        sync_calls: list[int] = []

        def sync_current() -> str:
            sync_calls.append(1)
            return provider.token()

        async with EventsClient(provider.url, token_provider=sync_current) as client:
            await client.send("example.refresh")
            assert len(sync_calls) == 1


async def test_a_token_about_to_expire_is_renewed_before_the_request(tmp_path: Path) -> None:
    async with open_provider() as provider:
        token_file = tmp_path / "token"
        # Past its exp but inside the provider's 5 s leeway: still accepted, so
        # only the expiry check (not a 401) can make the client re-read it.
        write_token(token_file, provider.token(ttl=-1))
        client = EventsClient(provider.url, find_token(token_file), token_refresh=True)
        async with client:
            fresh = provider.token()
            write_token(token_file, fresh)
            await client.send("example.refresh")
            assert client.token_refreshes == 1
            assert client._http.headers["Authorization"] == f"Bearer {fresh}"


async def test_a_worker_survives_a_provider_restart_with_a_new_secret(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """Provider restarted (new secret: every old token is now invalid) and the token
    file rewritten: the worker reconnects with the new token and replies with it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1/events"
    token_file = tmp_path / "token"
    secrets = ["a" * 64, "b" * 64]
    write_token(
        token_file, mint_token(secrets[0].encode(), subject="w", scopes="events:send events:listen")
    )
    client = EventsClient(url, find_token(token_file), token_refresh=True)
    handled: list[Event] = []

    async def echo(event: Event, publisher: Publisher) -> None:
        handled.append(event)
        await publisher.reply(event, "example.refresh.reply", {"ok": True})

    worker = Worker(
        "example.refresh.request",
        echo,
        retry=RetryPolicy(min_delay=0.05, max_delay=0.2),
    )
    async with client, trio.open_nursery() as nursery:
        async with serve(port, secrets[0], cli_env):
            readiness = await nursery.start(run_worker, client, worker)
        await readiness.wait_not_ready()
        write_token(
            token_file,
            mint_token(secrets[1].encode(), subject="w", scopes="events:send events:listen"),
        )
        async with serve(port, secrets[1], cli_env):
            with trio.fail_after(30):
                await readiness.wait()
            assert client.token_refreshes == 1
            requester_token = mint_token(
                secrets[1].encode(), subject="w", scopes="events:send events:listen"
            )
            async with EventsClient(url, requester_token) as requester:
                async with requester.listen("example.refresh.reply") as replies:
                    sent = await requester.send("example.refresh.request", correlation_id="c1")
                    [reply] = await collect(replies, 1, limit=30)
            assert reply.correlation_id == "c1"
            assert [e.id for e in handled] == [sent.id]
            nursery.cancel_scope.cancel()
