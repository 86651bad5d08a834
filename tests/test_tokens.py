"""Token hygiene: a canary token never shows up anywhere a user or a log could see it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from busevents import EventsClient, Unauthorized

from .faults import response, serve_raw

CANARY = "eyJhbGciOiJIUzI1NiJ9.canary-token-payload.c4n4ry-s1gn4tur3"


def echo_authorization(status: str) -> object:
    """A hostile server that puts the Authorization header it got into its error body."""

    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        auth = next(
            (h for h in head.decode().split("\r\n") if h.lower().startswith("authorization:")),
            "none",
        )
        body = json.dumps({"error": "invalid_auth", "message": f"rejected {auth}"}).encode()
        await stream.send_all(response(status, body))

    return handler


def _files(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {CANARY}\n")
    token_file.chmod(0o600)
    cfg = tmp_path / "cfg" / "auth"
    cfg.mkdir(parents=True)
    (cfg / "api-token").write_text(CANARY)
    (cfg / "api-token").chmod(0o600)
    return {
        "--token-file": (["--token-file", str(token_file)], {}),
        "BUS_API_TOKEN": ([], {"BUS_API_TOKEN": CANARY}),
        "BUS_EVENTS_TOKEN_FILE": ([], {"BUS_EVENTS_TOKEN_FILE": str(token_file)}),
        "config root": ([], {"BUS_CONFIG_DIR": str(tmp_path / "cfg")}),
    }


@pytest.mark.parametrize(
    "path", ["--token-file", "BUS_API_TOKEN", "BUS_EVENTS_TOKEN_FILE", "config root"]
)
async def test_canary_never_printed_at_any_verbosity(run_cli, tmp_path: Path, path: str) -> None:
    flags, env = _files(tmp_path)[path]
    async with serve_raw(echo_authorization("401 Unauthorized")) as url:  # type: ignore[arg-type]
        for verbosity in ([], ["-v"], ["-vv"], ["-vvv"]):
            for command in (
                ["send", "--name", "x.y", "--payload", "{}"],
                ["listen", "--name", "x.y"],
            ):
                result = await run_cli(*verbosity, *flags, "--api-url", url, *command, env=env)
                assert result.status == 1, result.stderr
                assert "HTTP 401" in result.stderr and "<redacted>" in result.stderr
                assert CANARY not in result.stderr and CANARY.encode() not in result.stdout
                assert "canary-token-payload" not in result.stderr


async def test_canary_not_in_exceptions_or_reprs() -> None:
    async with serve_raw(echo_authorization("401 Unauthorized")) as url:  # type: ignore[arg-type]
        async with EventsClient(url, CANARY) as client:
            assert CANARY not in repr(client)
            with pytest.raises(Unauthorized) as info:
                await client.send("x.y", 1)
            with pytest.raises(Unauthorized) as stream_info:
                async with client.listen("x.y"):
                    pass
    for exc in (info.value, stream_info.value):
        assert "Bearer <redacted>" in str(exc)
        assert CANARY not in str(exc) and CANARY not in repr(exc) and CANARY not in exc.message


async def test_token_file_problems_through_the_cli(run_cli, provider, tmp_path: Path) -> None:
    env = {"BUS_EVENTS_API_URL": provider.url}
    empty = tmp_path / "empty"
    empty.write_text("\n")
    result = await run_cli("--token-file", str(empty), "send", "--name", "example.t", env=env)
    assert result.status == 2 and f"token file {empty} (--token-file) is empty" in result.stderr

    loose = tmp_path / "loose"
    loose.write_text(provider.token() + "\n")
    loose.chmod(0o644)
    result = await run_cli("--token-file", str(loose), "send", "--name", "example.t", env=env)
    assert result.status == 0
    assert "warning:" in result.stderr and "readable by group or others" in result.stderr
    assert "chmod 600" in result.stderr
