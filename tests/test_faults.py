"""The client against misbehaving servers: every complete event is delivered, every
failure is one clear, bounded line naming the URL, never the token."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import trio

from busevents import (
    APIError,
    ConnectError,
    EventsClient,
    InvalidEvent,
    LineTooLong,
    RateLimited,
    ServerError,
    StreamInterrupted,
    StreamTruncated,
    Timeout,
)

from .faults import answer, chunk, response, serve_raw, stream_head

TOKEN = "canary.header.signature-DO-NOT-PRINT"


def line(i: int) -> bytes:
    return b'{"id":"%d","name":"example.fault","payload":{"n":%d}}\n' % (i, i)


GOOD = b"".join(line(i) for i in range(3))


async def read_all(url: str, events: list[int], **listen: object) -> None:
    async with (
        EventsClient(url, TOKEN) as client,
        client.listen("example.fault", **listen) as stream,
    ):  # type: ignore[arg-type]
        async for event in stream:
            events.append(int(event.id))


async def test_stream_closed_mid_line_delivers_complete_events_then_fails() -> None:
    async with serve_raw(answer(stream_head() + GOOD + b'{"id":"3","na')) as url:
        events: list[int] = []
        with pytest.raises(StreamTruncated, match="middle of a line") as info:
            await read_all(url, events)
    assert events == [0, 1, 2]
    assert info.value.event_number == 4 and info.value.offset == len(GOOD)


async def test_chunked_stream_cut_off_is_an_interruption_after_the_good_events() -> None:
    async with serve_raw(
        answer(stream_head(chunked=True) + chunk(GOOD) + chunk(b'{"id":"3"'))
    ) as url:
        events: list[int] = []
        with pytest.raises(StreamInterrupted, match=r"failed after 3 events") as info:
            await read_all(url, events)
    assert events == [0, 1, 2]
    assert url in str(info.value) and TOKEN not in str(info.value)


@pytest.mark.parametrize(
    ("bad", "error", "text"),
    [
        (b"{not json}\n", InvalidEvent, "malformed"),
        (b'["an","array"]\n', InvalidEvent, "got `array`"),
        (b'{"id":"x"}\n', InvalidEvent, "missing required field `name`"),
        (b'{"id":"x","name":"' + b"y" * 5000 + b'"}\n', LineTooLong, "1024-byte limit"),
    ],
)
async def test_bad_lines_are_named_after_the_good_ones(
    bad: bytes, error: type[Exception], text: str
) -> None:
    async with serve_raw(answer(stream_head() + GOOD + bad + line(9))) as url:
        events: list[int] = []
        async with (
            EventsClient(url, TOKEN, max_line=1024) as client,
            client.listen("example.fault") as stream,
        ):
            with pytest.raises(error, match=text) as info:
                async for event in stream:
                    events.append(int(event.id))
    assert events == [0, 1, 2]
    assert f"byte offset {len(GOOD)}" in str(info.value)


async def test_never_ending_line_is_cut_off_with_bounded_memory() -> None:
    async def endless(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(stream_head() + GOOD + b'{"id":"')
        with trio.move_on_after(5):
            while True:
                await stream.send_all(b"x" * 65536)

    async with serve_raw(endless) as url:
        events: list[int] = []
        with pytest.raises(LineTooLong, match="longer than the 1048576-byte limit"):
            async with (
                EventsClient(url, TOKEN, max_line=1 << 20) as client,
                client.listen("example.fault") as stream,
            ):
                async for event in stream:
                    events.append(int(event.id))
    assert events == [0, 1, 2]


@pytest.mark.parametrize(
    ("status", "body", "content_type", "expected"),
    [
        (
            "502 Bad Gateway",
            b"<html><head><title>502</title></head><body><h1>Bad Gateway</h1>\n<hr>nginx</body></html>",
            "text/html",
            "HTTP 502: 502 Bad Gateway nginx",
        ),
        (
            "500 Internal Server Error",
            b"boom\x1b[31m\r\nsecond line",
            "text/plain",
            "HTTP 500: boom [31m second line",
        ),
        (
            "503 Service Unavailable",
            b"",
            "text/plain",
            "HTTP 503: Service Unavailable (empty body)",
        ),
        (
            "500 Internal Server Error",
            b"\xff\xfe\xfa not utf-8",
            "text/plain",
            "HTTP 500: \ufffd\ufffd\ufffd not utf-8",
        ),
        ("500 Internal Server Error", b"A" * (1 << 20), "text/plain", "HTTP 500: AAAA"),
    ],
)
async def test_error_bodies_become_one_bounded_printable_line(
    status: str, body: bytes, content_type: str, expected: str
) -> None:
    async with serve_raw(answer(response(status, body, content_type))) as url:
        async with EventsClient(url, TOKEN) as client:
            with pytest.raises(ServerError) as info:
                await client.send("example.fault", 1)
    message = str(info.value)
    assert message.startswith(expected)
    assert len(message) < 400 and "\n" not in message and "\x1b" not in message
    assert message.isprintable()


async def test_429_is_not_retried_and_carries_retry_after() -> None:
    calls = 0

    async def limited(stream: trio.SocketStream, head: bytes) -> None:
        nonlocal calls
        calls += 1
        await stream.send_all(
            response(
                "429 Too Many Requests",
                b'{"error":"rate_limited","message":"slow down"}',
                extra="Retry-After: 7\r\n",
            )
        )

    async with serve_raw(limited) as url, EventsClient(url, TOKEN) as client:
        with pytest.raises(RateLimited, match="HTTP 429 rate_limited: slow down") as info:
            await client.send("example.fault", 1)
    assert info.value.retry_after == 7 and calls == 1


async def test_acceptance_that_is_not_json_is_a_clear_error() -> None:
    async with (
        serve_raw(answer(response("202 Accepted", b"OK"))) as url,
        EventsClient(url, TOKEN) as client,
    ):
        with pytest.raises(APIError, match="reply is not an acceptance"):
            await client.send("example.fault", 1)


async def test_stalled_stream_setup_names_the_timeout() -> None:
    async def stall(stream: trio.SocketStream, head: bytes) -> None:
        await trio.sleep_forever()

    async with serve_raw(stall) as url:
        async with EventsClient(url, TOKEN, timeout=0.3) as client:
            with pytest.raises(Timeout, match=r"/stream within 300ms \(the timeout= limit\)"):
                async with client.listen("example.fault"):
                    pass


# -- the CLI ------------------------------------------------------------------


@pytest.fixture
def fault_env() -> dict[str, str]:
    return {"BUS_API_TOKEN": TOKEN}


async def test_cli_delivers_complete_lines_then_exits_1(run_cli, fault_env) -> None:
    async with serve_raw(answer(stream_head() + GOOD + b'{"id":"3","na')) as url:
        # --no-follow: a snapshot may end by closing (no chunked framing) without the
        # warning a following stream gets; its end in mid-line is still a failure.
        result = await run_cli(
            "--api-url", url, "listen", "--name", "example.fault", "--no-follow", env=fault_env
        )
    assert result.status == 1
    assert result.stdout == GOOD
    assert "middle of a line" in result.stderr and result.stderr.count("\n") == 1
    assert TOKEN not in result.stderr


@pytest.mark.parametrize("option", [("--count", "2"), ("--correlation-id", "c"), ("--count", "1")])
async def test_cli_count_and_correlation_split_lines_on_newline_only(
    run_cli, fault_env, option: tuple[str, str]
) -> None:
    """A bare CR is JSON whitespace: it must not cut an envelope in two."""
    lines = [
        b'{"id":"1-0",\r"name":"example.fault",\r"correlationId":"c","payload":1}\n',
        b'{"id":"2-0","name":"example.fault","correlationId":"c",\r"payload":2}\n',
    ]
    # Chunked, with the terminating chunk: the stream ends cleanly after the lines.
    body = stream_head(chunked=True) + chunk(b"".join(lines)) + b"0\r\n\r\n"
    async with serve_raw(answer(body)) as url:
        result = await run_cli(
            "--api-url", url, "listen", "--name", "example.fault", *option, env=fault_env
        )
    assert result.status == 0, result.stderr
    wanted = lines[:1] if option == ("--count", "1") else lines
    assert result.stdout == b"".join(wanted)


async def test_cli_error_page_is_one_line_with_the_status(run_cli, fault_env) -> None:
    page = b"<html><body><h1>403 Forbidden</h1>" + b"<p>go away</p>" * 10000 + b"</body></html>"
    async with serve_raw(answer(response("403 Forbidden", page, "text/html"))) as url:
        result = await run_cli(
            "-vvv", "--api-url", url, "send", "--name", "example.fault", env=fault_env
        )
    assert result.status == 1
    error_lines = [x for x in result.stderr.splitlines() if "error:" in x]
    assert len(error_lines) == 1 and "HTTP 403" in error_lines[0] and len(error_lines[0]) < 400
    assert 'bus auth token --scope "<scopes>"' in result.stderr
    assert TOKEN not in result.stderr


async def test_cli_connection_refused_names_the_url(run_cli, fault_env) -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    result = await run_cli(
        "--api-url", f"http://127.0.0.1:{port}", "send", "--name", "x.y", env=fault_env
    )
    assert result.status == 1
    assert f"cannot connect to http://127.0.0.1:{port}/api/v1/events" in result.stderr


async def test_cli_send_stall_times_out_with_exit_1(run_cli, fault_env) -> None:
    async def stall(stream: trio.SocketStream, head: bytes) -> None:
        await trio.sleep_forever()

    async with serve_raw(stall) as url:
        result = await run_cli(
            "--timeout", "300ms", "--api-url", url, "send", "--name", "x.y", env=fault_env
        )
    assert result.status == 1
    assert "within 300ms (the --timeout limit)" in result.stderr  # the CLI keeps its words


async def test_cli_unwritable_output_is_exit_1(run_cli, fault_env, tmp_path) -> None:
    async with serve_raw(answer(stream_head() + GOOD)) as url:
        missing_dir = await run_cli(
            "-o",
            str(tmp_path / "no" / "such" / "file"),
            "--api-url",
            url,
            "listen",
            "--name",
            "example.fault",
            env=fault_env,
        )
        full_disk = await run_cli(
            "-o", "/dev/full", "--api-url", url, "listen", "--name", "example.fault", env=fault_env
        )
    assert missing_dir.status == 1 and "cannot write results to" in missing_dir.stderr
    assert "No such file or directory" in missing_dir.stderr
    assert full_disk.status == 1 and "No space left on device" in full_disk.stderr
    assert "Traceback" not in missing_dir.stderr + full_disk.stderr


def _many_lines(n: int) -> bytes:
    return b"".join(line(i) for i in range(n))


async def test_cli_closed_stdout_ends_quietly(cli_env, fault_env) -> None:
    async def lots(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(stream_head(chunked=True))
        for _ in range(200):
            await stream.send_all(chunk(_many_lines(1000)))

    async with serve_raw(lots) as url:
        env = {**cli_env, **fault_env, "BUS_EVENTS_API_URL": url}
        shell = f"{sys.executable} -m busevents listen --name example.fault | head -n 3"
        proc = await trio.run_process(
            ["bash", "-o", "pipefail", "-c", shell],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert proc.stdout.splitlines() == _many_lines(3).splitlines()
    assert proc.stderr == b""
    assert proc.returncode == 0


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_cli_signal_writes_what_arrived_then_exits(
    cli_env, fault_env, signum: int, status: int
) -> None:
    sent = trio.Event()

    async def some_then_quiet(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(stream_head() + GOOD)
        sent.set()
        await trio.sleep_forever()

    async with serve_raw(some_then_quiet) as url:
        env = {**cli_env, **fault_env, "BUS_EVENTS_API_URL": url}
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "busevents", "listen", "--name", "example.fault"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        received = b""
        with trio.fail_after(20):
            while received.count(b"\n") < 3:
                received += await proc.stdout.receive_some(65536)
            proc.send_signal(signum)
            status_got = await proc.wait()
            rest = b""
            while data := await proc.stdout.receive_some(65536):
                rest += data
            err = await proc.stderr.receive_some(65536)
    assert status_got == status
    assert received + rest == GOOD
    assert b"Traceback" not in (err or b"")


def flaky(failures: list[bytes], bodies: list[bytes]):
    """Answer with each of ``failures`` in turn, then accept; record request bodies."""

    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        bodies.append(head)
        if len(bodies) <= len(failures):
            await stream.send_all(failures[len(bodies) - 1])
        else:
            await stream.send_all(
                response("202 Accepted", b'{"accepted":true,"id":"1-0","name":"x.y"}')
            )

    return handler


async def _captured_bodies(bodies: list[bytes]) -> list[dict[str, object]]:
    import json

    return [json.loads(b.split(b"\r\n\r\n", 1)[1]) for b in bodies]


async def test_send_is_not_retried_unless_asked(run_cli, fault_env) -> None:
    bodies: list[bytes] = []
    failures = [response("503 Service Unavailable", b"down")]
    async with serve_raw(flaky(failures, bodies)) as url:
        result = await run_cli("--api-url", url, "send", "--name", "x.y", env=fault_env)
    assert result.status == 1 and "HTTP 503" in result.stderr
    assert len(bodies) == 1


async def test_send_retry_keeps_one_correlation_id_and_honours_retry_after(
    run_cli, fault_env
) -> None:
    bodies: list[bytes] = []
    failures = [
        response("503 Service Unavailable", b"down"),
        response("429 Too Many Requests", b"", extra="Retry-After: 1\r\n"),
    ]
    async with serve_raw(flaky(failures, bodies)) as url:
        start = trio.current_time()
        result = await run_cli(
            "-v", "--api-url", url, "send", "--name", "x.y", "--retry", "3", env=fault_env
        )
        elapsed = trio.current_time() - start
    assert result.status == 0, result.stderr
    assert result.out == "accepted x.y 1-0\n"
    sent = await _captured_bodies(bodies)
    assert len(sent) == 3
    ids = {body["correlationId"] for body in sent}
    assert len(ids) == 1 and None not in ids
    assert elapsed >= 1.5  # 0.5 s backoff, then at least the 1 s Retry-After
    assert "retry 1 of 3" in result.stderr


async def test_send_retry_gives_up_after_the_limit() -> None:
    bodies: list[bytes] = []
    failures = [response("500 Internal Server Error", b"no")] * 5
    async with serve_raw(flaky(failures, bodies)) as url, EventsClient(url, TOKEN) as client:
        with pytest.raises(ServerError):
            await client.send("x.y", 1)
        assert len(bodies) == 1
        with pytest.raises(ServerError):
            from busevents import PublishRequest

            await client.publish(PublishRequest("x.y", correlation_id="mine"), retries=1)
    assert len(bodies) == 3
    assert (await _captured_bodies(bodies))[2]["correlationId"] == "mine"


async def test_tls_failure_is_a_connect_error_naming_the_url() -> None:
    """An https URL whose server does not speak TLS: the handshake fails."""
    async with serve_raw(answer(response("200 OK", b"plain http")), read_request=False) as url:
        https = url.replace("http://", "https://")
        async with EventsClient(https, TOKEN) as client:
            with pytest.raises(
                ConnectError,
                match=r"cannot connect to https://127\.0\.0\.1:\d+/api/v1/events: .*SSL",
            ) as info:
                await client.send("example.fault", 1)
    assert TOKEN not in str(info.value)
