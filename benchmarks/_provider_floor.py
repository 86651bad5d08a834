"""The floor of the provider's HTTP layer: ``python -m benchmarks._provider_floor``.

The provider's lean h11 server (``busevents.provider._h11server``) running an ASGI
app that does no work: it reads the request body (as any app must, or the
connection is not reused) and answers ``202`` with a fixed body of the size of
a publish's acceptance.  Under the same wrk load as ``provider.wrk``, its CPU
per request is what the HTTP layer costs by itself; the rest of a publish's CPU
is the app's (auth, validation, the backend, metrics).

Prints ``{"url": …, "token": …}`` like ``benchmarks._provider`` (the token is
ignored), then serves until its stdin closes or SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any

from ._procs import exit_when_stdin_closes

__all__ = ["main"]

_BODY = (
    b'{"accepted":true,"id":"1700000000000-0","name":"bench.wrk",'
    b'"time":"2023-11-14T22:13:20.000000Z"}'
)
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_BODY))]
_START = {"type": "http.response.start", "status": 202, "headers": _HEADERS}
_ANSWER = {"type": "http.response.body", "body": _BODY}

Message = MutableMapping[str, Any]


async def _nothing(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """Read the body, answer 202: the least an app can do for a publish."""
    while (await receive()).get("more_body", False):
        pass
    await send(_START)
    await send(_ANSWER)


def main() -> int:
    import trio

    from busevents.provider._h11server import Server

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]

    async def serve() -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        sys.stdout.write(json.dumps({"url": f"http://127.0.0.1:{port}/", "token": "-"}) + "\n")
        sys.stdout.flush()
        await trio.serve_listeners(partial(Server().handle, _nothing), [listener])

    trio.run(serve)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
