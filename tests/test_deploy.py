"""deploy/: the nginx and HAProxy configurations run for real in front of two
providers (and checked by haproxy -c), the Prometheus rules by promtool.

nginx runs as a child process in a private prefix on a loopback port, with TLS
from a trustme CA, the shipped deploy/nginx/nginx.conf with only its addresses,
paths and the reload grace substituted (each substitution must match exactly
once, so the shipped file cannot drift away from what is tested).  The two
providers share a Redis key prefix, as a deployment shares its backend.

Where nginx, haproxy or promtool is missing the test skips, unless
BUS_EVENTS_TEST_REQUIRE_PROXIES=1 (set by .ci/run, which installs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio
import trustme
import yaml
from prometheus_client.parser import text_string_to_metric_families

from busevents.provider import mint_token
from busevents.workers._metrics import WorkerMetrics

from .helpers import serve_subprocess
from .services import free_port, wait_port

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SECRET = "deploy-tests-secret-0123456789abcdef01234567"
REQUIRE_ENV = "BUS_EVENTS_TEST_REQUIRE_PROXIES"


def tool(name: str) -> str:
    """The path of ``name``, or skip (fail under .ci/run) when it is not installed."""
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/local/bin/{name}") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        message = f"{name} is not installed"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message} ({REQUIRE_ENV}=1: .ci/run installs it)")
        pytest.skip(message)
    return found


def substitute(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert text.count(old) == 1, f"deploy file changed: {old!r} is not there exactly once"
        text = text.replace(old, new)
    return text


# -- Prometheus rules ----------------------------------------------------------------


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "bus-events.rules.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def exported(exposition: str) -> set[str]:
    """Every series name an exposition can carry (counters as _total, histograms' parts)."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + part for part in ("_bucket", "_count", "_sum")}
        else:
            names.add(family.name)
    return names


async def test_the_rules_name_metrics_the_provider_and_worker_hosts_export(
    cli_env: dict[str, str],
) -> None:
    metrics_port = free_port()
    env = {**cli_env, "BUS_API_JWT_SECRET": SECRET}
    async with serve_subprocess(env, "--metrics-addr", f"127.0.0.1:{metrics_port}"):
        async with httpx.AsyncClient(timeout=10) as http:
            provider = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    worker = WorkerMetrics(client=object())
    worker.declare("echo", ("example.echo",))
    names = exported(provider) | exported(worker.exposition().decode())
    used = {name for expr in rule_exprs() for name in re.findall(r"\bbusevents_\w+", expr)}
    # Every alert family of the issue is there, on real names only.
    assert {
        "busevents_worker_stream_ready",
        "busevents_worker_events_failed_total",
        "busevents_provider_slow_consumer_disconnects_total",
        "busevents_provider_request_duration_seconds_count",
    } <= used
    assert used - names == set()
    assert any(re.search(r"\bup\{[^}]*\} == 0", e) for e in rule_exprs())
    assert any(e.startswith("absent(") for e in rule_exprs())


async def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    promtool = tool("promtool")
    folder = DEPLOY / "prometheus"
    for args in (
        ["check", "rules", "bus-events.rules.yml"],
        ["test", "rules", "bus-events.rules.test.yml"],
    ):
        done = await trio.run_process(
            [promtool, *args], cwd=folder, capture_stdout=True, capture_stderr=True, check=False
        )
        assert done.returncode == 0, (done.stdout + done.stderr).decode()
        assert b"SUCCESS" in done.stdout


# -- HAProxy ---------------------------------------------------------------------------


async def test_haproxy_accepts_the_configuration(tmp_path: Path) -> None:
    haproxy = tool("haproxy")
    ca = trustme.CA()
    pem = tmp_path / "bus-events.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    text = substitute(
        (DEPLOY / "haproxy" / "haproxy.cfg").read_text(),
        {"/etc/haproxy/certs/bus-events.pem": str(pem), "bind :443": "bind 127.0.0.1:8443"},
    )
    config = tmp_path / "haproxy.cfg"
    config.write_text(text)
    done = await trio.run_process(
        [haproxy, "-c", "-f", str(config)], capture_stdout=True, capture_stderr=True, check=False
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


# -- nginx in front of two providers ---------------------------------------------------


@dataclass
class Output:
    """What a CLI child process wrote so far (stdout lines, stderr text)."""

    proc: trio.Process
    stdout: bytes = b""
    stderr: bytes = b""
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    async def pump(self) -> None:
        async def read(which: str) -> None:
            stream = getattr(self.proc, which)
            while chunk := await stream.receive_some(65536):
                setattr(self, which, getattr(self, which) + chunk)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, "stdout")
                nursery.start_soon(read, "stderr")
            await self.proc.wait()
        finally:
            # A failing test cancels this: the process goes too, its pipes closed.
            with trio.CancelScope(shield=True):
                if self.proc.returncode is None:
                    self.proc.kill()
                await self.proc.wait()
                for pipe in (self.proc.stdout, self.proc.stderr):
                    if pipe is not None:
                        await pipe.aclose()
            self.done.set()

    async def until(self, what: str, condition: object, seconds: float = 30) -> None:
        with trio.fail_after(seconds):
            while not condition():  # type: ignore[operator]
                if self.done.is_set() and not condition():  # type: ignore[operator]
                    raise AssertionError(f"exited before {what}: {self.stderr.decode()}")
                await trio.sleep(0.02)


