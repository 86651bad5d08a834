"""The source: a minimal HTTP/1.1 server that streams pre-built NDJSON, never the bottleneck.

Run as its own process (``python -m benchmarks._source``) so it never shares a
GIL with the client being measured.  It prints ``{"port": P}`` on stdout once
it listens on 127.0.0.1, and exits when its stdin closes (so it cannot outlive
the harness) or on SIGTERM.

Any ``POST`` is accepted at once (202, keep-alive) for the publish rows.
Any ``GET`` is answered with the body of N events (see :mod:`._workload`) as a
chunked response, one HTTP chunk per pre-built 2 MB block, written with
``sendall`` (the copy happens in the kernel, without the GIL).  N comes from a
``/n/<N>/`` path segment (so an events base URL such as
``http://127.0.0.1:P/n/5000/api/v1/events`` works with the SDK and the CLI),
else a ``events=<N>`` query parameter, else the ``--events`` default.
``GET /prime/<N>`` builds (and caches) the blocks of N events ahead of timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import sys
import threading
from urllib.parse import parse_qs, urlsplit

from . import _workload
from ._procs import exit_when_stdin_closes

__all__ = ["events_url", "main", "prime"]

_MAX_HEAD = 64 * 1024
_CACHE_LIMIT = 1_300_000_000  # bytes of framed blocks kept; beyond that, built per request
_N_IN_PATH = re.compile(r"/n/(\d+)(?:/|$)")
_PRIME = re.compile(r"^/prime/(\d+)$")

_cache: dict[int, bytes] = {}
_cache_bytes = 0
_cache_lock = threading.Lock()


def _frame(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _full_block(index: int) -> bytes:
    """The framed chunk of full block ``index``, cached while the cache has room."""
    global _cache_bytes
    framed = _cache.get(index)
    if framed is not None:
        return framed
    framed = _frame(_workload.block(index))
    with _cache_lock:
        if index not in _cache and _cache_bytes + len(framed) <= _CACHE_LIMIT:
            _cache[index] = framed
            _cache_bytes += len(framed)
    return framed


def _chunks(n: int) -> list[bytes] | None:
    """Framed chunks for ``n`` events when all are cached or cacheable, else None."""
    full, rest = divmod(n, _workload.BLOCK_EVENTS)
    if (full + 1) * (_workload.BLOCK_EVENTS * _workload.LINE_SIZE + 16) > _CACHE_LIMIT:
        return None
    out = [_full_block(i) for i in range(full)]
    if rest:
        out.append(_frame(_workload.block(full, rest)))
    return out


def _send_body(conn: socket.socket, n: int) -> None:
    chunks = _chunks(n)
    if chunks is not None:
        for framed in chunks:
            conn.sendall(framed)
    else:  # too big to keep: build each block as it goes (slower, used for RSS runs only)
        full, rest = divmod(n, _workload.BLOCK_EVENTS)
        for index in range(full):
            conn.sendall(_full_block(index))
        if rest:
            conn.sendall(_frame(_workload.block(full, rest)))
    conn.sendall(b"0\r\n\r\n")


def _read_head(conn: socket.socket) -> bytes | None:
    head = b""
    while b"\r\n\r\n" not in head:
        data = conn.recv(65536)
        if not data:
            return None
        head += data
        if len(head) > _MAX_HEAD:
            return None
    return head


def _events_for(target: str, default: int) -> int:
    parts = urlsplit(target)
    match = _N_IN_PATH.search(parts.path)
    if match:
        return int(match.group(1))
    values = parse_qs(parts.query).get("events")
    return int(values[0]) if values else default


_ACCEPTED = b'{"accepted":true,"id":"1732900000000-0","name":"bench.publish"}'
_ACCEPTED_RESPONSE = (
    b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%b" % (len(_ACCEPTED), _ACCEPTED)
)


def _answer_publishes(conn: socket.socket, data: bytes) -> None:
    """Accept POSTs on a kept-alive connection, as fast as a socket allows.

    The publish rows measure the client (connection reuse against a connection
    per event), so the server must cost next to nothing per request.
    """
    while True:
        head, sep, data = data.partition(b"\r\n\r\n")
        while not sep:
            more = conn.recv(65536)
            if not more:
                return
            head, sep, data = (head + more).partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(data) < length:
            more = conn.recv(65536)
            if not more:
                return
            data += more
        data = data[length:]
        conn.sendall(_ACCEPTED_RESPONSE)
        if not data:
            more = conn.recv(65536)
            if not more:
                return
            data = more


def _handle(conn: socket.socket, default: int) -> None:
    with conn:
        head = _read_head(conn)
        if head is None:
            return
        method, _, rest = head.partition(b" ")
        target = rest.partition(b" ")[0].decode("latin-1")
        if method == b"POST":
            with contextlib.suppress(OSError):
                _answer_publishes(conn, head)
            return
        if method != b"GET":
            conn.sendall(
                b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            return
        prime = _PRIME.match(target)
        if prime:
            _chunks(int(prime.group(1)))
            conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            return
        try:
            n = _events_for(target, default)
            if not 0 <= n <= _workload.MAX_EVENTS:
                raise ValueError(n)
        except ValueError:
            conn.sendall(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            return
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Cache-Control: no-store\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        try:
            _send_body(conn, n)
        except OSError:
            return  # the client went away: fine, it may stop early on purpose


def events_url(port: int, n: int) -> str:
    """For clients: the events base URL under which the source on ``port`` streams ``n``."""
    return f"http://127.0.0.1:{port}/n/{n}/api/v1/events"


def prime(port: int, n: int) -> None:
    """For clients: have the source build (and cache) the body of ``n`` events before timing."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/prime/{n}", timeout=300) as reply:
        reply.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._source")
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(128)
    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    sys.stdout.write(json.dumps({"port": listener.getsockname()[1]}) + "\n")
    sys.stdout.flush()
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_handle, args=(conn, args.events), daemon=True).start()


if __name__ == "__main__":
    raise SystemExit(main())
