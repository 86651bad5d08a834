"""``listen --retry --replay`` in constant memory (issue 21): 300,000 events through
a loopback provider that cuts the connection twice, the CLI as a subprocess, its
resident memory read at two points of the stream.

Before the fix every id written was kept for ever (a set of ~100 bytes an id);
now the ``after=`` cursor and a bounded window of recent ids do the same work.
"""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import parse_qs, unquote, urlsplit

import trio

from .faults import chunk, serve_raw

TOKEN = "canary.header.signature-DO-NOT-PRINT"
NAME = "example.memory"
EVENTS = 300_000
#: The provider's n-th connection drops (mid-line) before the event of index CUTS[n].
CUTS = (110_000, 220_000)
FIRST_SAMPLE, SECOND_SAMPLE = 100_000, 290_000
CLI = (sys.executable, "-m", "busevents")
LISTEN = ("listen", "--name", NAME, "--retry", "--replay")


def _lines() -> tuple[bytes, list[int]]:
    offsets = [0]
    parts = []
    size = 0
    for i in range(EVENTS):
        line = b'{"id":"1-%d","name":"%s","payload":{"n":%d}}\n' % (i, NAME.encode(), i)
        parts.append(line)
        size += len(line)
        offsets.append(size)
    return b"".join(parts), offsets


BLOB, OFFSETS = _lines()


def _after(head: bytes) -> int:
    """The index of the first event to send: the one after the ``after`` cursor."""
    target = head.split(b" ", 2)[1].decode()
    after = parse_qs(urlsplit(target).query).get("after")
    if not after:
        return 0
    return int(unquote(after[0]).split("-")[1]) + 1


def provider():  # type: ignore[no-untyped-def]
    connections = 0

    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        nonlocal connections
        connections += 1
        cut = CUTS[connections - 1] if connections <= len(CUTS) else EVENTS
        await _serve(stream, _after(head), cut)

    return handler


async def _serve(stream: trio.SocketStream, start: int, stop: int) -> None:
    """History from the cursor on; a cut (no terminating chunk) before ``stop``;
    after the last event, keep-alive lines until the client goes."""
    await stream.send_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    pos, end = OFFSETS[start], OFFSETS[stop]
    while pos < end:
        piece = BLOB[pos : min(pos + 256 * 1024, end)]
        await stream.send_all(chunk(piece))
        pos += len(piece)
    if stop < EVENTS:
        # Half a line, then the connection goes: a provider that crashed.
        await stream.send_all(chunk(BLOB[end : end + 20]))
        return
    while True:
        await stream.send_all(chunk(b"\n"))
        await trio.sleep(0.5)


def rss(pid: int) -> int:
    """Resident memory of process ``pid``, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for row in status:
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_listen_retry_replay_memory_does_not_grow_with_the_event_count(
    cli_env: dict[str, str],
) -> None:
    env = {
        **cli_env,
        "BUS_API_TOKEN": TOKEN,
        "BUS_EVENTS_LISTENER_RETRY_MIN": "10ms",
        "BUS_EVENTS_LISTENER_RETRY_MAX": "50ms",
    }
    async with serve_raw(provider()) as base:
        proc = await trio.lowlevel.open_process(
            [*CLI, "--api-url", f"{base}/api/v1/events", *LISTEN],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        samples: dict[int, int] = {}
        got = 0  # bytes of output checked against the expected stream
        lines = 0
        try:
            assert proc.stdout is not None
            with trio.fail_after(60):
                while lines < EVENTS:
                    data = await proc.stdout.receive_some(1 << 20)
                    assert data, "the listen ended early"
                    # Every event exactly once, in order: the output is the history.
                    assert data == BLOB[got : got + len(data)], f"output differs after {got} B"
                    got += len(data)
                    lines += data.count(b"\n")
                    for mark in (FIRST_SAMPLE, SECOND_SAMPLE):
                        if lines >= mark and mark not in samples:
                            samples[mark] = rss(proc.pid)
        finally:
            proc.terminate()
            with trio.CancelScope(shield=True):
                await proc.wait()
        assert proc.stderr is not None
        stderr = (await proc.stderr.receive_some(1 << 16)).decode()
    assert got == len(BLOB)
    assert stderr.count("reconnecting in") == len(CUTS)  # the cuts happened
    growth = samples[SECOND_SAMPLE] - samples[FIRST_SAMPLE]
    per_event = growth / (SECOND_SAMPLE - FIRST_SAMPLE)
    # A set of every id grew ~100 B an event (19 MB here); allow for allocator noise.
    assert per_event < 10, f"RSS grew {growth} B over {SECOND_SAMPLE - FIRST_SAMPLE} events"
