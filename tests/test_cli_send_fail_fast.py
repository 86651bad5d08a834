"""``send --ndjson --fail-fast``: what it stops, and counts that match what was stored.

--fail-fast stops reading at the first failure; lines read before it are still
published, and every event the provider accepted is counted, so that a user
re-sending "the rest" never duplicates an event.
"""

from __future__ import annotations

import json

import pytest

from busevents.provider import RunningProvider

from .helpers import stored


@pytest.fixture
def env(provider: RunningProvider) -> dict[str, str]:
    return {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token(subject="ff")}


def batch(bad: int, total: int, bad_line: bytes) -> bytes:
    lines = [
        bad_line if n == bad else json.dumps({"name": "example.ff", "payload": {"n": n}}).encode()
        for n in range(1, total + 1)
    ]
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("concurrency", ["1", "16"])
async def test_a_bad_line_stops_after_every_line_before_it_was_sent(
    run_cli, env, provider, concurrency: str
) -> None:
    """Bad line 30 of 40: lines 1-29 are stored and counted, 31-40 never read."""
    result = await run_cli(
        "send",
        "--ndjson",
        "-",
        "--fail-fast",
        "--concurrency",
        concurrency,
        env=env,
        stdin=batch(30, 40, b"{not json"),
    )
    assert result.status == 1
    assert "line 30:" in result.stderr
    assert result.out == "accepted 29 failed 1\n"
    numbers = sorted(e["payload"]["n"] for e in await stored(provider, "example.ff"))
    assert numbers == list(range(1, 30))


@pytest.mark.parametrize("concurrency", ["1", "16"])
async def test_a_refused_publish_counts_every_stored_event(
    run_cli, env, provider, concurrency: str
) -> None:
    """A line the provider refuses (403, a reserved name): the lines before it are all
    stored; lines after it that were already in flight may be too, and are counted."""
    refused = b'{"name": "bus.reserved.x", "payload": 1}'
    result = await run_cli(
        "send",
        "--ndjson",
        "-",
        "--fail-fast",
        "--concurrency",
        concurrency,
        env=env,
        stdin=batch(30, 40, refused),
    )
    assert result.status == 1
    assert "line 30:" in result.stderr
    numbers = sorted(e["payload"]["n"] for e in await stored(provider, "example.ff"))
    assert result.out == f"accepted {len(numbers)} failed 1\n"
    assert numbers[:29] == list(range(1, 30))
    assert len(numbers) <= 29 + int(concurrency)


async def test_without_fail_fast_every_good_line_is_sent(run_cli, env, provider) -> None:
    result = await run_cli("send", "--ndjson", "-", env=env, stdin=batch(30, 40, b"{not json"))
    assert (result.status, result.out) == (1, "accepted 39 failed 1\n")
    assert len(await stored(provider, "example.ff")) == 39
