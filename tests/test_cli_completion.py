"""Shell completion: the generated script really completes commands and options."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio


async def test_bash_completion_completes_commands_and_options(run_cli, tmp_path: Path) -> None:
    result = await run_cli("completion", "--shell", "bash")
    assert result.status == 0, result.stderr
    script = tmp_path / "completion.bash"
    script.write_bytes(result.stdout)
    probe = (
        f"source {script}\n"
        'complete_words() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; '
        'COMP_POINT=${#COMP_LINE}; _bus_events; echo "${COMPREPLY[*]}"; }\n'
        "complete_words bus-events li\n"
        "complete_words bus-events listen --no-f\n"
        "complete_words bus-events listen --delivery ''\n"
        "complete_words bus-events --for\n"
    )
    proc = await trio.run_process(["bash", "-c", probe], capture_stdout=True, capture_stderr=True)
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == "listen"
    assert lines[1] == "--no-follow"
    assert set(lines[2].split()) == {"broadcast", "unicast"}
    assert "--format" in lines[3].split()


@pytest.mark.parametrize("shell", ["zsh", "fish"])
async def test_other_shells_get_a_script(run_cli, shell: str) -> None:
    result = await run_cli("completion", "--shell", shell)
    assert result.status == 0 and b"bus-events" in result.stdout and b"listen" in result.stdout


async def test_install_writes_where_the_shell_looks(run_cli, cli_env, tmp_path: Path) -> None:
    result = await run_cli("completion", "--shell", "bash", "--install")
    assert result.status == 0, result.stderr
    installed = Path(cli_env["HOME"]) / ".local/share/bash-completion/completions/bus-events"
    assert installed.exists() and "_bus_events" in installed.read_text()
    assert str(installed) in result.stderr


async def test_unknown_shell_is_a_usage_error(run_cli) -> None:
    result = await run_cli("completion", env={"SHELL": "/bin/tcsh"})
    assert result.status == 2 and "--shell" in result.stderr
    assert shutil.which("bash")
