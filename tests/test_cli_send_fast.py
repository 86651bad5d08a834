"""The plain one-event ``send`` runs without cyclopts; it must behave exactly like the
full command (forced here with ``-C .``, a flag outside the fast form)."""

from __future__ import annotations

import re

import pytest

from busevents.provider import RunningProvider

CASES = [
    ("send", "--name", "example.fast", "--payload", '{"ok":true}'),
    ("-f", "json", "send", "--name=example.fast", "--payload=[1,2]", "--correlation-id", "c1"),
    ("-q", "send", "--name", "example.fast"),
    ("send", "--name", "bus.vm.start.request", "--payload", "{}"),  # 403 with a hint
    ("send", "--name", "example.fast", "--payload", "{bad"),  # usage error, exit 2
    ("send", "--name", "Not A Name"),  # 400 from the provider
    ("--timeout", "nope", "send", "--name", "example.fast"),  # usage error
    ("send", "--name", "example.fast", "--retry", "-1"),  # usage error
]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(c) for c in CASES])
async def test_fast_send_matches_the_full_command(
    run_cli, provider: RunningProvider, args: tuple[str, ...]
) -> None:
    env = {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token()}
    fast = await run_cli(*args, env=env)
    full = await run_cli("-C", ".", *args, env=env)
    assert fast.status == full.status
    assert fast.stderr == full.stderr
    # ids and times differ per event; everything else is the same
    assert re.sub(rb"\d", b"0", fast.stdout) == re.sub(rb"\d", b"0", full.stdout)


async def test_missing_url_matches(run_cli) -> None:
    fast = await run_cli("send", "--name", "example.fast")
    full = await run_cli("-C", ".", "send", "--name", "example.fast")
    assert (fast.status, fast.stderr) == (full.status, full.stderr) == (2, full.stderr)
    assert "BUS_EVENTS_API_URL" in fast.stderr


async def test_fast_send_does_not_load_cyclopts_or_httpx(run_cli, provider) -> None:
    env = {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token()}
    result = await run_cli(
        "send", "--name", "example.fast", env={**env, "PYTHONPROFILEIMPORTTIME": "1"}
    )
    assert result.status == 0
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
    assert "busevents.cli._fastsend" in imported
    assert not {"cyclopts", "httpx", "httpcore"} & imported
