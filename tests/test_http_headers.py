"""What every publish carries: the Idempotency-Key (given, or generated once per
retried call), and what a 401 tells the user to do (never the token)."""

from __future__ import annotations

import re

import pytest

from busevents import EventsClient, PublishRequest, ServerError
from busevents.provider import RunningProvider, mint_token

from .test_publish_lean import Server, always_ok, ok, serving


def header(request: bytes, name: bytes) -> bytes | None:
    head = request.partition(b"\r\n\r\n")[0]
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


async def test_the_given_idempotency_key_is_sent() -> None:
    server = Server(always_ok)
    async with serving(server) as url, EventsClient(url, "tok") as client:
        await client.send("example.ping", idempotency_key="order-42")
        await client.publish(PublishRequest(name="example.ping"), idempotency_key="order-43")
        await client.send("example.ping")
    keys = [header(request, b"Idempotency-Key") for request in server.requests]
    assert keys == [b"order-42", b"order-43", None]


async def test_retries_reuse_one_generated_key_per_call() -> None:
    async def reply(n: int, request: bytes) -> tuple[bytes, bool]:
        if n in (1, 2, 4):  # the first call succeeds on its third attempt, the second on its second
            body = b'{"error":"unavailable","message":"try later"}'
            return (
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
                False,
            )
        return ok(), False

    server = Server(reply)
    async with serving(server) as url, EventsClient(url, "tok") as client:
        await client.publish(PublishRequest(name="example.ping"), retries=3)
        await client.publish(PublishRequest(name="example.ping"), retries=3)
        with pytest.raises(ServerError):  # no retries: the 503 is the answer, no key sent
            server.reply = _always_503
            await client.publish(PublishRequest(name="example.ping"))
    keys = [header(request, b"Idempotency-Key") for request in server.requests]
    assert keys[0] == keys[1] == keys[2] and keys[3] == keys[4]
    assert keys[0] != keys[3]
    for key in (keys[0], keys[3]):
        assert key is not None and re.fullmatch(rb"[0-9a-f]{32}", key)  # 128 random bits
    assert keys[5] is None


async def _always_503(n: int, request: bytes) -> tuple[bytes, bool]:
    return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", False


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
async def test_an_invalid_idempotency_key_sends_nothing(key: str) -> None:
    server = Server(always_ok)
    async with serving(server) as url, EventsClient(url, "tok") as client:
        with pytest.raises(ValueError, match="idempotency_key"):
            await client.send("example.ping", idempotency_key=key)
    assert server.requests == []


@pytest.mark.parametrize(
    ("which", "hint"),
    [
        ("expired", "get a new token: bus auth token"),
        ("other-secret", "the token belongs to another deployment"),
        ("other-audience", "the token belongs to another deployment"),
    ],
)
async def test_401_says_how_to_get_a_token_that_works(
    run_cli, provider: RunningProvider, which: str, hint: str
) -> None:
    if which == "expired":
        token = provider.token(ttl=-60)
    elif which == "other-secret":
        token = mint_token(b"another-deployment-secret-of-32-bytes!", subject="dev")
    else:
        token = provider.token(audience="example.org/other")
    env = {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": token}
    for args in (
        ("send", "--name", "example.ping"),
        ("listen", "--name", "example.ping", "--replay", "--no-follow"),
    ):
        result = await run_cli(*args, env=env)
        assert result.status == 1
        assert "HTTP 401" in result.stderr
        assert f"hint: {hint}" in result.stderr
        assert token not in result.stderr and token.split(".")[2] not in result.stderr
