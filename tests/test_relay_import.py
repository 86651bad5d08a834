"""``import`` as a restore, against real ``serve`` processes: every event once, whatever
its origin, and every problem found before the first publish."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from busevents.provider import API_AUDIENCE

from .relaykit import FAST_RETRY, Side, open_side, route_args, write_token

pytestmark = pytest.mark.timeout(90)

ORIGIN = "bus.origin.environment.id"
ORIGIN_ID = "bus.origin.event.id"


def _origin_keys(events: list) -> list[tuple[str | None, str | None]]:
    return [((e.metadata or {}).get(ORIGIN), (e.metadata or {}).get(ORIGIN_ID)) for e in events]


def _dest(side: Side, token_file: Path | None = None) -> list[str]:
    return ["--api-url", side.url, "--token-file", str(token_file or side.token_file)]


async def test_a_backup_of_a_restores_b_s_events_into_c_each_once(
    cli_env: dict[str, str], tmp_path: Path, run_cli
) -> None:
    """A holds its own events, events that came from B (a route B->A) and events that
    came from C (a route C->A).  Its export, imported into C, brings A's and B's events
    (all of them, once, with their origin), leaves out C's own (skipped), keeps each
    envelope's identity; a second import publishes nothing."""
    async with AsyncExitStack() as stack:
        a, b, c = [await stack.enter_async_context(open_side(x, cli_env, tmp_path)) for x in "abc"]
        async with a.client() as client:
            own = [
                (await client.send("h.x", {"a": n}, identity_id=f"user-{n}")).id for n in range(6)
            ]
        from_b = await b.publish("h.x", 10)
        from_c = await c.publish("h.x", 3)
        for side, label in ((b, "b"), (c, "c")):
            routed = await run_cli(
                *route_args(side, a, tmp_path / f"{label}a.json", "h.x"), "--once", env=FAST_RETRY
            )
            assert routed.status == 0, routed.stderr
        exported = await run_cli(*_dest(a), "-o", "a.ndjson", "export", "--name", "h.x")
        assert exported.status == 0, exported.stderr
        assert len((tmp_path / "a.ndjson").read_bytes().splitlines()) == 19

        first = await run_cli(*_dest(c), "import", "--environment-id", "a", "a.ndjson")
        assert first.status == 0, first.stderr
        assert first.out == "published 16 duplicates 0 skipped 3 failed 0\n"
        at_c = await c.history("h.x")
        keys = _origin_keys(at_c)
        assert not [k for k, n in Counter(keys[3:]).items() if n > 1]
        assert keys[:3] == [(None, None)] * 3  # C's own, not imported back
        assert sorted(keys[3:]) == sorted([("a", i) for i in own] + [("b", i) for i in from_b])
        assert [e.id for e in at_c[:3]] == from_c
        restored = {(e.metadata or {}).get(ORIGIN_ID): e for e in at_c[3:]}
        # The provider honours an envelope's identity_id from a service token: the
        # restored event is attributed to the identity it had at A.
        assert [restored[i].identity_id for i in own] == [f"user-{n}" for n in range(6)]

        again = await run_cli(*_dest(c), "import", "--environment-id", "a", "a.ndjson")
        assert again.status == 0, again.stderr
        assert again.out == "published 0 duplicates 16 skipped 3 failed 0\n"
        assert len(await c.history("h.x")) == 19


async def test_nothing_is_published_when_a_check_fails(
    cli_env: dict[str, str], tmp_path: Path, run_cli
) -> None:
    """A missing --environment-id, an end user's token, and bad lines: each is one
    message and a non-zero exit, with nothing in the destination's history."""
    async with open_side("b", cli_env, tmp_path) as b:
        good = [json.dumps({"id": f"{n}-0", "name": "k.x", "payload": n}) for n in range(1, 250)]
        (tmp_path / "good.ndjson").write_text("\n".join(good) + "\n")

        missing = await run_cli(*_dest(b), "import", "good.ndjson")
        assert missing.status == 2
        assert "import needs --environment-id" in missing.stderr
        assert missing.stderr.count("\n") == 1

        user = write_token(tmp_path / "user.token", b.mint(audience=API_AUDIENCE))
        refused = await run_cli(*_dest(b, user), "import", "--environment-id", "a", "good.ndjson")
        assert refused.status == 1
        assert f"{user} is an end user's" in refused.stderr
        assert "nothing was published" in refused.stderr
        assert refused.stderr.count("\n") == 1

        bad = [*good[:100], "not json", json.dumps({"name": "k.x"})]
        bad += [json.dumps({"id": "9" * 5000 + "-0", "name": "k.x"})]
        bad += ['{"id":"1-0","name":"k.x","payload":' + "[" * 5000 + "]" * 5000 + "}"]
        bad += [
            json.dumps({"id": f"{n}-1", "name": "k.x", "metadata": {ORIGIN: "z", ORIGIN_ID: "x"}})
            for n in range(8)
        ]
        (tmp_path / "bad.ndjson").write_text("\n".join([*bad, *good[100:]]) + "\n")
        lines = await run_cli(*_dest(b), "import", "--environment-id", "a", "bad.ndjson")
        assert lines.status == 1
        assert "Traceback" not in lines.stderr
        assert (
            "12 line(s) cannot be imported (the first 5 above, 7 more); nothing was published"
        ) in lines.stderr
        assert "line 101: not an event envelope" in lines.stderr
        assert "line 102: not an event envelope" in lines.stderr  # no id
        assert "line 103: not an event id: '99999" in lines.stderr
        assert "line 104: not an event envelope" in lines.stderr  # 5,000 deep
        assert f"line 105: {ORIGIN_ID}: not an event id: 'x'" in lines.stderr
        assert "line 106" not in lines.stderr
        assert len(lines.stderr.splitlines()) == 6

        with trio.fail_after(60):
            zero = await run_cli(*_dest(b), "import", "--environment-id", "a", "/dev/zero")
        assert zero.status == 1
        assert "line 1: longer than 16 MiB" in zero.stderr
        assert "Traceback" not in zero.stderr

        assert await b.history("k.x") == []
        ok = await run_cli(*_dest(b), "import", "--environment-id", "a", "good.ndjson")
        assert ok.status == 0, ok.stderr
        assert ok.out == "published 249 duplicates 0 skipped 0 failed 0\n"


async def test_two_imports_of_one_file_at_once_store_each_event_once(
    cli_env: dict[str, str], tmp_path: Path, run_cli
) -> None:
    """Both imports scan the destination before either publishes, so neither sees the
    other's events: only the Idempotency-Key each copy carries (one per origin event)
    keeps the destination from storing them twice."""
    async with AsyncExitStack() as stack:
        a, c = [await stack.enter_async_context(open_side(x, cli_env, tmp_path)) for x in "ac"]
        sent = await a.publish("h.race", 40)
        exported = await run_cli(*_dest(a), "-o", "a.ndjson", "export", "--name", "h.race")
        assert exported.status == 0, exported.stderr
        results = []

        async def one() -> None:
            results.append(await run_cli(*_dest(c), "import", "--environment-id", "a", "a.ndjson"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
        assert [r.status for r in results] == [0, 0], [r.stderr for r in results]
        keys = _origin_keys(await c.history("h.race"))
        assert sorted(keys) == sorted(("a", i) for i in sent)  # each once, none lost