@dataclass
class Edge:
    """nginx on https://127.0.0.1:PORT in front of two providers on one Redis prefix."""

    url: str
    env: dict[str, str]
    nginx: list[str]
    providers: list[tuple[trio.Process, str]]  # (process, metrics origin)
    http: httpx.AsyncClient
    published: list[str] = field(default_factory=list)

    async def publish(self, name: str, count: int) -> None:
        for i in range(count):
            response = await self.http.post(
                self.url,
                json={"name": name, "payload": {"n": len(self.published) + i}},
                # A new connection each time: a reload closes nginx's idle ones, and
                # a POST on a connection closed under it is not safe to resend.
                headers={
                    "Authorization": f"Bearer {self.env['BUS_API_TOKEN']}",
                    "Connection": "close",
                },
            )
            assert response.status_code == 202, response.text
            self.published.append(response.json()["id"])

    async def holder(self) -> trio.Process:
        """The provider that holds the one open stream (from its own metrics)."""
        with trio.fail_after(10):
            while True:
                for proc, metrics in self.providers:
                    text = (await self.http.get(metrics + "/metrics")).text
                    if re.search(r'open_streams\{delivery="broadcast"\} 1\.0', text):
                        return proc
                await trio.sleep(0.05)

    async def listen(self, nursery: trio.Nursery, *args: str) -> Output:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "busevents", "listen", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        output = Output(proc)
        nursery.start_soon(output.pump)
        return output


def _nginx(
    tmp_path: Path, upstream: list[str], port: int, chain: Path, key: Path
) -> tuple[list[str], list[str], Path]:
    """deploy/nginx/nginx.conf made local: (command to run, command prefix for -s, log)."""
    nginx = tool("nginx")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    temp = "".join(
        f"    {kind}_temp_path {prefix / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = substitute(
        (DEPLOY / "nginx" / "nginx.conf").read_text(),
        {
            "user www-data;": "user root;" if os.geteuid() == 0 else "",
            # Old workers close their streams after 2 s (30 s shipped): the test waits less.
            "worker_shutdown_timeout 30s;": "worker_shutdown_timeout 2s;",
            "http {\n": "http {\n" + temp,
            "/var/log/nginx/bus-events.access.log": str(prefix / "access.log"),
            "server 127.0.0.1:8081 ": f"server {upstream[0]} ",
            "server 127.0.0.1:8082 ": f"server {upstream[1]} ",
            "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
            "/etc/ssl/bus-events/fullchain.pem": str(chain),
            "/etc/ssl/bus-events/privkey.pem": str(key),
        },
    )
    (prefix / "nginx.conf").write_text(config)
    log = prefix / "error.log"
    base = [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(log)]
    pid = f"pid {prefix / 'nginx.pid'};"
    # `-s reload` finds the running one by the pid file.
    return [*base, "-g", "daemon off; " + pid], [*base, "-g", pid], log


def _haproxy(
    tmp_path: Path, upstream: list[str], port: int, chain: Path, key: Path
) -> tuple[list[str], list[str], Path]:
    """deploy/haproxy/haproxy.cfg made local (no reload command: nginx's test covers it)."""
    haproxy = tool("haproxy")
    pem = tmp_path / "haproxy.pem"
    pem.write_text(chain.read_text() + key.read_text())
    config = substitute(
        (DEPLOY / "haproxy" / "haproxy.cfg").read_text(),
        {
            "/etc/haproxy/certs/bus-events.pem": str(pem),
            "bind :443": f"bind 127.0.0.1:{port}",
            "server provider1 127.0.0.1:8081": f"server provider1 {upstream[0]}",
            "server provider2 127.0.0.1:8082": f"server provider2 {upstream[1]}",
        },
    )
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    return [haproxy, "-db", "-f", str(path)], [], path


