"""Reference provider against hostile peers and bodies, as a real `bus-events serve` process.

Issue 16: bounded shutdown whatever peers do (1), finished responses release
their connection (4), hostile publish bodies and tokens are 400/401 with a JSON
body (6), the token is checked before the body is read and a slow body is a
408 (7).  Raw sockets where a well-behaved client could not misbehave enough.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import jwt
import pytest
import trio

from busevents.provider import mint_token

from .helpers import serve_subprocess

SECRET = "hardening-tests-secret-0123456789abcdef012345"


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    return {**cli_env, "BUS_API_JWT_SECRET": SECRET}


def token(scopes: str = "events:send events:listen", **claims: object) -> str:
    if claims:
        now = int(time.time())
        body = {"sub": "alice", "aud": "ai.hg.fi/api", "scope": scopes, "iat": now, **claims}
        return jwt.encode(body, SECRET.encode(), algorithm="HS256")
    return mint_token(SECRET.encode(), subject="alice", scopes=scopes)


async def connect(url: str) -> trio.SocketStream:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return await trio.open_tcp_stream(parts.hostname, parts.port)


def request(method: str, url: str, *headers: str, version: str = "1.1", body: bytes = b"") -> bytes:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/{version}", f"Host: {parts.netloc}", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def read_until(stream: trio.SocketStream, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, data
        data += chunk
    return data


@pytest.fixture
async def served(env: dict[str, str]) -> AsyncIterator[tuple[str, trio.Process]]:
    async with serve_subprocess(env, "--shutdown-grace", "1s", "--body-timeout", "1s") as pair:
        yield pair


# -- 1: bounded shutdown ---------------------------------------------------------


async def test_sigterm_stops_serve_while_a_stream_client_never_reads(
    served: tuple[str, trio.Process],
) -> None:
    url, proc = served
    reader = await connect(url)
    pipeliner = await connect(url)
    try:
        stream_url = url + "/stream?name=example.flood"
        auth = {"Authorization": f"Bearer {token()}"}
        await reader.send_all(request("GET", stream_url, *_raw(auth)))
        await read_until(reader, b"\r\n\r\n")  # the stream is open; never read again
        payload = "x" * (512 * 1024)
        async with httpx.AsyncClient(timeout=10) as http:
            for _ in range(64):  # 32 MiB: more than any socket buffer holds
                response = await http.post(
                    url, json={"name": "example.flood", "payload": payload}, headers=auth
                )
                assert response.status_code == 202
        # And a peer that pipelines requests without reading any answer.
        with trio.move_on_after(2):
            await pipeliner.send_all(request("GET", url + "/nope") * 50_000)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):  # grace 1 s: without a hard close it waits for the peers
            await proc.wait()
        assert proc.returncode == 0
    finally:
        await reader.aclose()
        await pipeliner.aclose()


async def test_sigterm_ends_open_streams_with_the_terminating_chunk(
    served: tuple[str, trio.Process], env: dict[str, str]
) -> None:
    url, proc = served
    auth = {"Authorization": f"Bearer {token()}"}
    listener = await trio.lowlevel.open_process(
        [sys.executable, "-m", "busevents", "listen", "--name", "example.bye"],
        env={**env, "BUS_EVENTS_API_URL": url, "BUS_API_TOKEN": token()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    reader = await connect(url)
    try:
        await reader.send_all(request("GET", url + "/stream?name=example.bye", *_raw(auth)))
        await read_until(reader, b"\r\n\r\n")
        assert listener.stdout is not None and listener.stderr is not None
        async with httpx.AsyncClient() as http:
            with trio.fail_after(20):
                while True:  # until the CLI's stream is open and has an event
                    sent = await http.post(url, json={"name": "example.bye"}, headers=auth)
                    assert sent.status_code == 202
                    with trio.move_on_after(0.3):
                        if await listener.stdout.receive_some(65536):
                            break
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            rest = await read_to_eof(reader)
            await listener.wait()
            stderr = b""
            while chunk := await listener.stderr.receive_some(65536):
                stderr += chunk
    finally:
        await reader.aclose()
        if listener.returncode is None:
            listener.kill()
            await listener.wait()
    assert rest.endswith(b"0\r\n\r\n"), rest[-40:]
    assert listener.returncode == 0, stderr
    assert b"incomplete" not in stderr


def _raw(headers: dict[str, str]) -> list[str]:
    return [f"{k}: {v}" for k, v in headers.items()]


# -- 4: finished responses release their connection ------------------------------


@pytest.mark.parametrize(
    ("version", "headers"),
    [("1.0", ()), ("1.1", ("Connection: close",))],
    ids=["http-1.0", "connection-close"],
)
async def test_finished_stream_closes_the_connection(
    served: tuple[str, trio.Process], version: str, headers: tuple[str, ...]
) -> None:
    url, _ = served
    async with httpx.AsyncClient() as http:
        for n in range(3):
            await http.post(
                url,
                json={"name": "example.done", "payload": n},
                headers={"Authorization": f"Bearer {token()}"},
            )
    target = url + "/stream?name=example.done&replay=true&follow=false"
    for _ in range(5):
        sock = await connect(url)
        await sock.send_all(
            request("GET", target, f"Authorization: Bearer {token()}", *headers, version=version)
        )
        with trio.fail_after(10):  # the server must close: the client waits for EOF
            data = await read_to_eof(sock)
        await sock.aclose()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0].endswith(b"200 ")
        assert body.count(b"example.done") == 3


async def test_finished_stream_leaves_a_keep_alive_connection_reusable_then_idle_closed(
    served: tuple[str, trio.Process],
) -> None:
    url, _ = served
    sock = await connect(url)
    target = url + "/stream?name=example.again&replay=true&follow=false"
    auth = f"Authorization: Bearer {token()}"
    try:
        with trio.fail_after(10):
            for _ in range(3):
                await sock.send_all(request("GET", target, auth))
                await read_until(sock, b"0\r\n\r\n")
        # Idle now: the server's keep-alive timeout (5 s) closes the connection.
        with trio.fail_after(20):
            assert await read_to_eof(sock) == b""
    finally:
        await sock.aclose()


# -- 6: hostile publish bodies and tokens ------------------------------------------


BAD_BODIES = {
    "nested 1000 deep": b'{"name":"example.x","payload":' + b"[" * 1000 + b"]" * 1000 + b"}",
    "nested 100000 deep": b'{"name":"example.x","payload":'
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}",
    "invalid UTF-8 in a string": b'{"name":"example.x","payload":"caf\xc3\x28"}',
    "invalid UTF-8 in the name": b'{"name":"example.\xff"}',
    "integer of 4301 digits": b'{"name":"example.x","payload":' + b"7" * 4301 + b"}",
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_hostile_publish_bodies_get_400_with_a_json_body(
    served: tuple[str, trio.Process], case: str
) -> None:
    url, _ = served
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            url,
            content=BAD_BODIES[case],
            headers={"Authorization": f"Bearer {token()}", "Content-Type": "application/json"},
        )
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error"] == "bad_request" and body["message"]
        # The provider is still fine.
        ok = await http.post(
            url, json={"name": "example.x"}, headers={"Authorization": f"Bearer {token()}"}
        )
        assert ok.status_code == 202


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
async def test_a_token_with_a_huge_time_claim_gets_401(
    served: tuple[str, trio.Process], claim: str
) -> None:
    url, _ = served
    claims: dict[str, object] = {"exp": int(time.time()) + 600, claim: 10**400}
    huge = token(**claims)
    async with httpx.AsyncClient(timeout=10) as http:
        for response in (
            await http.post(
                url, json={"name": "example.x"}, headers={"Authorization": f"Bearer {huge}"}
            ),
            await http.get(
                url + "/stream",
                params={"name": "example.x", "follow": "false"},
                headers={"Authorization": f"Bearer {huge}"},
            ),
        ):
            assert response.status_code == 401, response.text
            assert response.json()["error"] == "invalid_auth"


# -- 7: the token before the body; slow bodies ------------------------------------


async def test_unauthenticated_bodies_are_not_kept(served: tuple[str, trio.Process]) -> None:
    url, proc = served

    def rss() -> int:
        with open(f"/proc/{proc.pid}/status") as file:
            line = next(line for line in file if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    body = b'{"name":"example.x","payload":"' + b"x" * (1024 * 1024 - 40) + b'"}'
    before = rss()
    socks = []
    for _ in range(60):  # 60 MiB of bodies, each missing its last byte
        sock = await connect(url)
        await sock.send_all(request("POST", url, body=body)[:-1])
        socks.append(sock)
    await trio.sleep(0.5)
    grown = rss() - before
    answers = []
    with trio.fail_after(15):
        for sock in socks:
            await sock.send_all(b"}")
            answers.append((await read_until(sock, b"}")).split(b"\r\n")[0])
            await sock.aclose()
    assert grown < 30 * 1024 * 1024, f"RSS grew by {grown // (1024 * 1024)} MiB"
    assert set(answers) == {b"HTTP/1.1 401 "}


async def test_a_body_slower_than_the_read_timeout_gets_408(
    served: tuple[str, trio.Process],
) -> None:
    url, _ = served
    sock = await connect(url)
    body = b'{"name": "example.slow"}'
    message = request("POST", url, f"Authorization: Bearer {token()}", body=body)
    await sock.send_all(message[:-5])  # --body-timeout 1s: the rest never comes in time
    with trio.fail_after(15):
        data = await read_until(sock, b"}")
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data[:200]
    assert json.loads(rest)["error"] == "request_timeout"
    await sock.aclose()
