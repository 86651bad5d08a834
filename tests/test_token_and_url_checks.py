"""Tokens that cannot be bearer tokens, URLs that hold credentials (issue 16, items 8
and 12), and SDK messages in the SDK's words while the CLI keeps its own (issue 13)."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import trio

from busevents import (
    BusEventsError,
    ConfigError,
    EventsClient,
    Timeout,
    TokenError,
    find_token,
    resolve_url,
)

from .faults import response, serve_raw

SECRET = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBhcnQ.DO-NOT-PRINT"
BAD_TOKENS = {
    "newline": SECRET + "\nsecond-line-DO-NOT-PRINT",
    "carriage return": SECRET + "\rDO-NOT-PRINT",
    "tab": SECRET + "\tDO-NOT-PRINT",
    "control": SECRET + "\x7fDO-NOT-PRINT",
    "non-ascii": SECRET + "-tökén-DO-NOT-PRINT",
    "non-latin": SECRET + "-токен-DO-NOT-PRINT",
}
KINDS = {
    "newline": "a line break",
    "carriage return": "a line break",
    "tab": "whitespace",
    "control": "a control character",
    "non-ascii": "a non-ASCII character",
    "non-latin": "a non-ASCII character",
}


def everything_shown(exc: BaseException) -> str:
    """What a traceback, a log line or a debugger shows of ``exc`` and its chain."""
    seen: list[str] = ["".join(traceback.format_exception(exc))]
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None:
            continue
        seen += [str(item), repr(item), repr(item.args)]
        todo += [item.__cause__, item.__context__]
        todo += list(getattr(item, "exceptions", ()))
    return "\n".join(seen)


def assert_no_token(exc: BaseException) -> None:
    shown = everything_shown(exc)
    assert "DO-NOT-PRINT" not in shown and "c2VjcmV0LXBhcnQ" not in shown


async def _accepting(stream: trio.SocketStream, head: bytes) -> None:
    await stream.send_all(response("202 Accepted", b'{"accepted":true,"id":"1","name":"a.b"}'))


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_a_token_argument_that_is_not_printable_ascii_is_refused(kind: str) -> None:
    async with serve_raw(_accepting) as url:
        with pytest.raises(TokenError) as info:
            async with EventsClient(url, BAD_TOKENS[kind]) as client:
                await client.send("a.b", 1)
    assert str(info.value).startswith(f"the token from the token argument contains {KINDS[kind]}")
    assert_no_token(info.value)


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
def test_a_token_from_the_environment_or_a_file_names_its_source(kind: str, tmp_path: Path) -> None:
    with pytest.raises(TokenError, match=f"from BUS_API_TOKEN contains {KINDS[kind]}") as info:
        find_token(None, {"BUS_API_TOKEN": BAD_TOKENS[kind]})
    assert_no_token(info.value)
    if kind in ("control", "non-ascii", "non-latin"):  # whitespace is "more than one word"
        path = tmp_path / "token"
        path.write_text(BAD_TOKENS[kind] + "\n", encoding="utf-8")
        path.chmod(0o600)
        with pytest.raises(TokenError, match=f"token_file= {path} contains") as info:
            find_token(path, {})
        assert_no_token(info.value)
        with pytest.raises(TokenError, match=f"BUS_EVENTS_TOKEN_FILE {path} contains") as info:
            find_token(None, {"BUS_EVENTS_TOKEN_FILE": str(path)})
        assert_no_token(info.value)


async def test_sdk_failures_never_carry_a_valid_token(unused_url: str) -> None:
    """A good token: no failure of a send or a listen carries it, down the whole chain."""
    token = SECRET
    errors: list[BusEventsError] = []
    async with EventsClient(unused_url, token, timeout=5) as client:
        for attempt in (client.send("a.b", 1), client.listen("a.b").__aenter__()):
            try:
                await attempt
            except BusEventsError as exc:
                errors.append(exc)
    assert len(errors) == 2
    for exc in errors:
        assert "c2VjcmV0LXBhcnQ" not in everything_shown(exc)


async def test_cli_refuses_a_token_with_a_newline_without_printing_it(run_cli) -> None:
    async with serve_raw(_accepting) as url:
        result = await run_cli(
            "-vv",
            "--api-url",
            url,
            "send",
            "--name",
            "a.b",
            env={"BUS_API_TOKEN": BAD_TOKENS["newline"]},
        )
    assert result.status == 2, result.stderr
    assert "the token from BUS_API_TOKEN contains a line break" in result.stderr
    assert "DO-NOT-PRINT" not in result.stderr + result.out and "Traceback" not in result.stderr


async def test_cli_refuses_a_non_ascii_token_without_a_traceback(run_cli) -> None:
    async with serve_raw(_accepting) as url:
        result = await run_cli(
            "--api-url",
            url,
            "send",
            "--name",
            "a.b",
            env={"BUS_API_TOKEN": BAD_TOKENS["non-ascii"]},
        )
    assert result.status == 2
    assert "contains a non-ASCII character" in result.stderr
    assert "DO-NOT-PRINT" not in result.stderr and "Traceback" not in result.stderr


# -- credentials in the URL (issue 16, item 12) --------------------------------

CREDENTIAL_URLS = [
    "http://operator:hunter2-DO-NOT-PRINT@127.0.0.1:{port}/api/v1/events",
    "http://hunter2-DO-NOT-PRINT@127.0.0.1:{port}",
    "http://a:b@c:hunter2-DO-NOT-PRINT@127.0.0.1:{port}/api",
    "ftp://operator:hunter2-DO-NOT-PRINT@127.0.0.1:{port}/",
    "operator:hunter2-DO-NOT-PRINT@127.0.0.1:{port}",
]


@pytest.mark.parametrize("template", CREDENTIAL_URLS)
async def test_a_url_with_credentials_is_refused_without_showing_them(template: str) -> None:
    requests: list[bytes] = []

    async def recording(stream: trio.SocketStream, head: bytes) -> None:
        requests.append(head)
        await _accepting(stream, head)

    async with serve_raw(recording) as base:
        url = template.format(port=base.rsplit(":", 1)[1])
        with pytest.raises(ConfigError) as info:
            async with EventsClient(url, SECRET) as client:
                await client.send("a.b", 1)
        with pytest.raises(ConfigError):
            resolve_url(None, {"BUS_EVENTS_API_URL": url})
    assert "hunter2" not in everything_shown(info.value)
    assert requests == []  # nothing was sent, with Basic auth or otherwise


@pytest.mark.parametrize("where", ["flag", "env"])
async def test_cli_refuses_credentials_in_the_url_as_a_usage_error(run_cli, where: str) -> None:
    url = "http://operator:hunter2-DO-NOT-PRINT@127.0.0.1:9/api/v1/events"
    args = ["-vv", *(["--api-url", url] if where == "flag" else []), "send", "--name", "a.b"]
    env = {"BUS_API_TOKEN": SECRET, **({"BUS_EVENTS_API_URL": url} if where == "env" else {})}
    result = await run_cli(*args, env=env)
    assert result.status == 2
    assert "holds credentials (user:password@): remove them" in result.stderr
    assert "hunter2" not in result.stderr + result.out


# -- SDK messages name SDK arguments; the CLI keeps its words (issue 13) --------


def test_sdk_messages_name_sdk_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no Events API URL: pass api_url= or set") as url:
        EventsClient.from_env(env={"BUS_API_TOKEN": SECRET})
    with pytest.raises(TokenError, match=r"pass token_file= or set BUS_API_TOKEN") as token:
        EventsClient.from_env(api_url="http://127.0.0.1:9", env={"HOME": str(tmp_path)})
    for exc in (url.value, token.value):
        assert "--api-url" not in str(exc) and "--token-file" not in str(exc)
    assert "bus auth token" in str(token.value) and "dev-token --write" in str(token.value)


async def test_sdk_timeout_names_the_timeout_argument() -> None:
    async def stall(stream: trio.SocketStream, head: bytes) -> None:
        await trio.sleep_forever()

    async with serve_raw(stall) as url, EventsClient(url, SECRET, timeout=0.2) as client:
        with pytest.raises(Timeout, match=r"within 200ms \(the timeout= limit\)"):
            await client.send("a.b", 1)


async def test_cli_keeps_its_option_names(run_cli, tmp_path: Path) -> None:
    no_url = await run_cli("send", "--name", "a.b", env={"BUS_API_TOKEN": SECRET})
    assert no_url.status == 2
    assert "no Events API URL: pass --api-url or set BUS_EVENTS_API_URL" in no_url.stderr
    no_token = await run_cli("--api-url", "http://127.0.0.1:9", "send", "--name", "a.b")
    assert no_token.status == 2
    assert "no bearer token: use --token-file PATH or set BUS_API_TOKEN" in no_token.stderr
    missing = tmp_path / "missing"
    bad_file = await run_cli(
        "--api-url", "http://127.0.0.1:9", "--token-file", str(missing), "send", "--name", "a.b"
    )
    assert f"token file {missing} (--token-file) does not exist" in bad_file.stderr
