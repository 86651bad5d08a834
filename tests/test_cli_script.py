"""``bus-events run FILE.bus``: scripts of `events …` lines, checked before anything runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import trio

from busevents import EventsClient
from busevents.cli._script import logical_lines
from busevents.provider import RunningProvider

from .helpers import stored, wait_for


@pytest.fixture
def env(provider: RunningProvider) -> dict[str, str]:
    return {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token(subject="script")}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def test_a_script_runs_its_lines_in_order(run_cli, env, provider, tmp_path: Path) -> None:
    write(
        tmp_path / "ping.bus",
        """#!/usr/bin/env -S bus-events run
# publish two events, then read them back
events send --name example.script \\
    --payload '{"n": 1, "text": "a # not a comment; | not a pipe $HOME"}'
bus events send --name example.script --payload '{"n": 2}'   # trailing comment

--format text
events listen --name example.script --replay --no-follow
--no-format
events listen --name example.script --replay --no-follow --count 1
""",
    )
    result = await run_cli("run", "ping.bus", env=env)
    assert result.status == 0, result.stderr
    lines = result.out.splitlines()
    assert lines[0].startswith("accepted example.script ")
    assert lines[1].startswith("accepted example.script ")
    assert "example.script" in lines[2] and '"n":1' in lines[2] and not lines[2].startswith("{")
    assert '"n":2' in lines[3] and not lines[3].startswith("{")
    assert json.loads(lines[4])["payload"] == {
        "n": 1,
        "text": "a # not a comment; | not a pipe $HOME",
    }
    assert len(lines) == 5


async def test_an_error_on_the_last_line_stops_everything(
    run_cli, env, provider, tmp_path: Path
) -> None:
    write(
        tmp_path / "broken.bus",
        'events send --name example.never --payload 1\nevents send --name example.never --payload \'{"open": 1}\n',
    )
    result = await run_cli("run", "broken.bus", env=env)
    assert result.status == 65
    assert result.stderr == "bus-events: error: broken.bus:2: syntax error: unterminated quote\n"
    assert result.stdout == b""
    assert await stored(provider, "example.never") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("events send --name x.y --bogus 1\n", "broken.bus:2: unknown option '--bogus'"),
        (
            "events send --name x.y\nvm start --name a\n",
            "broken.bus:3: 'vm' is not this module (events)",
        ),
        ("bus vm start\n", "broken.bus:2: 'vm' is not this module"),
        (
            "--format yaml\nevents send --name x.y\n",
            'broken.bus:1: invalid value "yaml" for --format',
        ),
        ("--colour never\n", "unknown global flag '--colour'"),
        ("-o out.txt\n", "--output is not sticky"),
        ("events\n", "no command after the module name"),
        ("events run other.bus\n", "run cannot be used inside a script"),
    ],
)
async def test_preflight_errors_name_file_and_line(
    run_cli, env, provider, tmp_path: Path, text: str, message: str
) -> None:
    write(
        tmp_path / "broken.bus",
        "events send --name example.never\n" + text if "--format yaml" not in text else text,
    )
    result = await run_cli("run", "broken.bus", env=env)
    assert result.status == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert await stored(provider, "example.never") == []


async def test_includes_and_cycles(run_cli, env, provider, tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    write(tmp_path / "main.bus", "events send --name example.inc --payload 1\nlib/more.bus\n")
    write(tmp_path / "lib" / "more.bus", "events send --name example.inc --payload 2\n")
    result = await run_cli("run", "main.bus", env=env)
    assert result.status == 0, result.stderr
    assert [e["payload"] for e in await stored(provider, "example.inc")] == [1, 2]

    write(tmp_path / "a.bus", "events send --name example.cycle\nb.bus\n")
    write(tmp_path / "b.bus", "a.bus\n")
    result = await run_cli("run", "a.bus", env=env)
    assert result.status == 2 and "include cycle: a.bus → b.bus → a.bus" in result.stderr
    assert await stored(provider, "example.cycle") == []


async def test_first_failure_stops_the_run_with_its_status(
    run_cli, env, provider, tmp_path: Path
) -> None:
    write(
        tmp_path / "stop.bus",
        "events send --name example.stop --payload 1\nevents listen --name 'bad*name'\nevents send --name example.stop --payload 2\n",
    )
    result = await run_cli("run", "stop.bus", env=env)
    assert result.status == 1 and "HTTP 400" in result.stderr
    assert [e["payload"] for e in await stored(provider, "example.stop")] == [1]


async def test_sticky_chdir_quiet_and_outer_output(run_cli, env, provider, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "p.json", '{"from": "data dir"}')
    write(
        tmp_path / "sticky.bus",
        "--chdir data\nevents send --name example.sticky --payload @p.json\n--no-chdir\n"
        "--quiet\nevents send --name example.sticky --payload 2\n--no-quiet\n"
        "events send --name example.sticky --payload 3\n",
    )
    result = await run_cli("-o", "all.txt", "run", "sticky.bus", env=env)
    assert result.status == 0, result.stderr
    written = (tmp_path / "all.txt").read_text().splitlines()
    assert len(written) == 2 and all(x.startswith("accepted example.sticky") for x in written)
    assert [e["payload"] for e in await stored(provider, "example.sticky")] == [
        {"from": "data dir"},
        2,
        3,
    ]


async def test_shebang_makes_a_script_executable(cli_env, env, provider, tmp_path: Path) -> None:
    script = write(
        tmp_path / "hello.bus",
        "#!/usr/bin/env -S bus-events run\nevents send --name example.shebang\n",
    )
    script.chmod(0o755)
    path = f"{Path(sys.executable).parent}{os.pathsep}{cli_env.get('PATH', '')}"
    proc = await trio.run_process(
        [str(script)],
        env={**cli_env, **env, "PATH": path},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"accepted example.shebang ")


def test_logical_lines_join_continuations_and_keep_line_numbers() -> None:
    text = "a \\\n  b \\\n  c\nd \\\\\ne\n"
    assert logical_lines(text) == [(1, "a    b    c"), (4, "d \\\\"), (5, "e")]


async def test_a_lines_timeout_does_not_stick_to_the_next_line(
    run_cli, env, provider, tmp_path: Path
) -> None:
    """Only flags-only lines are sticky; a --timeout given on one command is that command's."""
    write(
        tmp_path / "timeouts.bus",
        "events --timeout 300ms send --name example.t --payload 1\n"
        "events listen --name example.t --replay --count 2\n",
    )

    async def second_event_later() -> None:
        await wait_for(lambda: provider.backend.subscriber_count("example.t") == 1)
        await trio.sleep(0.6)  # beyond line 1's 300 ms: a stuck deadline would end the listen
        async with EventsClient(provider.url, env["BUS_API_TOKEN"]) as client:
            await client.send("example.t", 2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second_event_later)
        started = trio.current_time()
        result = await run_cli("run", "timeouts.bus", env=env)
    # Had line 1's 300 ms deadline stuck to line 2, the listen would have ended
    # before the second event (exit 1).  It waited for it instead.
    assert result.status == 0, result.stderr
    assert trio.current_time() - started >= 0.6
    assert len(result.stdout.splitlines()) == 3  # the acceptance, then two events
