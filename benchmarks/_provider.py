"""The reference provider in its own process: ``python -m benchmarks._provider``.

Prints ``{"url": …, "token": …}`` once it listens on a free 127.0.0.1 port
(the token may send and listen), then serves until its stdin closes or SIGTERM.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import threading

from ._procs import exit_when_stdin_closes

__all__ = ["main"]


def main() -> int:
    import trio

    from busevents.provider import ProviderConfig, open_provider

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    config = ProviderConfig(secret=secrets.token_bytes(32), history_limit=10_000)

    async def serve() -> None:
        async with open_provider(config) as provider:
            token = provider.token(subject="bench", scopes="events:send events:listen")
            sys.stdout.write(json.dumps({"url": provider.url, "token": token}) + "\n")
            sys.stdout.flush()
            await trio.sleep_forever()

    trio.run(serve)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
