"""The fast ``send`` (``cli/_fastsend.py``) without msgspec, trio, httpx or cyclopts.

It reads and writes the payload with the standard library's ``json`` and reads a
plain acceptance the same way; these tests hold it to the full command's results:
the same body bytes for the same ``--payload``, the same refusals, the same
acceptance or error, the same messages and exit statuses.  The full command is
forced with ``-C .`` (a flag outside the fast form), as in ``test_cli_send_fast``.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import uuid
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from busevents import (
    PublishRequest,
)
from busevents._attempts import acceptance, accepted_fields, request_body, retry_identity
from busevents._http import Response
from busevents.cli import _fastsend
from busevents.provider import RunningProvider

from .faults import response, serve_raw

HEAVY = {"trio", "httpx", "httpcore", "anyio", "cyclopts", "rich", "msgspec"}
URL = "http://127.0.0.1:9/api/v1/events"


def _outcome(call: Any) -> Any:
    try:
        return call()
    except Exception as exc:
        return (type(exc), str(exc))


# -- the payload: the same bytes, the same refusals ------------------------------------


def _full_payload(text: str) -> bytes | BaseException:
    """What the full ``send`` sends for ``--payload text`` (or the exception it meets)."""
    from busevents.cli._commands import _parse_payload

    try:
        value = _parse_payload(text)
        return msgspec.json.encode(value)
    except Exception as exc:  # UsageError, RecursionError, UnicodeEncodeError
        return exc


def _same_as_full(text: str) -> None:
    fast = _fastsend._payload_json(text)
    full = _full_payload(text)
    if fast is None:
        # Left to the full command: it refuses (or fails), or the payload nests deeper
        # than the fast path takes (the full command then runs and decides).
        deep = text.count("[") + text.count("{") > _fastsend._PLAIN_DEPTH
        assert isinstance(full, BaseException) or deep, (text[:80], full)
    else:
        assert fast == full, (text[:80], fast[:80], full)


EDGE_PAYLOADS = [
    "null",
    "",
    " ",
    "{bad",
    '{"ok": true}',
    ' { "a" : [ 1 , 2 ] } \n',
    "NaN",
    "Infinity",
    "-Infinity",
    '{"x": NaN}',
    "[1, Infinity]",
    "1e400",
    "-1e400",
    "[1e16, 1e15, 1e-5, 0.0001, 0.1, 1.5, -0.0, 5e-324, 1.7976931348623157e308]",
    "[0, -0, 1E2, 1e+2, 2.50]",
    "9" * 18,
    "9" * 19,
    "-" + "9" * 19,
    "18446744073709551616",
    "1" + "0" * 30,
    "9" * 5000,
    "-" + "9" * 5000,
    '{"a": 1, "a": 2, "b": 3}',
    '{"a": {"x": 1}, "b": 0, "a": [2]}',
    '"\\ud800"',
    '"\\udc00\\ud800"',
    '"\\ud83d\\ude00"',
    '"\\u0000\\u001f\\u007f\\u2028\\/"',
    '"tab\there"',
    '"\x01"',
    '"é ☃ 😀"',
    "\ufeff1",
    '"\\x"',
    "01",
    "1.",
    ".5",
    "+1",
    "[1,]",
    '{"a":1,}',
    "[] []",
    "true false",
    "[" * 400 + "]" * 400,
    "[" * 401 + "]" * 401,
    "[" * 600 + "]" * 600,
    "[" * 1000 + "]" * 1000,
    "[" * 5000 + "]" * 5000,
    '{"a":' * 450 + "1" + "}" * 450,
    "[" + ",".join(["{}"] * 500) + "]",  # many brackets, shallow
    '"' + "[" * 600 + '"',  # brackets in a string
    "\udcff",  # a non-UTF-8 byte from the command line (surrogateescape)
    '"\udcff"',
    '{"k\udcff": 1}',
]


@pytest.mark.parametrize("text", EDGE_PAYLOADS, ids=range(len(EDGE_PAYLOADS)))
def test_payload_edge_cases_match_the_full_command(text: str) -> None:
    _same_as_full(text)


def test_plain_payloads_stay_on_the_stdlib() -> None:
    """The common payloads need no msgspec (else the fast path loses its point)."""
    for text in ['{"x":1}', '{"ok": true, "n": [1, 2.5, "s"], "d": null}', "[]", '"é"']:
        assert _fastsend._plain_payload(text) is not None, text
    for text in ["1e16", "NaN", "9" * 19, '"\\ud800"', "{bad"]:
        assert _fastsend._plain_payload(text) is None, text


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.booleans(), st.sampled_from([None, 1, 2]), st.booleans())
def test_generated_payloads_match_the_full_command(
    value: Any, ascii_only: bool, indent: int | None, spaced: bool
) -> None:
    separators = (", ", ": ") if spaced else (",", ":")
    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent, separators=separators)
    _same_as_full(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from('[]{}",:0123456789.eE+-tfnrul \\xNaIy\ud800é')))
def test_generated_text_matches_the_full_command(text: str) -> None:
    _same_as_full(text)


# -- the body: msgspec's encoding of PublishRequest ----------------------------------


def _same_body(name: str, correlation_id: str | None, payload: bytes) -> None:
    request = PublishRequest(name=name, payload=msgspec.Raw(payload), correlation_id=correlation_id)
    fast = _outcome(lambda: request_body(name, payload, correlation_id))
    full = _outcome(lambda: msgspec.json.encode(request))
    if isinstance(full, tuple):  # the same exception (its message names another position)
        assert isinstance(fast, tuple) and fast[0] is full[0] is UnicodeEncodeError
    else:
        assert fast == full
    # the CLI leaves what is not UTF-8 to the full command
    plain = _fastsend._utf8(name) and _fastsend._utf8(correlation_id or "")
    assert plain == isinstance(fast, bytes)


@settings(max_examples=300, deadline=None)
@given(st.text(), st.one_of(st.none(), st.text()), st.sampled_from([b"null", b"1", b'{"a":[]}']))
def test_body_is_msgspecs_encoding(name: str, correlation_id: str | None, payload: bytes) -> None:
    _same_body(name, correlation_id, payload)


def test_body_with_controls_and_surrogates() -> None:
    for name in ["a.b", 'q"\\\n\t\x00\x7f\u2028', "é😀", "x\udcff"]:
        for correlation_id in [None, "", "c1", "\ud800"]:
            _same_body(name, correlation_id, b"null")


def test_retry_identity_is_a_uuid4_and_a_128_bit_key() -> None:
    assert retry_identity(None, 0, None) == (None, None)
    assert retry_identity("mine", 3, "k") == ("mine", "k")
    for _ in range(200):
        correlation_id, key = retry_identity(None, 1, None)
        assert correlation_id is not None and key is not None
        parsed = uuid.UUID(hex=correlation_id)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert parsed.hex == correlation_id
        assert re.fullmatch(r"[0-9a-f]{32}", key)


# -- the acceptance: the same result or the same error --------------------------------


def _same_acceptance(content: bytes, more: bool = False) -> None:
    reply = Response(202, {}, content, more)
    tokens = ["sekret-token"]

    def full() -> tuple[str, str, bytes]:
        accepted, raw = acceptance(reply, URL, tokens)
        return accepted.name, accepted.id, raw

    assert _outcome(lambda: accepted_fields(reply, URL, tokens)) == _outcome(full), content[:80]


ACCEPTANCES = [
    b'{"accepted":true,"id":"1-0","name":"x.y"}',
    b'{"id":"1-0","name":"x.y","correlationId":null,"time":"2026-01-01T00:00:00Z"}',
    b' {"id":"1-0","name":"x.y","extra":[1,2.5,{"a":null}],"big":1e400} ',
    b'{"id":"1-0","name":"x.y","n":' + b"9" * 5000 + b"}",
    b'{"id":1,"id":"1-0","name":"x.y"}',
    b'{"id":"a","id":"b","name":"x.y"}',
    b'{"id":"1-0","name":"x.y","accepted":1}',
    b'{"id":"1-0","name":"x.y","accepted":null}',
    b'{"id":"1-0","name":"x.y","correlationId":5}',
    b'{"id":"1-0","name":"x.y","time":false}',
    b'{"id":"1-0"}',
    b'{"name":"x.y"}',
    b'{"id":"1-0","name":"x.y","x":NaN}',
    b'{"id":"1-0","name":"x\\ud800"}',
    b'{"id":"1-0","name":"\\u00e9"}',
    b'{"id":"1-0","name":"x\x01"}',
    b'{"id":"1-0","name":"\xff"}',
    b"\xef\xbb\xbf{}",
    b"[]",
    b"null",
    b"",
    b"not json sekret-token",
    b'{"id":"1-0","name":"x.y"} trailing',
    b'{"id":"1-0","name":"x.y","x":' + b"[" * 2000 + b"]" * 2000 + b"}",
]


@pytest.mark.parametrize("content", ACCEPTANCES, ids=range(len(ACCEPTANCES)))
def test_acceptance_matches_msgspec(content: bytes) -> None:
    _same_acceptance(content)


def test_acceptance_too_long_matches_msgspec() -> None:
    _same_acceptance(b'{"id":"1-0","name":"x.y"}', more=True)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "name", "accepted", "correlationId", "time", "other"]),
        st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.floats(),
    )
)
def test_generated_acceptances_match_msgspec(fields: dict[str, Any]) -> None:
    _same_acceptance(json.dumps(fields).encode())


# -- as subprocesses: the same output, no heavy import ---------------------------------


def _imported(stderr: str) -> set[str]:
    return {line.split("|")[-1].strip() for line in stderr.splitlines() if "|" in line}


def _messages(stderr: str) -> str:
    return "".join(line + "\n" for line in stderr.splitlines() if not line.startswith("import"))


#: Runs the CLI in a real process and reports the modules it loaded (not those loaded
#: before it started: the interpreter's, or coverage's when the suite measures it).
WRAPPER = """
import sys
before = set(sys.modules)
from busevents.cli import main
status = main(sys.argv[1:])
sys.stderr.write("LOADED " + " ".join(sorted(set(sys.modules) - before)) + "\\n")
sys.exit(status)
"""


async def test_plain_send_imports_no_heavy_module(
    cli_env: dict[str, str], provider: RunningProvider
) -> None:
    env = {**cli_env, "BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token()}
    for args in [
        ("send", "--name", "example.fast", "--payload", '{"x":1,"s":"é","f":2.5}'),
        ("-f", "json", "send", "--name", "example.fast", "--correlation-id", "c"),
    ]:
        proc = await trio.run_process(
            [sys.executable, "-c", WRAPPER, *args],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        stderr = proc.stderr.decode()
        assert proc.returncode == 0, stderr
        assert stderr.startswith("LOADED ") and stderr.count("\n") == 1, stderr
        loaded = set(stderr.split()[1:])
        assert "busevents.cli._fastsend" in loaded and "busevents._sync" in loaded
        assert not (HEAVY | {"ssl", "uuid", "secrets"}) & loaded


async def test_plain_failures_load_no_cli(run_cli, provider: RunningProvider) -> None:
    """Connection refused, 401, 403 and 400: reported without cyclopts, trio or httpx."""
    with socket.socket() as sock:  # a loopback port that nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    cases = [
        ({"BUS_EVENTS_API_URL": closed, "BUS_API_TOKEN": "x"}, ("send", "--name", "a.b")),
        ({"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": "bad"}, ("send", "--name", "a.b")),
        (
            {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token()},
            ("send", "--name", "bus.vm.start.request"),
        ),
        (
            {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token()},
            ("send", "--name", "Not A Name"),
        ),
    ]
    for env, args in cases:
        fast = await run_cli(*args, env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
        full = await run_cli("-C", ".", *args, env=env)
        assert fast.status == full.status == 1, fast.stderr
        assert _messages(fast.stderr) == full.stderr
        imported = _imported(fast.stderr)
        assert "busevents.cli._fastsend" in imported
        assert not {"trio", "httpx", "httpcore", "cyclopts", "rich"} & imported


SUBPROCESS_PAYLOADS = [
    '{"t": 1e16, "u": 0.00001}',  # msgspec writes these floats (the fast path asks it)
    '{"a": 1, "a": 2}',
    "9" * 5000,
    "1e400",
    "NaN",
    "[" * 600 + "]" * 600,  # the provider refuses (nests deeper than 512)
    "[" * 450 + "]" * 450,
    '"\\ud800"',
    '"😀 \\u00e9 \\n"',
]


@pytest.mark.parametrize("payload", SUBPROCESS_PAYLOADS, ids=range(len(SUBPROCESS_PAYLOADS)))
async def test_payload_outcomes_match_the_full_command(
    run_cli, provider: RunningProvider, payload: str
) -> None:
    env = {"BUS_EVENTS_API_URL": provider.url, "BUS_API_TOKEN": provider.token()}
    args = ("-f", "json", "send", "--name", "example.fast", "--payload", payload)
    fast = await run_cli(*args, env=env)
    full = await run_cli("-C", ".", *args, env=env)
    assert (fast.status, fast.stderr) == (full.status, full.stderr)
    assert re.sub(rb"\d", b"0", fast.stdout) == re.sub(rb"\d", b"0", full.stdout)


def _recording(bodies: list[bytes], failures: int = 0):
    async def handler(stream: trio.SocketStream, request: bytes) -> None:
        bodies.append(request)
        if len(bodies) <= failures:
            await stream.send_all(response("503 Service Unavailable", b"down"))
        else:
            await stream.send_all(
                response("202 Accepted", b'{"accepted":true,"id":"1-0","name":"x.y"}')
            )

    return handler


def _split(request: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = request.partition(b"\r\n\r\n")
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers, body


async def test_the_same_bytes_reach_the_provider(run_cli) -> None:
    payloads = ['{"x": 1, "x": [1.5, -0, 1e16]}', '{"s": "é\\u2028\\/"}', "null", "[]"]
    for payload in payloads:
        bodies: list[bytes] = []
        async with serve_raw(_recording(bodies)) as url:
            args = ("--api-url", url, "send", "--name", "x.y", "--correlation-id", "c1")
            env = {"BUS_API_TOKEN": "t0ken"}
            fast = await run_cli(*args, "--payload", payload, env=env)
            full = await run_cli("-C", ".", *args, "--payload", payload, env=env)
        assert fast.status == full.status == 0, (fast.stderr, full.stderr)
        assert fast.stdout == full.stdout == b"accepted x.y 1-0\n"
        (fast_headers, fast_body), (full_headers, full_body) = map(_split, bodies)
        assert fast_body == full_body, payload
        for name in ("content-type", "authorization", "user-agent", "accept"):
            assert fast_headers[name] == full_headers[name], name


async def test_fast_retry_keeps_one_key_and_one_correlation_id(run_cli) -> None:
    bodies: list[bytes] = []
    async with serve_raw(_recording(bodies, failures=2)) as url:
        result = await run_cli(
            "--api-url", url, "send", "--name", "x.y", "--payload", "{}", "--retry", "2",
            env={"BUS_API_TOKEN": "t0ken", "PYTHONPROFILEIMPORTTIME": "1"},
        )  # fmt: skip
    assert result.status == 0, result.stderr
    assert result.stdout == b"accepted x.y 1-0\n"
    assert "busevents.cli._fastsend" in _imported(result.stderr)
    assert "cyclopts" not in _imported(result.stderr)
    sent = [_split(request) for request in bodies]
    assert len(sent) == 3
    keys = {headers["idempotency-key"] for headers, _ in sent}
    assert len(keys) == 1 and re.fullmatch(r"[0-9a-f]{32}", keys.pop())
    ids = {json.loads(body)["correlationId"] for _, body in sent}
    assert len(ids) == 1 and uuid.UUID(hex=ids.pop()).version == 4
