"""A quiet stream is not a dead one; a frozen provider is noticed by the stall timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import trio

from busevents import EventsClient, StreamStalled
from busevents.provider import mint_token

from .helpers import serve_subprocess as serve

SECRET = "quiet-stream-test-secret-0123456789abcdef"


def serve_subprocess(*args: str):
    return serve(dict(os.environ, BUS_API_JWT_SECRET=SECRET), *args)


def token() -> str:
    return mint_token(SECRET.encode(), subject="quiet")


async def test_keepalive_lines_keep_a_quiet_stream_alive_and_a_frozen_one_stalls() -> None:
    async with serve_subprocess("--keepalive", "100ms") as (url, proc):
        async with EventsClient(url, token()) as client:
            async with client.listen("example.quiet", stall_timeout=1.0) as stream:
                events = []
                with trio.move_on_after(2.5):  # no event for 2.5 s, keep-alives every 100 ms
                    async for event in stream:
                        events.append(event)
                assert events == []
            async with client.listen("example.quiet", stall_timeout=1.0) as stream:
                await client.send("example.quiet", {"n": 1})
                got = []
                with pytest.raises(StreamStalled, match=r"no data from .* for 1s"):
                    async for event in stream:
                        got.append(event.payload_obj())
                        proc.send_signal(signal.SIGSTOP)  # the provider freezes
                assert got == [{"n": 1}]


async def test_cli_deadline_ends_a_listen_on_a_frozen_provider(cli_env) -> None:
    async with serve_subprocess("--keepalive", "0") as (url, server):
        env = {**cli_env, "BUS_EVENTS_API_URL": url, "BUS_API_TOKEN": token()}
        async with EventsClient(url, env["BUS_API_TOKEN"]) as client:
            await client.send("example.quiet", 1)
        listener = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "busevents",
                "--timeout",
                "3s",
                "listen",
                "--name",
                "example.quiet",
                "--replay",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert listener.stdout is not None and listener.stderr is not None
        out = b""
        with trio.fail_after(20):
            while not out.endswith(b"\n"):
                out += await listener.stdout.receive_some(65536)
            server.send_signal(signal.SIGSTOP)  # frozen: no byte, no close, no reset
            status = await listener.wait()
            out += await listener.stdout.receive_some(65536)
            err = await listener.stderr.receive_some(65536)
    assert status == 0  # the explicit --timeout is the overall deadline of listen
    assert out.count(b"\n") == 1 and b'"payload":1' in out
    assert not err
