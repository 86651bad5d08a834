"""``relay --config`` (TOML routes), ``export`` and ``import``, with real providers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .relaykit import FAST_RETRY, open_pair

pytestmark = pytest.mark.timeout(60)

ORIGIN = "bus.origin.environment.id"
ORIGIN_ID = "bus.origin.event.id"


async def test_config_runs_every_route_and_shows_their_status(
    cli_env: dict[str, str], tmp_path: Path, run_cli
) -> None:
    async with open_pair(cli_env, tmp_path) as (a, b):
        from_a = await a.publish("c.x", 4)
        from_b = await b.publish("c.x", 3)
        config = tmp_path / "routes.toml"
        config.write_text(
            f"""
[[route]]
id = "a-to-b"
from_url = "{a.url}"
to_url = "{b.url}"
names = ["c.x"]
environment_id = "a"
state_file = "state/a-to-b.json"
from_token_file = "a.token"
to_token_file = "b.token"

[[route]]
id = "b-to-a"
from_url = "{b.url}"
to_url = "{a.url}"
names = ["c.x"]
environment_id = "b"
state_file = "state/b-to-a.json"
from_token_file = "b.token"
to_token_file = "a.token"
"""
        )
        (tmp_path / "state").mkdir()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        # Relative paths are the config file's, wherever the relay is started.
        result = await run_cli(
            "relay", "--config", str(config), "--once", env=FAST_RETRY, cwd=elsewhere
        )
        assert result.status == 0, result.stderr
        at_a, at_b = await a.history("c.x"), await b.history("c.x")
        assert [e.id for e in at_a[:4]] == from_a
        assert [(e.metadata or {}).get(ORIGIN_ID) for e in at_a[4:]] == from_b
        assert [(e.metadata or {}).get(ORIGIN_ID) for e in at_b[3:]] == from_a
        # A second pass of both routes: nothing echoes, nothing is sent twice.
        result = await run_cli("relay", "--config", str(config), "--once", env=FAST_RETRY)
        assert result.status == 0, result.stderr
        assert len(await a.history("c.x")) == 7 and len(await b.history("c.x")) == 7
        shown = await run_cli("-f", "json", "relay", "--config", str(config), "--status")
        assert shown.status == 0, shown.stderr
        documents = [json.loads(line) for line in shown.out.splitlines()]
        assert [d["route"]["id"] for d in documents] == ["a-to-b", "b-to-a"]
        assert [d["counters"]["forwarded"] for d in documents] == [4, 3]
        assert [d["counters"]["skipped"] for d in documents] == [3, 4]
        text = await run_cli("relay", "--config", str(config), "--status")
        assert "a-to-b (a)" in text.out and "b-to-a (b)" in text.out
        for token in (a.token, b.token):
            assert token not in shown.out + text.out


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ('[[route]]\nid = "r"\nfrom_url = "http://127.0.0.1:1"\n', "route 1 (r): missing to_url"),
        (
            '[[route]]\nfrom_url = "http://127.0.0.1:1"\nto_url = "http://127.0.0.1:2"\n'
            'names = ["x"]\nenvironment_id = "a"\nstate_file = "s.json"\ntoken = "abc"\n',
            "tokens never go in the config file",
        ),
        ("[[route]\n", "invalid TOML"),
        ("", "no routes"),
        (
            '[[route]]\nfrom_url = "http://127.0.0.1:1"\nto_url = "http://127.0.0.1:2"\n'
            'names = []\nenvironment_id = "a"\nstate_file = "s.json"\n',
            "names must be a non-empty list",
        ),
    ],
)
async def test_a_bad_config_is_one_clear_line(
    tmp_path: Path, run_cli, body: str, words: str
) -> None:
    config = tmp_path / "routes.toml"
    config.write_text(body)
    result = await run_cli("relay", "--config", str(config), "--once")
    assert result.status == 2
    assert words in result.stderr
    assert str(config) in result.stderr
    assert "abc" not in result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--to-url", "http://127.0.0.1:2", "--name", "x", "--state-file", "s"], "exactly one of"),
        (["--once", "--to-url", "http://127.0.0.1:2"], "relay needs --name, --state-file"),
        (["--status"], "--status needs --state-file"),
        (
            ["--once", "--to-url", "http://127.0.0.1:2", "--name", "x", "--state-file", "s"],
            "relay needs --environment-id",
        ),
        (["--once", "--config", "c.toml", "--name", "x"], "drop --name"),
    ],
)
async def test_relay_usage_errors(run_cli, args: list[str], words: str) -> None:
    result = await run_cli("relay", *args)
    assert result.status == 2
    assert words in result.stderr


async def test_export_after_takes_only_a_bounded_event_id(run_cli) -> None:
    for after in ("9" * 5000 + "-0", "yesterday"):
        result = await run_cli(
            "--api-url", "http://127.0.0.1:9", "export", "--name", "x", "--after", after
        )
        assert result.status == 2
        assert "--after: not an event id" in result.stderr
        assert len(result.stderr) < 400


async def test_export_then_import_publishes_each_event_once(
    cli_env: dict[str, str], tmp_path: Path, run_cli
) -> None:
    async with open_pair(cli_env, tmp_path) as (a, b):
        ids = await a.publish("e.x", 5)
        other = await a.publish("e.y", 2)
        source = ["--api-url", a.url, "--token-file", str(a.token_file)]
        dest = ["--api-url", b.url, "--token-file", str(b.token_file)]
        exported = await run_cli(*source, "export", "--name", "e.x", "--name", "e.y")
        assert exported.status == 0, exported.stderr
        lines = exported.stdout.splitlines()
        assert [json.loads(x)["id"] for x in lines] == ids + other
        later = await run_cli(
            *source, "-o", "later.ndjson", "export", "--name", "e.x", "--after", ids[1]
        )
        assert later.status == 0, later.stderr
        tail = (tmp_path / "later.ndjson").read_bytes()
        assert tail == b"".join(x + b"\n" for x in lines[2:5])  # the bytes as listen wrote them
        (tmp_path / "all.ndjson").write_bytes(exported.stdout)
        first = await run_cli(*dest, "import", "--environment-id", "a", "all.ndjson")
        assert first.status == 0, first.stderr
        assert first.out == "published 7 duplicates 0 skipped 0 failed 0\n"
        again = await run_cli(*dest, "import", "--environment-id", "a", "-", stdin=exported.stdout)
        assert again.out == "published 0 duplicates 7 skipped 0 failed 0\n"
        events = await b.history("e.x")
        assert [(e.metadata or {}).get(ORIGIN_ID) for e in events] == ids
        assert {(e.metadata or {}).get(ORIGIN) for e in events} == {"a"}
        assert [e.payload_obj() for e in events] == [{"n": i} for i in range(5)]


async def test_import_publishes_a_foreign_origin_once_with_its_own_origin(
    cli_env: dict[str, str], tmp_path: Path, run_cli
) -> None:
    """An envelope that carries an origin keeps it (a restore brings it too); one
    without gets --environment-id and its own id."""
    async with open_pair(cli_env, tmp_path) as (_a, b):
        good = json.dumps({"id": "1-0", "name": "i.x", "payload": 1})
        foreign = json.dumps(
            {
                "id": "2-0",
                "name": "i.x",
                "payload": 2,
                "metadata": {ORIGIN: "lab", ORIGIN_ID: "9-9"},
            }
        )
        data = f"{good}\n\n{foreign}\n".encode()
        dest = ["--api-url", b.url, "--token-file", str(b.token_file)]
        result = await run_cli(*dest, "import", "--environment-id", "a", stdin=data)
        assert result.status == 0, result.stderr
        assert result.out == "published 2 duplicates 0 skipped 0 failed 0\n"
        first, second = await b.history("i.x")
        assert first.metadata == {ORIGIN: "a", ORIGIN_ID: "1-0"}
        assert second.metadata == {ORIGIN: "lab", ORIGIN_ID: "9-9"}
