"""A worker host's health server, metrics and JSON logs: real host and provider processes."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from busevents import (
    ConfigError,
    Event,
    EventsClient,
    Publisher,
    Readiness,
    RetryPolicy,
    Worker,
    WorkerHost,
    run_worker,
)
from busevents.provider import RunningProvider, mint_token
from busevents.workers._health import parse_health_addr
from busevents.workers._observe import RECONNECT_REASONS, log_context

SECRET = "worker-health-secret-0123456789abcdef012345"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FAST = RetryPolicy(min_delay=0.05, max_delay=0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@asynccontextmanager
async def provider_process(env: dict[str, str], port: int) -> AsyncIterator[trio.Process]:
    """``bus-events serve`` on ``port``, stopped (SIGINT, then killed) on exit."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "busevents", "serve", "--addr", f"127.0.0.1:{port}"],
        env={**env, "BUS_API_JWT_SECRET": SECRET},
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        with trio.move_on_after(5):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


class Output:
    """A process's stderr, collected as it comes."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.data = b""

    async def collect(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.data += chunk


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 20) -> None:
    """Poll ``check`` (another process's state has no event to wait on)."""
    with trio.fail_after(seconds):
        while not await check():  # noqa: ASYNC110
            await trio.sleep(0.05)


async def answers(
    http: httpx.AsyncClient, url: str, code: int | None, *, negate: bool = False
) -> bool:
    """Whether ``url`` answers ``code`` (``None``: no answer at all), or not with ``negate``."""
    try:
        got: int | None = (await http.get(url)).status_code
    except httpx.TransportError:
        got = None
    return (got == code) != negate


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, parsed by prometheus_client's own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def key(metric: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (metric, frozenset(labels.items()))


async def test_readyz_follows_the_provider_and_metrics_count_handled_events(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    api_port, health_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}/api/v1/events"
    health = f"http://127.0.0.1:{health_port}"
    token = mint_token(SECRET.encode(), subject="worker-health")
    token_file = tmp_path / "token"
    token_file.write_text(token)
    env = {
        **cli_env,
        "BUS_EVENTS_API_URL": api_url,
        "BUS_EVENTS_TOKEN_FILE": str(token_file),
        "BUS_EVENTS_HEALTH_ADDR": f"127.0.0.1:{health_port}",
        "BUS_EVENTS_LISTENER_REQUIRED": "1",
        "BUS_EVENTS_LISTENER_RETRY": "1",
        "BUS_EVENTS_LOG_FORMAT": "json",
    }
    sent = 7
    async with httpx.AsyncClient(timeout=5) as http, trio.open_nursery() as nursery:
        # The host first, the API not up yet: alive, not ready, naming the stream.
        host = await trio.lowlevel.open_process(
            [sys.executable, str(EXAMPLES / "echo_worker.py")],
            env=env,
            stderr=subprocess.PIPE,
        )
        out = Output(host)
        nursery.start_soon(out.collect)
        try:
            await until(lambda: answers(http, f"{health}/healthz", 200))
            early = await http.get(f"{health}/readyz")
            assert early.status_code == 503
            [stream] = early.json()["not_ready"]
            assert {"worker": "echo", "name": "example.echo"}.items() <= stream.items()
            assert stream["state"] in ("connecting", "backoff")
        except BaseException:
            host.kill()
            raise
        async with provider_process(cli_env, api_port):
            try:
                await until(lambda: answers(http, f"{health}/readyz", 200))
                assert (await http.get(f"{health}/healthz")).json() == {
                    "ok": True,
                    "service": "busevents-worker",
                }
                async with EventsClient(api_url, token) as client:
                    for i in range(sent):
                        await client.send("example.echo", {"n": i})

                async def scraped() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
                    response = await http.get(f"{health}/metrics")
                    assert response.status_code == 200
                    assert response.headers["content-type"].startswith("text/plain")
                    return samples(response.text)

                wn = {"worker": "echo", "name": "example.echo"}

                async def handled_all() -> bool:
                    handled = key("busevents_worker_events_handled_total", **wn)
                    return (await scraped()).get(handled) == sent

                await until(handled_all)
                metrics = await scraped()
                assert metrics[key("busevents_worker_events_received_total", **wn)] == sent
                assert metrics[key("busevents_worker_events_failed_total", **wn)] == 0
                assert metrics[key("busevents_worker_handler_duration_seconds_count", **wn)] == sent
                assert metrics[key("busevents_worker_stream_ready", **wn)] == 1
                assert metrics[key("busevents_worker_handlers_in_flight", worker="echo")] == 0
                assert (
                    metrics[key("busevents_worker_published_total", worker="echo", kind="reply")]
                    == sent
                )
                assert key("busevents_worker_token_refreshes_total") in metrics
            except BaseException:
                host.kill()
                raise
        # The provider is gone: not ready, naming the stream; still alive.
        try:
            await until(lambda: answers(http, f"{health}/readyz", 503))
            body = (await http.get(f"{health}/readyz")).json()
            [stream] = body.pop("not_ready")
            assert body == {"ok": False, "service": "busevents-worker", "error": "not_ready"}
            assert {"worker": "echo", "name": "example.echo"}.items() <= stream.items()
            assert stream["state"] in ("down", "connecting", "backoff")
            assert (await http.get(f"{health}/healthz")).status_code == 200
            async with provider_process(cli_env, api_port):
                await until(lambda: answers(http, f"{health}/readyz", 200), 30)
                metrics = samples((await http.get(f"{health}/metrics")).text)
                reconnects = {
                    dict(labels)["reason"]: value
                    for (name, labels), value in metrics.items()
                    if name == "busevents_worker_reconnects_total"
                }
                assert reconnects and sum(reconnects.values()) >= 1
                assert set(reconnects) <= set(RECONNECT_REASONS), reconnects
                host.send_signal(signal.SIGTERM)
                with trio.fail_after(15):
                    assert await host.wait() == 0
        finally:
            if host.returncode is None:
                host.kill()
    lines = out.data.decode().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    # The listener's own record (the host's "not ready: a stream is reconnecting" may
    # come first or after: two tasks, no order between them).
    reconnecting = [r for r in records if "reconnecting in" in r["message"]]
    assert reconnecting, lines
    assert reconnecting[0]["worker"] == "echo"
    assert reconnecting[0]["event_name"] == "example.echo"
    assert any(r["message"].startswith("health server on") for r in records)
    assert token not in out.data.decode()


async def test_a_bad_health_address_is_a_usage_error(cli_env: dict[str, str]) -> None:
    env = {
        **cli_env,
        "BUS_EVENTS_API_URL": "http://127.0.0.1:9/api/v1/events",
        "BUS_API_TOKEN": "x.y.z",
        "BUS_EVENTS_HEALTH_ADDR": "127.0.0.1",
    }
    done = await trio.run_process(
        [sys.executable, str(EXAMPLES / "echo_worker.py")],
        env=env,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 2
    assert "BUS_EVENTS_HEALTH_ADDR: '127.0.0.1' is not HOST:PORT" in done.stderr.decode()


async def test_without_the_health_extra_the_error_names_it(cli_env: dict[str, str]) -> None:
    env = {
        **cli_env,
        "BUS_EVENTS_API_URL": "http://127.0.0.1:9/api/v1/events",
        "BUS_API_TOKEN": "x.y.z",
        "BUS_EVENTS_HEALTH_ADDR": f"127.0.0.1:{free_port()}",
    }
    # prometheus_client made unimportable, as in an install without the extra.
    code = (
        "import sys; sys.modules['prometheus_client'] = None; sys.argv = ['echo_worker'];"
        f"import runpy; runpy.run_path({str(EXAMPLES / 'echo_worker.py')!r}, run_name='__main__')"
    )
    done = await trio.run_process(
        [sys.executable, "-c", code], env=env, capture_stderr=True, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'busevents[health]'" in done.stderr.decode()


async def test_failed_handlers_and_publish_errors_are_counted(
    provider: RunningProvider, http: httpx.AsyncClient
) -> None:
    gate = trio.Event()

    async def handle(event: Event, publisher: Publisher) -> None:
        match event.payload_obj():
            case "boom":
                raise RuntimeError("boom")
            case "huge":
                # Larger than the provider takes: 413, counted, then raised as a failure.
                await publisher.reply(event, "ops.reply", "x" * (2 * 1024 * 1024))
            case "wait":
                await gate.wait()
            case _:
                await publisher.send("ops.other", {"ok": True})

    host_client = EventsClient(provider.url, provider.token())
    async with host_client, EventsClient(provider.url, provider.token()) as sender:
        host = WorkerHost(
            host_client,
            [Worker("ops.job", handle, label="jobs", retry=FAST)],
            handle_signals=False,
            health_addr="127.0.0.1:0",
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            assert host.health_url is not None
            metrics_url = f"{host.health_url}/metrics"
            for payload in ("boom", "huge", "ok", "wait"):
                await sender.send("ops.job", payload)
            wn = {"worker": "jobs", "name": "ops.job"}

            async def settled() -> bool:
                got = samples((await http.get(metrics_url)).text)
                return (
                    got[key("busevents_worker_events_received_total", **wn)] == 4
                    and got[key("busevents_worker_handlers_in_flight", worker="jobs")] == 1
                    and got[key("busevents_worker_events_failed_total", **wn)] == 2
                )

            await until(settled)
            got = samples((await http.get(metrics_url)).text)
            assert got[key("busevents_worker_events_handled_total", **wn)] == 1
            assert (
                got[key("busevents_worker_publish_errors_total", worker="jobs", status="413")] == 1
            )
            assert got[key("busevents_worker_published_total", worker="jobs", kind="send")] == 1
            assert key("busevents_worker_published_total", worker="jobs", kind="reply") not in got
            gate.set()

            async def drained() -> bool:
                got = samples((await http.get(metrics_url)).text)
                return got[key("busevents_worker_handlers_in_flight", worker="jobs")] == 0

            await until(drained)
            got = samples((await http.get(metrics_url)).text)
            assert got[key("busevents_worker_events_handled_total", **wn)] == 2
            assert got[key("busevents_worker_handler_duration_seconds_count", **wn)] == 4
            nursery.cancel_scope.cancel()


async def test_json_logs_carry_the_event_of_a_handlers_own_records(
    provider: RunningProvider, cli_env: dict[str, str]
) -> None:
    script = (
        "import logging, sys\n"
        "from busevents import Worker, run_host\n"
        "async def handle(event, publisher):\n"
        "    logging.getLogger('app').info('working on it')\n"
        "    raise ValueError('no good')\n"
        "sys.exit(run_host(Worker('ops.logged', handle, label='logged'), log_format='json'))\n"
    )
    env = {**cli_env, "BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token()}
    host = await trio.lowlevel.open_process(
        [sys.executable, "-c", script], env=env, stderr=subprocess.PIPE
    )
    out = Output(host)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.collect)

            async def said(text: bytes) -> bool:
                return text in out.data

            await until(lambda: said(b"ready: logged"))
            async with EventsClient(provider.url, provider.token()) as client:
                accepted = await client.send("ops.logged", {"secret": "s3"}, correlation_id="c-1")
            await until(lambda: said(b"handler failed"))
            host.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                assert await host.wait() == 0
    finally:
        if host.returncode is None:
            host.kill()
    records = [json.loads(line) for line in out.data.decode().splitlines()]
    event = {
        "worker": "logged",
        "event_name": "ops.logged",
        "event_id": accepted.id,
        "correlation_id": "c-1",
    }
    own = next(r for r in records if r["logger"] == "app")
    assert own["message"] == "working on it" and event.items() <= own.items()
    failed = next(r for r in records if "handler failed" in r["message"])
    assert failed["level"] == "error" and event.items() <= failed.items()
    assert "ValueError: no good" in failed["exception"]
    assert "s3" not in out.data.decode()  # never the payload
    assert provider.token() not in out.data.decode()


hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True),
)


@given(host=hosts, port=st.integers(0, 65535), pad=st.sampled_from(["", " ", "\t"]))
def test_a_health_address_is_host_and_port(host: str, port: int, pad: str) -> None:
    assert parse_health_addr(f"{pad}{host}:{port}{pad}") == (host.strip("[]"), port)


@given(
    value=st.one_of(
        hosts,  # no port
        st.builds(lambda h, p: f"{h}:{p}", hosts, st.integers(65536, 10**9)),
        st.builds(lambda h, p: f"{h}:{p}", hosts, st.from_regex(r"[a-z-]{1,5}", fullmatch=True)),
        st.integers(0, 65535).map(lambda p: f":{p}"),
    )
)
def test_a_bad_health_address_is_named(value: str) -> None:
    with pytest.raises(ConfigError, match=re.escape("is not HOST:PORT; use e.g. 127.0.0.1:9464")):
        parse_health_addr(value, "BUS_EVENTS_HEALTH_ADDR")


async def test_a_worker_run_in_the_callers_task_leaves_its_log_context_alone(
    provider: RunningProvider,
) -> None:
    async def ignore(event: Event, publisher: Publisher) -> None:
        pass

    readiness = Readiness()
    async with EventsClient(provider.url, provider.token()) as client:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as scope:

                async def stop_when_ready() -> None:
                    await readiness.wait()
                    scope.cancel()

                nursery.start_soon(stop_when_ready)
                await run_worker(client, Worker("ops.ctx", ignore, retry=FAST), readiness=readiness)
    assert log_context.get() == {}
