"""`bus-events demo`, step 1 of the README's Quick start, as a user runs it."""

from __future__ import annotations

import json

import pytest

from .conftest import Result


@pytest.mark.parametrize("count", [1, 3])
async def test_demo_round_trip(run_cli, count: int) -> None:
    result: Result = await run_cli("demo", "--count", str(count))
    assert result.status == 0, result.stderr
    events = [json.loads(line) for line in result.out.splitlines()]
    assert [e["payload"] for e in events] == [{"n": n, "ok": True} for n in range(1, count + 1)]
    assert {e["name"] for e in events} == {"example.ping"}
    assert len({e["id"] for e in events}) == count
    assert all(e["identity_id"] == "demo" and e["time"].endswith("Z") for e in events)
    # Narration is on stderr, one line per step, ending with the replay.
    assert "reference provider listening on http://127.0.0.1:" in result.stderr
    assert f"received {count}/{count} events" in result.stderr
    assert f"returned the {count} stored events" in result.stderr


async def test_demo_text_format_and_a_bad_count(run_cli) -> None:
    text = await run_cli("-f", "text", "demo", "--count", "2", "--name", "example.demo")
    assert text.status == 0, text.stderr
    rows = text.out.splitlines()
    assert len(rows) == 2 and all("example.demo" in row for row in rows)
    bad = await run_cli("demo", "--count", "0")
    assert bad.status == 2 and bad.stdout == b""
    assert "--count must be at least 1" in bad.stderr
