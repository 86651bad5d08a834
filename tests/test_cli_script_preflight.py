"""``bus-events run``: the offline preflight, exit 65 for syntax errors, sticky flag lines
parsed like the command line, failures named by line, and bounds on what a script reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from busevents.provider import RunningProvider

from .helpers import stored

FIRST = "events send --name example.never --payload 1\n"


@pytest.fixture
def env(provider: RunningProvider) -> dict[str, str]:
    return {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token(subject="pre")}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("events send --name x.y --payload '{bad'\n", "--payload is not valid JSON"),
        ("events listen --name x.y --idle-timeout 5q\n", "--idle-timeout: invalid duration '5q'"),
        ("events listen --name x.y --group g\n", "--group needs --delivery unicast"),
        ("--timeout 5\n", "--timeout: invalid duration '5' (missing unit?)"),
        ("events send --name x.y --payload @missing.json\n", "cannot read missing.json"),
        ("events send --name x.y --metadata novalue\n", "expected KEY=VALUE"),
        ("events send --name x.y --retry -1\n", "--retry must be 0 or more"),
        ("events sned --name x.y\n", "unknown command 'sned'; did you mean 'send'?"),
        (
            "evnets send --name x.y\n",
            "'evnets' is not this module (events); did you mean 'events'?",
        ),
        ("--colour never\n", "unknown global flag '--colour'; did you mean '--color'?"),
        ("events --token-file nowhere send --name x.y\n", "nowhere"),
        ("events -C no-such-dir send --name x.y\n", "cannot change directory to no-such-dir"),
    ],
)
async def test_one_bad_line_means_nothing_runs(
    run_cli, env, provider, tmp_path: Path, text: str, message: str
) -> None:
    write(tmp_path / "bad.bus", FIRST + text)
    result = await run_cli("run", "bad.bus", env=env)
    assert result.status == 2, result.stderr
    assert result.stderr.startswith("bus-events: error: bad.bus:2: "), result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert result.stdout == b""
    assert await stored(provider, "example.never") == []


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("events send --name 'open\n", 2, "syntax error: unterminated quote"),
        ("events send --name x.y \\\n", 2, "syntax error: dangling \\ at the end of the file"),
        ("events send \\\n  --name x.y \\", 3, "syntax error: dangling \\ at the end of the file"),
    ],
)
async def test_syntax_errors_exit_65(
    run_cli, env, provider, tmp_path: Path, text: str, line: int, message: str
) -> None:
    write(tmp_path / "s.bus", FIRST + text)
    result = await run_cli("run", "s.bus", env=env)
    assert result.status == 65
    assert result.stderr == f"bus-events: error: s.bus:{line}: {message}\n"
    assert await stored(provider, "example.never") == []


async def test_a_syntax_error_in_a_later_file_stops_the_first(
    run_cli, env, provider, tmp_path: Path
) -> None:
    write(tmp_path / "one.bus", FIRST)
    write(tmp_path / "two.bus", '# a comment\nevents send --name "x\n')
    result = await run_cli("run", "one.bus", "two.bus", env=env)
    assert result.status == 65 and "two.bus:2: syntax error" in result.stderr
    assert await stored(provider, "example.never") == []


async def test_a_failing_command_is_named_with_its_line(
    run_cli, env, provider, tmp_path: Path
) -> None:
    write(
        tmp_path / "stop.bus",
        "events send --name example.stop --payload 1\n\n"
        "events listen --name 'bad*name'  # fails at the provider\n"
        "events send --name example.stop --payload 2\n",
    )
    result = await run_cli("run", "stop.bus", env=env)
    assert result.status == 1
    assert result.stderr.splitlines()[-1] == (
        "bus-events: error: stop.bus:3: command failed (exit 1): events listen --name 'bad*name'"
    )
    assert [e["payload"] for e in await stored(provider, "example.stop")] == [1]


async def test_sticky_resets_and_perf(run_cli, env, provider, tmp_path: Path) -> None:
    write(
        tmp_path / "flags.bus",
        "--perf\n--format json --verbose\nevents send --name example.sticky --payload 1\n"
        "--no-perf --no-verbose\n--no-output --no-format --no-chdir --no-quiet\n"
        "events send --name example.sticky --payload 2\n"
        "--quiet\nevents send --name example.sticky --payload 3\n",
    )
    result = await run_cli("run", "flags.bus", env=env)
    assert result.status == 0, result.stderr
    lines = result.out.splitlines()
    assert lines[0].startswith("{") and lines[1].startswith("accepted ") and len(lines) == 2
    perf = [x for x in result.stderr.splitlines() if x.startswith("INFO perf")]
    assert len(perf) == 1 and re.fullmatch(r"INFO perf bus-events send \d+\.\d{3}", perf[0])
    assert [e["payload"] for e in await stored(provider, "example.sticky")] == [1, 2, 3]


async def test_the_runs_own_flags_reach_every_command(run_cli, env, tmp_path: Path) -> None:
    """``--color`` given to run was dropped on the way to the commands before."""
    write(tmp_path / "c.bus", "events listen --name 'bad*name'\n")
    colored = await run_cli("--color", "always", "run", "c.bus", env=env)
    assert (
        colored.status == 1 and colored.stderr.count("\x1b[31m") == 2
    )  # the command's, then run's
    sticky = write(tmp_path / "d.bus", "--color always\n--no-color\nevents listen --name 'a*'\n")
    plain = await run_cli("run", sticky.name, env=env)
    assert plain.status == 1 and "\x1b[" not in plain.stderr


async def test_include_errors_name_the_including_line(
    run_cli, env, provider, tmp_path: Path
) -> None:
    write(tmp_path / "main.bus", FIRST + "# two\nmissing.bus\n")
    result = await run_cli("run", "main.bus", env=env)
    assert result.status == 2
    assert "main.bus:3: cannot read" in result.stderr and "missing.bus" in result.stderr
    write(tmp_path / "a.bus", FIRST + "b.bus\n")
    write(tmp_path / "b.bus", "\n\na.bus\n")
    result = await run_cli("run", "a.bus", env=env)
    assert result.status == 2 and "b.bus:3: include cycle: a.bus → b.bus → a.bus" in result.stderr
    assert ":0:" not in result.stderr
    missing = await run_cli("run", "nowhere.bus", env=env)
    assert missing.status == 2 and "cannot read nowhere.bus" in missing.stderr
    assert await stored(provider, "example.never") == []


async def test_include_graphs_are_bounded(run_cli, env, provider, tmp_path: Path) -> None:
    # Each level includes the next twice: 2^24 commands if nothing stopped it.
    for level in range(24):
        write(tmp_path / f"l{level}.bus", f"l{level + 1}.bus\nl{level + 1}.bus\n")
    write(tmp_path / "l24.bus", "events send --name example.never\n")
    write(tmp_path / "top.bus", FIRST + "l0.bus\n")
    with trio.fail_after(50):
        result = await run_cli("run", "top.bus", env=env)
    assert result.status == 2 and "files read through includes" in result.stderr

    # A chain 1,200 deep (a RecursionError traceback before).
    for level in range(1200):
        write(tmp_path / f"c{level}.bus", f"c{level + 1}.bus\n")
    write(tmp_path / "c1200.bus", FIRST)
    with trio.fail_after(50):
        result = await run_cli("run", "c0.bus", env=env)
    assert result.status == 2 and "includes nested more than 64 deep" in result.stderr
    assert "Traceback" not in result.stderr

    # Many lines through a file included many times.
    write(tmp_path / "many.bus", "events send --name example.never\n" * 1000)
    write(tmp_path / "lots.bus", "many.bus\n" * 101)
    with trio.fail_after(50):
        result = await run_cli("run", "lots.bus", env=env)
    assert result.status == 2 and "more than 100,000 lines to run" in result.stderr

    with trio.fail_after(50):
        zero = await run_cli("run", "/dev/zero", env=env)
    assert zero.status == 2 and "larger than 16 MiB" in zero.stderr
    assert await stored(provider, "example.never") == []
