"""The spec §1 curl examples against `bus-events serve`, as a user would type them."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import trio

from .helpers import serve_subprocess

SECRET = "curl-examples-secret-0123456789abcdef0123"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_serve_answers_the_spec_curl_examples(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "BUS_API_JWT_SECRET": SECRET}
    async with serve_subprocess(env) as (base, server):
        token = (
            (
                await trio.run_process(
                    [
                        sys.executable,
                        "-m",
                        "busevents",
                        "dev-token",
                        "--scope",
                        "events:send events:listen",
                    ],
                    env=env,
                    capture_stdout=True,
                )
            )
            .stdout.decode()
            .strip()
        )
        auth = ["-H", f"Authorization: Bearer {token}"]
        body = '{"name": "example.ping", "correlationId": "optional-id", "payload": {"ok": true}}'
        post = await trio.run_process(
            [
                "curl",
                "-sS",
                "-w",
                "\n%{http_code}",
                "-X",
                "POST",
                base,
                *auth,
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
            ],
            capture_stdout=True,
        )
        accepted_text, status = post.stdout.decode().rsplit("\n", 1)
        accepted = json.loads(accepted_text)
        assert status in ("200", "202") and accepted["accepted"] is True and accepted["id"]

        stream = await trio.run_process(
            ["curl", "-sSN", f"{base}/stream?name=example.ping&replay=true&follow=false", *auth],
            capture_stdout=True,
        )
        (line,) = stream.stdout.splitlines()
        envelope = json.loads(line)
        assert envelope["id"] == accepted["id"] and envelope["correlationId"] == "optional-id"
        assert envelope["payload"] == {"ok": True} and envelope["identity_id"] == "dev"
    assert server.returncode == 0  # Ctrl-C stops the provider cleanly


async def test_serve_on_a_taken_port_is_one_clear_error(run_cli) -> None:
    taken = trio.socket.socket()
    await taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    result = await run_cli(
        "serve", "--addr", f"127.0.0.1:{port}", env={"BUS_API_JWT_SECRET": SECRET}
    )
    taken.close()
    assert result.status == 1
    assert (
        result.stderr.strip()
        == f"bus-events: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
