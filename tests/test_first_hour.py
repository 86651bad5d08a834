"""What a new user meets in the first hour of the CLI: messages and help that say
what is true (deadlines, counts, rates, usage lines)."""

from __future__ import annotations

import re

import pytest

from busevents import EventsClient
from busevents.provider import RunningProvider


@pytest.fixture
async def env(provider: RunningProvider) -> dict[str, str]:
    token = provider.token(subject="newcomer")
    async with EventsClient(provider.url, token) as client:
        await client.send("example.one", {"n": 1})
    return {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": token}


async def test_count_with_timeout_says_the_deadline_passed(run_cli, env) -> None:
    result = await run_cli(
        "--timeout", "1s", "listen", "--name", "example.quiet", "--count", "1", env=env
    )
    assert result.status == 1
    assert "0 of the 1 event asked for arrived before the --timeout deadline (1 s)" in (
        result.stderr
    )
    assert "stream ended" not in result.stderr


async def test_stats_counts_one_event_in_the_singular_with_a_true_rate(run_cli, env) -> None:
    # Quiet for 1.5 s after the one event: the run lasts longer than a second, so
    # the rate is below one event a second, and must not be printed as 0.
    result = await run_cli(
        "listen",
        "--name",
        "example.one",
        "--replay",
        "--idle-timeout",
        "1500ms",
        "--stats",
        env=env,
    )
    assert result.status == 0, result.stderr
    stats = re.search(r"bus-events: (.*)", result.stderr)
    assert stats is not None, result.stderr
    assert stats.group(1).startswith("1 event, 0.")
    assert re.search(r"^1 event, 0\.\d+ events/s, \d+ B, [\d.]+ s$", stats.group(1)), stats.group(1)
    # (a rate such as 0.51 events/s holds "1 events" as a substring: match whole numbers)
    assert not re.search(r"(?<![\d.])1 events\b", result.stderr), result.stderr
    assert " 0 events/s" not in result.stderr


async def test_global_timeout_help_does_not_read_as_a_30_second_listen(run_cli) -> None:
    result = await run_cli("--help")
    text = " ".join(result.out.split())
    help_line = text[text.index("--timeout DURATION") :]
    assert "runs until stopped unless --timeout is given" in re.sub(r"[│ ]+", " ", help_line)
    assert "for listen also the overall deadline" not in text


async def test_run_help_shows_a_usable_shebang_and_a_plain_files_argument(run_cli) -> None:
    result = await run_cli("run", "--help")
    assert result.status == 0
    assert "--files" not in result.out
    shebang = re.search(r"#!/usr/bin/env -S bus-events run\S*", result.out)
    assert shebang is not None and shebang.group(0) == "#!/usr/bin/env -S bus-events run"
