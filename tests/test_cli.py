"""The ``bus-events`` CLI as a subprocess: output, exit statuses, global flags."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio

from busevents import EventsClient, __version__
from busevents.provider import RunningProvider

from .helpers import stored as provider_history


@pytest.fixture
def env(provider: RunningProvider) -> dict[str, str]:
    return {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token(subject="cli")}


async def test_send_prints_the_acceptance(run_cli, env, provider) -> None:
    result = await run_cli("send", "--name", "example.ping", "--payload", '{"ok":true}', env=env)
    assert result.status == 0, result.stderr
    word, name, event_id = result.out.split()
    assert (word, name) == ("accepted", "example.ping")
    (stored,) = await provider_history(provider, "example.ping")
    assert stored["id"] == event_id and stored["payload"] == {"ok": True}

    result = await run_cli(
        "-f", "json", "send", "--name", "example.ping", "--correlation-id", "c-9", env=env
    )
    assert result.status == 0, result.stderr
    body = json.loads(result.out)
    assert (
        body["accepted"] is True
        and body["name"] == "example.ping"
        and body["correlationId"] == "c-9"
    )


async def test_listen_replay_no_follow_writes_ndjson_as_received(run_cli, env, provider) -> None:
    async with EventsClient(provider.url, env["BUS_API_TOKEN"]) as client:
        for i in range(3):
            await client.send("example.history", {"n": i}, correlation_id=f"c{i}")
    stored = await provider_history(provider, "example.history")
    result = await run_cli(
        "listen", "--name", "example.history", "--replay", "--no-follow", env=env
    )
    assert result.status == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [json.loads(line) for line in lines] == stored
    assert result.stderr == ""

    text = await run_cli(
        "-f", "text", "listen", "--name", "example.history", "--replay", "--no-follow", env=env
    )
    assert text.status == 0
    rows = text.out.splitlines()
    assert (
        len(rows) == 3 and "example.history" in rows[0] and "c0" in rows[0] and '{"n":0}' in rows[0]
    )


async def test_invalid_payload_exits_2_and_sends_nothing(run_cli, env, provider) -> None:
    result = await run_cli("send", "--name", "example.bad", "--payload", '{"ok": tru}', env=env)
    assert result.status == 2
    assert "--payload is not valid JSON" in result.stderr and result.stderr.count("\n") == 1
    assert result.stdout == b""
    assert await provider_history(provider, "example.bad") == []


@pytest.mark.parametrize(
    "args",
    [
        ["--token", "abc", "send", "--name", "x"],
        ["send", "--name", "x", "--token", "abc"],
        ["send", "--name"],
        ["listen", "--name", "x", "--delivery", "anycast"],
        ["-f", "yaml", "send", "--name", "x"],
        ["--color", "sometimes", "send", "--name", "x"],
        ["-q", "-v", "send", "--name", "x"],
        ["--timeout", "30", "send", "--name", "x"],
        ["frobnicate"],
    ],
)
async def test_usage_errors_exit_2_with_one_line(run_cli, env, args) -> None:
    result = await run_cli(*args, env=env)
    assert result.status == 2
    assert result.stderr.startswith("bus-events: error: ")
    assert result.stderr.count("\n") == 1
    assert result.stdout == b""
    assert "abc" not in result.stderr or "--token" not in args[:1]


async def test_missing_url_names_both_sources(run_cli) -> None:
    result = await run_cli("send", "--name", "x", env={"BUS_API_TOKEN": "t"})
    assert result.status == 2
    assert "--api-url" in result.stderr and "BUS_EVENTS_API_URL" in result.stderr


async def test_bad_request_exits_1(run_cli, env) -> None:
    result = await run_cli("listen", "--name", "example.*", env=env)
    assert result.status == 1
    assert "HTTP 400 bad_request" in result.stderr and "wildcard" in result.stderr


async def test_unauthorized_exits_1_without_the_token(run_cli, env) -> None:
    canary = "canary-not-a-jwt"
    result = await run_cli("-vv", "send", "--name", "x.y", env={**env, "BUS_API_TOKEN": canary})
    assert result.status == 1
    assert "HTTP 401 invalid_auth" in result.stderr
    assert canary not in result.stderr and canary.encode() not in result.stdout


async def test_forbidden_prints_the_scope_hint(run_cli, env, provider) -> None:
    token = provider.token(scopes="events:send events:listen")
    result = await run_cli(
        "send",
        "--name",
        "bus.vm.start.request",
        "--payload",
        "{}",
        env={**env, "BUS_API_TOKEN": token},
    )
    assert result.status == 1
    assert "HTTP 403 forbidden" in result.stderr
    assert 'bus auth token --scope "vm:write"' in result.stderr


async def test_a_reserved_name_gets_no_scope_hint(run_cli, env, provider) -> None:
    """No scope opens a reserved bus.* name, so the CLI suggests none."""
    token = provider.token(scopes="events:send events:listen vm:write")
    result = await run_cli(
        "send", "--name", "bus.nothing.here", "--payload", "{}", env={**env, "BUS_API_TOKEN": token}
    )
    assert result.status == 1
    assert "HTTP 403 forbidden" in result.stderr and "reserved" in result.stderr
    assert "hint" not in result.stderr and "bus auth token" not in result.stderr


async def test_help_and_version(run_cli) -> None:
    for flag in ("-V", "--version"):
        result = await run_cli(flag)
        assert (result.status, result.out) == (0, f"bus-events {__version__}\n")
    for flag in ("-h", "--help"):
        result = await run_cli(flag)
        assert (
            result.status == 0
            and "send" in result.out
            and "listen" in result.out
            and "--api-url" in result.out
        )
    result = await run_cli("listen", "--help")
    assert result.status == 0 and "--no-follow" in result.out and "--delivery" in result.out
    result = await run_cli("--token-file", "x", "send", "-h")
    assert result.status == 0 and "--correlation-id" in result.out


async def test_quiet_output_chdir_and_verbose(run_cli, env, provider, tmp_path: Path) -> None:
    quiet = await run_cli("-q", "send", "--name", "example.flags", env=env)
    assert quiet.status == 0 and quiet.stdout == b"" and quiet.stderr == ""

    (tmp_path / "work").mkdir()
    out = await run_cli(
        "-C",
        "work",
        "-o",
        "out.ndjson",
        "listen",
        "--name",
        "example.flags",
        "--replay",
        "--no-follow",
        env=env,
    )
    assert out.status == 0 and out.stdout == b""
    assert json.loads((tmp_path / "work" / "out.ndjson").read_text())["name"] == "example.flags"

    quiet_file = await run_cli("-q", "-o", "never.txt", "send", "--name", "example.flags", env=env)
    assert quiet_file.status == 0 and not (tmp_path / "never.txt").exists()

    missing = await run_cli("-C", "no-such-dir", "send", "--name", "example.flags", env=env)
    assert missing.status == 1 and "no-such-dir" in missing.stderr

    very = await run_cli("-vv", "send", "--name", "example.flags", env=env)
    verbose = await run_cli("-v", "send", "--name", "example.flags", env=env)
    plain = await run_cli("send", "--name", "example.flags", env=env)
    assert very.status == verbose.status == plain.status == 0
    assert very.out.split()[:2] == plain.out.split()[:2]  # -v never changes stdout
    # -vv shows the HTTP requests, -v does not (it says what happened), default: nothing.
    assert "HTTP Request: POST" in very.stderr and "HTTP Request" not in verbose.stderr
    assert plain.stderr == ""
    assert env["BUS_API_TOKEN"] not in very.stderr


async def test_color_only_on_stderr_and_only_when_asked(run_cli, env) -> None:
    bad = ["listen", "--name", "bad name"]
    always = await run_cli("--color", "always", *bad, env=env)
    assert always.status == 1 and "\x1b[" in always.stderr and b"\x1b[" not in always.stdout
    for flags, extra in [
        (["--no-color"], {}),
        (["--color", "never"], {}),
        (["--color", "auto"], {}),  # stderr is a pipe here, not a terminal
        (["--color", "auto"], {"NO_COLOR": "1"}),
    ]:
        plain = await run_cli(*flags, *bad, env={**env, **extra})
        assert plain.status == 1 and "\x1b[" not in plain.stderr, flags


async def test_api_url_and_token_file_flags(run_cli, provider, tmp_path: Path) -> None:
    token_file = tmp_path / "tok"
    token_file.write_text("  " + provider.token(subject="via-flag") + "\n")
    token_file.chmod(0o600)
    result = await run_cli(
        "--api-url",
        provider.origin,
        "--token-file",
        str(token_file),
        "send",
        "--name",
        "example.flagged",
    )
    assert result.status == 0, result.stderr
    (stored,) = await provider_history(provider, "example.flagged")
    assert stored["identity_id"] == "via-flag"


async def test_token_discovery_through_the_cli(run_cli, provider, tmp_path: Path) -> None:
    def token_file(name: str, subject: str) -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(provider.token(subject=subject))
        path.chmod(0o600)
        return str(path)

    base = {"BUS_EVENTS_API_URL": provider.url}
    cases = [
        (
            {
                "BUS_API_TOKEN": provider.token(subject="env"),
                "BUS_EVENTS_TOKEN_FILE": token_file("f1", "env-file"),
            },
            "env",
        ),
        ({"BUS_EVENTS_TOKEN_FILE": token_file("f2", "env-file")}, "env-file"),
        (
            {
                "BUS_CONFIG_DIR": str(
                    Path(token_file("cfg/auth/api-token", "config-dir")).parents[1]
                )
            },
            "config-dir",
        ),
        (
            {"XDG_CONFIG_HOME": str(Path(token_file("xdg/bus/auth/api-token", "xdg")).parents[2])},
            "xdg",
        ),
    ]
    for i, (extra, subject) in enumerate(cases):
        result = await run_cli("send", "--name", f"example.disc{i}", env={**base, **extra})
        assert result.status == 0, result.stderr
        (stored,) = await provider_history(provider, f"example.disc{i}")
        assert stored["identity_id"] == subject

    # A repository-local .bus/ token is never read, even in the working directory.
    repo = tmp_path / "repo"
    (repo / ".bus" / "auth").mkdir(parents=True)
    (repo / ".bus" / "auth" / "api-token").write_text(provider.token(subject="repo"))
    result = await run_cli("send", "--name", "example.repo", env=base, cwd=repo)
    assert result.status == 2 and "no bearer token" in result.stderr
    assert await provider_history(provider, "example.repo") == []


async def test_listen_timeout_is_an_overall_deadline(run_cli, env) -> None:
    result = await run_cli("--timeout", "500ms", "listen", "--name", "example.silent", env=env)
    assert result.status == 0 and result.stdout == b""


async def test_console_script_is_installed(cli_env) -> None:
    script = Path(sys.executable).with_name("bus-events")
    proc = await trio.run_process([str(script), "--version"], env=cli_env, capture_stdout=True)
    assert proc.stdout.decode() == f"bus-events {__version__}\n"


async def test_dev_token_write_is_private_atomic_and_never_follows_a_symlink(
    run_cli, tmp_path: Path
) -> None:
    root = tmp_path / "config"
    env = {"BUS_API_JWT_SECRET": "write-test-secret-" * 3, "BUS_CONFIG_DIR": str(root)}
    result = await run_cli("dev-token", "--write", env=env)
    assert result.status == 0, result.stderr
    path = root / "auth" / "api-token"
    first = path.read_text()
    assert first.count(".") == 2 and first.endswith("\n")  # a JWT, one line
    assert path.stat().st_mode & 0o777 == 0o600
    assert first.strip() not in result.stderr and result.stdout == b""
    # Written again: replaced whole, still private, no temporary file left behind.
    again = await run_cli("dev-token", "--write", "--subject", "other", env=env)
    assert again.status == 0 and path.read_text() != first
    assert sorted(p.name for p in path.parent.iterdir()) == ["api-token"]
    # A symlink there (someone else's file behind it) is refused and left alone.
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    victim.chmod(0o644)
    path.unlink()
    path.symlink_to(victim)
    refused = await run_cli("dev-token", "--write", env=env)
    assert refused.status == 1 and "symbolic link" in refused.stderr
    assert victim.read_text() == "keep me\n" and victim.stat().st_mode & 0o777 == 0o644
