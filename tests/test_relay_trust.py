"""The relay trusts evidence only, handles its files like a careful daemon and says
what it did: real ``serve`` processes, the relay CLI as a process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from .relaykit import FAST_RETRY, open_pair, route_args, start_cli, stop

pytestmark = pytest.mark.timeout(90)

ORIGIN = "bus.origin.environment.id"
ORIGIN_ID = "bus.origin.event.id"


@pytest.mark.parametrize("forged", ["99999999999999-0", "9" * 5000 + "-0"])
async def test_a_forged_origin_id_at_the_destination_stops_the_route_with_one_line(
    cli_env: dict[str, str], tmp_path: Path, run_cli, forged: str
) -> None:
    """A service-token holder at B publishes an event claiming to come from A, with an
    id A never had.  The relay does not move its cursor there: it stops before
    publishing, with one line, exit 1, and --status shows why.  Told to scan after the
    forged event, it then forwards every event of A once."""
    async with open_pair(cli_env, tmp_path) as (a, b):
        ids = await a.publish("t.f", 5)
        async with b.client() as client:
            bogus = await client.send(
                "t.f", {"forged": True}, metadata={ORIGIN: "a", ORIGIN_ID: forged}
            )
        state = tmp_path / "ab.json"
        args = [*route_args(a, b, state, "t.f"), "--once"]
        result = await run_cli(*args, env=FAST_RETRY)
        assert result.status == 1
        assert "Traceback" not in result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert (
            "the destination holds 1 event(s) claiming origin 'a' that the source never had"
            in result.stderr
        )
        assert f"destination id {bogus.id}" in result.stderr
        assert [e.id for e in await b.history("t.f")] == [bogus.id]
        shown = await run_cli("relay", "--state-file", str(state), "--status")
        assert "that the source never had" in shown.out.split("last error:")[1]
        # The way on that the error names: scan the destination after the forged event.
        saved = json.loads(state.read_text())
        saved["cursors"]["t.f"]["destination"] = bogus.id
        state.write_text(json.dumps(saved))
        result = await run_cli(*args, env=FAST_RETRY)
        assert result.status == 0, result.stderr
        forwarded = (await b.history("t.f"))[1:]
        assert [(e.metadata or {}).get(ORIGIN_ID) for e in forwarded] == ids


async def test_a_huge_cursor_in_the_state_file_is_one_clear_line(
    cli_env: dict[str, str], tmp_path: Path, run_cli
) -> None:
    async with open_pair(cli_env, tmp_path) as (a, b):
        await a.publish("t.h", 2)
        state = tmp_path / "ab.json"
        args = [*route_args(a, b, state, "t.h"), "--once"]
        assert (await run_cli(*args, env=FAST_RETRY)).status == 0
        saved = json.loads(state.read_text())
        saved["cursors"]["t.h"]["source"] = "1" * 5000 + "-0"
        state.write_text(json.dumps(saved))
        for command in (args, ["relay", "--state-file", str(state), "--status"]):
            result = await run_cli(*command, env=FAST_RETRY)
            assert result.status == 1
            assert "Traceback" not in result.stderr
            assert f"the relay state file {state} is corrupt" in result.stderr
            assert "not an event id" in result.stderr


@pytest.mark.parametrize("where", ["lock", "state"])
async def test_a_symlink_at_the_lock_or_state_file_is_refused_never_followed(
    cli_env: dict[str, str], tmp_path: Path, run_cli, where: str
) -> None:
    async with open_pair(cli_env, tmp_path) as (a, b):
        await a.publish("t.s", 2)
        state = tmp_path / "ab.json"
        victim = tmp_path / "victim.txt"
        victim.write_text("precious\n")
        link = state.with_name("ab.json.lock") if where == "lock" else state
        link.symlink_to(victim)
        result = await run_cli(*route_args(a, b, state, "t.s"), "--once", env=FAST_RETRY)
        assert result.status == 1
        assert f"{link} is a symbolic link; it is never followed" in result.stderr
        assert victim.read_text() == "precious\n"
        assert link.is_symlink()
        assert await b.history("t.s") == []
        # Nothing else was left in the folder (no temporary file).
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".ab.json")]


@pytest.mark.parametrize("where", ["lock", "state"])
async def test_a_fifo_state_or_lock_file_is_refused_at_once(
    cli_env: dict[str, str], tmp_path: Path, run_cli, where: str
) -> None:
    async with open_pair(cli_env, tmp_path) as (a, b):
        state = tmp_path / "ab.json"
        os.mkfifo(state.with_name("ab.json.lock") if where == "lock" else state)
        with trio.fail_after(10):
            result = await run_cli(*route_args(a, b, state, "t.p"), "--once", env=FAST_RETRY)
            shown = await run_cli("relay", "--state-file", str(state), "--status")
        assert result.status == 1
        assert "is not a regular file" in result.stderr
        if where == "state":
            assert shown.status == 1 and "is not a regular file" in shown.stderr
        # A service on it ends the same way, and a SIGTERM stops a running one in time.
        proc = await start_cli(cli_env, *route_args(a, b, state, "t.p"), "--loop", cwd=tmp_path)
        with trio.fail_after(10):
            assert await proc.wait() == 1
        running = await start_cli(
            cli_env, *route_args(a, b, tmp_path / "ok.json", "t.p"), "--loop", cwd=tmp_path
        )
        with trio.fail_after(20):
            while not (tmp_path / "ok.json").exists():  # noqa: ASYNC110 - a file
                await trio.sleep(0.05)
        with trio.fail_after(5):
            assert await stop(running) == 0


async def test_once_ends_with_a_summary_line_and_status_counts_add_up(
    cli_env: dict[str, str], tmp_path: Path, run_cli
) -> None:
    async with open_pair(cli_env, tmp_path) as (a, b):
        await a.publish("t.one", 3)
        async with a.client() as client:
            for n in range(2):  # arrived at A from elsewhere: skipped
                await client.send("t.one", n, metadata={ORIGIN: "lab", ORIGIN_ID: f"{n + 1}-0"})
        await a.publish("t.two", 1)
        state = tmp_path / "ab.json"
        args = [*route_args(a, b, state, "t.one", "t.two"), "--once"]
        first = await run_cli(*args, env=FAST_RETRY)
        assert first.status == 0, first.stderr
        last = first.stderr.splitlines()[-1]
        assert last.endswith(
            ": t.one forwarded 3 skipped 2 pending 0, t.two forwarded 1 skipped 0 pending 0"
        )
        assert last.startswith("bus-events: relay: ")
        assert len(first.stderr.splitlines()) == 1
        await a.publish("t.two", 2)
        again = await run_cli("-f", "json", *args, env=FAST_RETRY)
        assert again.status == 0, again.stderr
        assert json.loads(again.stdout)["names"] == {
            "t.one": {"forwarded": 0, "skipped": 0, "pending": 0},
            "t.two": {"forwarded": 2, "skipped": 0, "pending": 0},
        }
        status = await run_cli("-f", "json", "relay", "--state-file", str(state), "--status")
        counters = json.loads(status.stdout)["counters"]
        assert counters == {"received": 8, "forwarded": 6, "skipped": 2, "pending": 0}


async def test_a_reply_to_a_relayed_request_is_not_marked_as_relayed(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """A request forwarded from A carries its id at A; the reply a worker at B publishes
    is another event and must not carry that id (an import would take it for the
    request and drop it as a duplicate); the other bus.origin.* keys travel with it."""
    from busevents import ClientPublisher, Event

    async with open_pair(cli_env, tmp_path) as (_a, b):
        metadata = {ORIGIN: "a", ORIGIN_ID: "5-0", "bus.origin.session.id": "s1"}
        async with b.client() as client:
            accepted = await client.send("t.req", {"q": 1}, metadata=metadata)
            (request,) = await b.history("t.req")
            assert isinstance(request, Event) and request.id == accepted.id
            await ClientPublisher(client).reply(request, "t.res", {"a": 1})
        (reply,) = await b.history("t.res")
        assert reply.metadata == {ORIGIN: "a", "bus.origin.session.id": "s1"}
        assert reply.correlation_id == accepted.id