@pytest.fixture
async def edge(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    cli_env: dict[str, str],
    redis_addr: str,
    redis_prefix: str,
) -> AsyncIterator[Edge]:
    """nginx (or, parametrized, HAProxy) in front of two providers; the events base URL."""
    kind = getattr(request, "param", "nginx")
    tool(kind)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, chain, key = tmp_path / "ca.pem", tmp_path / "chain.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    env = {
        **cli_env,
        "BUS_API_JWT_SECRET": SECRET,
        "BUS_EVENTS_REDIS_ADDR": redis_addr,
        "BUS_EVENTS_REDIS_PREFIX": redis_prefix,
    }
    stop = trio.Event()

    async def provider(*, task_status: trio.TaskStatus[tuple[str, trio.Process, str]]) -> None:
        port = free_port()
        args = ("--events-backend", "redis", "--metrics-addr", f"127.0.0.1:{port}")
        async with serve_subprocess(env, *args) as (url, proc):
            task_status.started((url, proc, f"http://127.0.0.1:{port}"))
            await stop.wait()  # not a cancellation: the process is then stopped and waited for

    async with trio.open_nursery() as providing:
        # Both start at once (each takes seconds on a loaded machine).
        async with trio.open_nursery() as starting:
            providers: list[tuple[str, trio.Process, str]] = []

            async def start() -> None:
                providers.append(await providing.start(provider))

            starting.start_soon(start)
            starting.start_soon(start)
        upstream = [re.sub(r"^http://([^/]+)/.*", r"\1", url) for url, _, _ in providers]
        listen_port = free_port()
        local_config = _nginx if kind == "nginx" else _haproxy
        argv, command, log = local_config(tmp_path, upstream, listen_port, chain, key)
        # In the foreground, a child of the test.
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.DEVNULL)
        try:
            try:
                await wait_port(listen_port, 20)
            except trio.TooSlowError:
                raise AssertionError(f"{kind} did not start: {log.read_text()}") from None
            token = mint_token(SECRET.encode(), subject="edge", scopes="events:send events:listen")
            cli = {
                **cli_env,
                "BUS_EVENTS_API_URL": f"https://127.0.0.1:{listen_port}/api/v1/events",
                "BUS_API_TOKEN": token,
                "SSL_CERT_FILE": str(ca_file),
                "BUS_EVENTS_LISTENER_RETRY_MIN": "100ms",
                "BUS_EVENTS_LISTENER_RETRY_MAX": "500ms",
            }
            trust = ssl.create_default_context(cafile=str(ca_file))
            async with httpx.AsyncClient(verify=trust, timeout=10) as http:
                yield Edge(
                    cli["BUS_EVENTS_API_URL"],
                    cli,
                    command,
                    [(p, metrics) for _, p, metrics in providers],
                    http,
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            stop.set()


@pytest.mark.parametrize("edge", ["nginx", "haproxy"], indirect=True)
async def test_events_arrive_through_the_proxy_while_the_stream_is_open(edge: Edge) -> None:
    async with trio.open_nursery() as nursery:
        listener = await edge.listen(nursery, "--name", "example.edge")
        await edge.holder()  # the stream is open on one of the providers
        for round_ in range(1, 4):
            await edge.publish("example.edge", 1)
            await listener.until(f"event {round_}", lambda r=round_: len(listener.lines) == r)
            # Delivered line by line: the listener still runs, nothing waited for an end.
            assert listener.proc.returncode is None
        listener.proc.send_signal(signal.SIGINT)
    assert [event["id"] for event in listener.lines] == edge.published


@pytest.mark.parametrize("edge", ["nginx", "haproxy"], indirect=True)
async def test_a_provider_killed_mid_stream_is_an_error_through_the_proxy(edge: Edge) -> None:
    async with trio.open_nursery() as nursery:
        listener = await edge.listen(nursery, "--name", "example.edge")
        holder = await edge.holder()
        await edge.publish("example.edge", 2)
        await listener.until("two events", lambda: len(listener.lines) == 2)
        holder.kill()
        with trio.fail_after(30):
            await listener.done.wait()
    # Not a clean end of stream (exit 0): the broken stream is reported.
    assert listener.proc.returncode == 1, listener.stderr.decode()
    assert "bus-events: error:" in listener.stderr.decode()
    assert [event["id"] for event in listener.lines] == edge.published


async def test_listen_retry_replay_across_an_nginx_reload_loses_nothing(edge: Edge) -> None:
    async with trio.open_nursery() as nursery:
        listener = await edge.listen(nursery, "--name", "example.edge", "--retry", "--replay")
        await edge.publish("example.edge", 3)
        await listener.until("three events", lambda: len(listener.lines) == 3)
        reload = await trio.run_process(
            [*edge.nginx, "-s", "reload"], capture_stderr=True, check=False
        )
        assert reload.returncode == 0, reload.stderr.decode()
        await edge.publish("example.edge", 3)
        # The old worker closes its streams after worker_shutdown_timeout; the
        # listener reconnects through the new one.
        await listener.until("a reconnect", lambda: b"reconnecting" in listener.stderr)
        await edge.publish("example.edge", 3)
        await listener.until("nine events", lambda: len(listener.lines) == 9)
        listener.proc.send_signal(signal.SIGINT)
    ids = [event["id"] for event in listener.lines]
    assert ids == edge.published  # each once, in order
