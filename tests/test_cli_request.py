"""``bus-events request`` as a subprocess against a worker on the reference provider."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import trio

from busevents import Event, EventsClient, Publisher, RetryPolicy, Worker, run_worker
from busevents.provider import RunningProvider

REQUEST = ("--name", "example.echo", "--response-name", "example.echo.reply")


async def echo(event: Event, publisher: Publisher) -> None:
    payload = event.payload_obj()
    if payload == "fail":
        await publisher.reply_error(event, "example.echo.reply", "bad_request", "no thanks")
    else:
        await publisher.reply(event, "example.echo.reply", {"echo": payload})


@pytest.fixture
def env(provider: RunningProvider) -> dict[str, str]:
    return {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token(subject="cli")}


@pytest.fixture
async def echo_worker(provider: RunningProvider) -> AsyncIterator[None]:
    worker = Worker("example.echo", echo, retry=RetryPolicy(min_delay=0.05, max_delay=0.2))
    async with EventsClient(provider.url, provider.token(subject="cli")) as client:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_worker, client, worker)
            yield
            nursery.cancel_scope.cancel()


async def stored_lines(provider: RunningProvider, name: str) -> list[bytes]:
    """The envelope lines the provider holds for ``name``, as it sends them."""
    service = provider.token(audience="ai.hg.fi/internal")
    async with EventsClient(provider.url, service) as client:
        async with client.listen(name, replay=True, follow=False) as stream:
            return [
                line + b"\n"
                async for block in stream.raw_batches()
                for line in block.split(b"\n")
                if line
            ]


async def test_request_prints_the_response_as_received_and_exits_0(
    run_cli, env, provider, echo_worker
) -> None:
    result = await run_cli("-f", "json", "request", *REQUEST, "--payload", '{"n": 1}', env=env)
    assert result.status == 0, result.stderr
    assert result.stderr == ""
    envelope = json.loads(result.out)
    assert envelope["name"] == "example.echo.reply"
    assert envelope["payload"] == {"echo": {"n": 1}}
    assert len(envelope["correlationId"]) == 32  # a fresh uuid4 hex
    (stored,) = await stored_lines(provider, "example.echo.reply")
    assert result.stdout == stored  # the envelope exactly as received, one line
    (request,) = [json.loads(line) for line in await stored_lines(provider, "example.echo")]
    assert request["correlationId"] == envelope["correlationId"]

    text = await run_cli("request", *REQUEST, "--payload", '"hi"', env=env)  # text by default
    assert text.status == 0, text.stderr
    when, name, event_id, correlation_id, payload = text.out.split()  # as listen -f text
    assert (name, payload) == ("example.echo.reply", '{"echo":"hi"}')
    assert when.endswith("Z") and event_id and correlation_id != "-"


async def test_an_error_response_exits_1_and_still_prints_it(run_cli, env, echo_worker) -> None:
    result = await run_cli("request", *REQUEST, "--payload", '"fail"', "-f", "json", env=env)
    assert result.status == 1
    assert json.loads(result.out)["payload"] == {"error": "bad_request", "message": "no thanks"}
    assert "error response bad_request" in result.stderr and "no thanks" in result.stderr


async def test_no_response_in_time_exits_1(run_cli, env) -> None:
    started = trio.current_time()
    before = await run_cli("--timeout", "300ms", "request", *REQUEST, env=env)
    after = await run_cli("request", *REQUEST, "--timeout", "300ms", env=env)  # still global
    elapsed = trio.current_time() - started
    for result in (before, after):
        assert result.status == 1
        assert result.out == ""
        assert "no example.echo.reply response to example.echo within 0.3s" in result.stderr
    assert elapsed < 20


async def test_invalid_usage_exits_2_and_sends_nothing(run_cli, env, provider) -> None:
    bad_json = await run_cli("request", *REQUEST, "--payload", "{nope", env=env)
    assert bad_json.status == 2
    assert "--payload is not valid JSON" in bad_json.stderr
    missing = await run_cli("request", "--name", "example.echo", env=env)
    assert missing.status == 2
    same = await run_cli(
        "request", "--name", "example.same", "--response-name", "example.same", env=env
    )
    assert same.status == 2 and "its own response" in same.stderr
    assert await stored_lines(provider, "example.echo") == []
    assert await stored_lines(provider, "example.same") == []
