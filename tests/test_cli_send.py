"""``bus-events send``: payload sources, metadata, and batches from NDJSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from busevents import EventsClient
from busevents.provider import RunningProvider, open_provider

from .helpers import stored


@pytest.fixture
def env(provider: RunningProvider) -> dict[str, str]:
    return {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token(subject="sender")}


async def test_payload_from_file_stdin_and_payload_file(
    run_cli, env, provider, tmp_path: Path
) -> None:
    (tmp_path / "p.json").write_text('{\n  "from": "file"\n}\n')
    assert (
        await run_cli("send", "--name", "example.src", "--payload", "@p.json", env=env)
    ).status == 0
    assert (
        await run_cli(
            "send", "--name", "example.src", "--payload", "-", env=env, stdin=b'{"from":"stdin"}'
        )
    ).status == 0
    assert (
        await run_cli("send", "--name", "example.src", "--payload-file", "p.json", env=env)
    ).status == 0
    payloads = [e["payload"] for e in await stored(provider, "example.src")]
    assert payloads == [{"from": "file"}, {"from": "stdin"}, {"from": "file"}]


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["--payload", "@missing.json"], b"", "--payload: cannot read missing.json"),
        (["--payload", "-"], b"{oops", "--payload (stdin) is not valid JSON"),
        (["--payload-file", "bad.json"], b"", "--payload-file (bad.json) is not valid JSON"),
        (["--payload", "1", "--payload-file", "bad.json"], b"", "not both"),
        (["--metadata", "novalue"], b"", "expected KEY=VALUE"),
        # A payload the provider would refuse as too deep (it bounds the body at 512
        # levels; the payload is one inside): refused here, before anything is sent.
        (["--payload", "[" * 600 + "]" * 600], b"", "--payload nests deeper than 511 levels"),
        (["--payload", "@deep.json"], b"", "--payload (deep.json) nests deeper than 511"),
        (["--payload", "-"], b"[" * 5000, "--payload (stdin) nests deeper than 511"),
        # Bytes from the shell that are not UTF-8 (a traceback before).
        (["--payload", os.fsdecode(b'{"a":"\xff"}')], b"", "--payload is not UTF-8 text"),
    ],
)
async def test_bad_payload_sources_send_nothing(
    run_cli, env, provider, tmp_path: Path, args, stdin, message
) -> None:
    (tmp_path / "bad.json").write_text("{'single': 'quotes'}")
    (tmp_path / "deep.json").write_text('{"a":' * 600 + "1" + "}" * 600)
    result = await run_cli("send", "--name", "example.bad", *args, env=env, stdin=stdin)
    assert result.status == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert await stored(provider, "example.bad") == []


async def test_a_payload_at_the_nesting_bound_is_sent(run_cli, env, provider) -> None:
    """511 levels inside the 512 the provider allows for the whole body: accepted."""
    payload = "[" * 511 + "]" * 511
    result = await run_cli("send", "--name", "example.deep", "--payload", payload, env=env)
    assert result.status == 0, result.stderr
    [event] = await stored(provider, "example.deep")
    assert json.dumps(event["payload"], separators=(",", ":")) == payload


async def test_metadata_is_repeatable(run_cli, env, provider) -> None:
    result = await run_cli(
        "send",
        "--name",
        "example.meta",
        "--metadata",
        "team=ops",
        "--metadata",
        "ticket=A-1=2",
        env=env,
    )
    assert result.status == 0, result.stderr
    (event,) = await stored(provider, "example.meta")
    assert event["metadata"] == {"team": "ops", "ticket": "A-1=2"}


async def test_ndjson_batch_reports_bad_lines_and_sends_the_rest(run_cli, env, provider) -> None:
    lines = [
        b'{"name":"example.batch","payload":{"n":1},"correlationId":"a"}',
        b"",
        b"{broken",
        b'{"payload":{"n":3}}',
        b'{"name":"example.batch","payload":{"n":4}}',
        b'{"name":"example.*","payload":5}',
    ]
    result = await run_cli(
        "send", "--ndjson", "-", "--concurrency", "1", env=env, stdin=b"\n".join(lines) + b"\n"
    )
    assert result.status == 1
    assert result.out == "accepted 2 failed 3\n"
    errors = result.stderr.splitlines()
    assert any(x.startswith("bus-events: error: line 3: not an event envelope") for x in errors)
    assert any("line 4: no name" in x for x in errors)
    assert any("line 6: HTTP 400" in x for x in errors)
    events = await stored(provider, "example.batch")
    assert [e["payload"] for e in events] == [{"n": 1}, {"n": 4}]
    assert events[0]["correlationId"] == "a"

    with_default = await run_cli(
        "-f",
        "json",
        "send",
        "--ndjson",
        "-",
        "--name",
        "example.batch",
        env=env,
        stdin=b'{"payload":{"n":3}}\n',
    )
    assert with_default.status == 0 and json.loads(with_default.out) == {"accepted": 1, "failed": 0}


async def test_ndjson_fail_fast_stops_at_the_first_failure(run_cli, env, provider) -> None:
    lines = [b"{broken"] + [b'{"name":"example.ff","payload":%d}' % i for i in range(50)]
    result = await run_cli(
        "send",
        "--ndjson",
        "-",
        "--fail-fast",
        "--concurrency",
        "1",
        env=env,
        stdin=b"\n".join(lines),
    )
    assert result.status == 1 and "line 1:" in result.stderr
    assert await stored(provider, "example.ff") == []


async def test_history_copies_between_two_deployments(cli_env, provider) -> None:
    import sys

    import trio

    async with open_provider() as target:
        source_token = provider.token(subject="copier")
        async with EventsClient(provider.url, source_token) as client:
            for i in range(30):
                await client.send("example.copy", {"n": i}, correlation_id=f"c{i}")
        env = {
            **cli_env,
            "SRC": provider.url,
            "DST": target.url,
            "ST": source_token,
            "DT": target.token(subject="copier"),
        }
        pipe = (
            f"BUS_API_TOKEN=$ST {sys.executable} -m busevents --api-url $SRC listen --name example.copy --replay --no-follow"
            f" | BUS_API_TOKEN=$DT {sys.executable} -m busevents --api-url $DST send --ndjson - --concurrency 1"
        )
        proc = await trio.run_process(
            ["bash", "-o", "pipefail", "-c", pipe],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == b"accepted 30 failed 0\n"
        copied = await stored(target, "example.copy")
    original = await stored(provider, "example.copy")
    assert [(e["payload"], e["correlationId"]) for e in copied] == [
        (e["payload"], e["correlationId"]) for e in original
    ]
    assert all(e["identity_id"] == "copier" for e in copied)
