"""Usage errors in one voice, a lone ``--``, ``--perf``, help into a closed pipe, token files,
bounded local input, and control characters escaped in text output."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from busevents import EventsClient
from busevents.cli._output import escape_controls
from busevents.provider import RunningProvider

from .helpers import stored


@pytest.fixture
def env(provider: RunningProvider) -> dict[str, str]:
    return {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token(subject="usage")}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sned"], "unknown command 'sned'; did you mean 'send'?"),
        (["send", "--nmae", "x"], "unknown option '--nmae'; did you mean '--name'?"),
        (["--verbsoe", "send"], "unknown option '--verbsoe'; did you mean '--verbose'?"),
        (
            ["send", "--name", "x", "--token", "abc"],
            "unknown option '--token': a token is never given on the command line; "
            "use --token-file PATH or set BUS_API_TOKEN",
        ),
        (["send", "--token=abc"], "use --token-file PATH or set BUS_API_TOKEN"),
        (["run"], "run needs at least one .bus file, e.g. bus-events run checks.bus"),
        (["listen"], "listen needs --name, e.g. bus-events listen --name example.ping"),
        (["send"], "send needs --name (or --ndjson FILE), e.g. bus-events send --name"),
        (
            ["listen", "--name", "x", "--idle-timeout", "5q"],
            "--idle-timeout: invalid duration '5q'",
        ),
        (
            ["--timeout", "5", "send", "--name", "x"],
            "--timeout: invalid duration '5' (missing unit?)",
        ),
        (["bench", "--name", "bench.x", "--warmup", "1x"], "--warmup: invalid duration '1x'"),
        (["dev-token"], "BUS_API_JWT_SECRET"),
    ],
)
async def test_usage_errors_speak_with_one_voice(run_cli, env, args, message) -> None:
    result = await run_cli(*args, env=env)
    assert result.status == 2, result.stderr
    assert result.stdout == b""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("bus-events: error: ")
    text = result.stderr.removeprefix("bus-events: error: ")
    assert message in text, text
    assert text[0].islower() or text[0] in "-'\"" or text.startswith("BUS_"), text
    assert "abc" not in text and "Unused Tokens" not in text and "parameter --" not in text


async def test_a_lone_double_dash_ends_the_global_flags(run_cli, env, provider) -> None:
    result = await run_cli("-f", "json", "--", "send", "--name", "example.dash", env=env)
    assert result.status == 0, result.stderr
    assert json.loads(result.out)["name"] == "example.dash"
    assert len(await stored(provider, "example.dash")) == 1


async def test_metadata_takes_several_values_or_repeats(run_cli, env, provider) -> None:
    args = ["send", "--name", "example.meta", "--metadata", "a=1", "b=2", "--metadata", "c=3"]
    result = await run_cli(*args, env=env)
    assert result.status == 0, result.stderr
    (event,) = await stored(provider, "example.meta")
    assert event["metadata"] == {"a": "1", "b": "2", "c": "3"}


async def test_perf_prints_the_duration_on_stderr(run_cli, env) -> None:
    result = await run_cli("--perf", "send", "--name", "example.perf", env=env)
    assert result.status == 0, result.stderr
    assert re.fullmatch(r"INFO perf bus-events send \d+\.\d{3}\n", result.stderr), result.stderr
    plain = await run_cli("--no-perf", "send", "--name", "example.perf", env=env)
    assert plain.status == 0 and plain.stderr == ""


@pytest.mark.parametrize("args", [["send", "-h"], ["-h"], ["bench", "--help"], ["-V"]])
async def test_help_into_a_closed_pipe_exits_0_quietly(cli_env, args) -> None:
    command = " ".join([sys.executable, "-m", "busevents", *args])
    # `true` exits without reading: every write of the help meets a closed pipe.
    proc = await trio.run_process(
        ["bash", "-c", f"set -o pipefail; sleep 0 | {command} | true"],
        env=cli_env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""


async def test_no_token_points_to_both_ways_of_getting_one(run_cli, provider) -> None:
    result = await run_cli("send", "--name", "x", env={"BUS_EVENTS_API_URL": provider.url})
    assert result.status == 2
    assert "bus auth token" in result.stderr and "bus-events dev-token --write" in result.stderr
    assert "bus auth login" not in result.stderr


async def test_a_fifo_token_file_is_refused_at_once(run_cli, env, tmp_path: Path) -> None:
    fifo = tmp_path / "token.fifo"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to(fifo)
    for path in ("token.fifo", "link"):
        url = {"BUS_EVENTS_API_URL": env["BUS_EVENTS_API_URL"]}
        with trio.fail_after(30):  # hung in open() before
            result = await run_cli("--token-file", path, "send", "--name", "x", env=url)
        assert result.status == 2
        assert "is not a regular file" in result.stderr and result.stderr.count("\n") == 1


async def test_a_token_file_over_64_kib_is_an_error(run_cli, env, tmp_path: Path) -> None:
    (tmp_path / "big").write_text(env["BUS_API_TOKEN"] + " " * (64 * 1024))
    url = {"BUS_EVENTS_API_URL": env["BUS_EVENTS_API_URL"]}
    result = await run_cli("--token-file", "big", "send", "--name", "x", env=url)
    assert result.status == 2 and "larger than 64 KiB" in result.stderr


async def test_oversized_payloads_are_refused(run_cli, env, provider) -> None:
    with trio.fail_after(30):
        result = await run_cli("send", "--name", "example.huge", "--payload", "@/dev/zero", env=env)
    assert result.status == 2
    assert "--payload (/dev/zero) is larger than 16 MiB" in result.stderr
    assert "Traceback" not in result.stderr
    assert await stored(provider, "example.huge") == []


async def test_a_too_long_ndjson_line_is_reported_and_skipped(run_cli, env, provider) -> None:
    long_line = b'{"payload": "' + b"x" * (16 * 1024 * 1024) + b'"}\n'
    good = b'{"name": "example.long", "payload": 2}\n'
    for stdin, expected_line in [(long_line + good, 1), (good + long_line.rstrip(b"\n"), 2)]:
        result = await run_cli(
            "send", "--ndjson", "-", "--name", "example.long", env=env, stdin=stdin
        )
        assert result.status == 1
        assert f"line {expected_line}: longer than 16 MiB" in result.stderr
        assert result.out == "accepted 1 failed 1\n"
    assert [e["payload"] for e in await stored(provider, "example.long")] == [2, 2]


async def test_text_output_escapes_control_characters(run_cli, env, provider) -> None:
    hostile = "\x1b]0;pwned\x07\r\x1b[2J\u202e"
    async with EventsClient(provider.url, env["BUS_API_TOKEN"]) as client:
        await client.send("example.evil", {"t": 1}, correlation_id=hostile)
    args = ["listen", "--name", "example.evil", "--replay", "--no-follow"]
    text = await run_cli("-f", "text", *args, env=env)
    assert text.status == 0, text.stderr
    assert not re.search(rb"[\x00-\x09\x0b-\x1f\x7f]", text.stdout), text.stdout
    assert "\u202e" not in text.out
    assert "\\x1b]0;pwned" in text.out
    raw = await run_cli(*args, env=env)  # JSON stays byte-exact
    assert json.loads(raw.stdout)["correlationId"] == hostile
    assert raw.stdout.count(b"\n") == 1 and b"\\u001b" in raw.stdout


async def test_diagnostics_escape_control_characters(run_cli, env) -> None:
    result = await run_cli("listen", "--name", "bad\x1b[2Jname", env=env)
    assert result.status == 1
    assert "\x1b" not in result.stderr and "\\x1b[2J" in result.stderr


@given(st.text())
def test_escape_controls_leaves_no_control_character(text: str) -> None:
    out = escape_controls(text)
    assert not re.search("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", out)
    if not re.search("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", text):
        assert out == text
