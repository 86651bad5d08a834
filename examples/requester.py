"""Send one ``example.echo`` request and print the response (see ``echo_worker.py``).

::

    python examples/requester.py '{"hello": "world"}'
    # {'echo': {'hello': 'world'}}

The same exchange from the command line::

    bus-events request --name example.echo --response-name example.echo.reply \\
        --payload '{"hello": "world"}'
"""

from __future__ import annotations

import json
import sys

import trio

from busevents import BusEventsError, EventsClient, open_requester

REQUEST = "example.echo"
RESPONSE = "example.echo.reply"


async def ask(payload: object) -> object:
    """Send ``payload`` as a request and return the response's payload (10 s at most)."""
    async with (
        EventsClient.from_env() as client,
        open_requester(client, RESPONSE) as requester,
    ):
        response = await requester.request(REQUEST, payload, timeout=10)
    return response.payload_obj()


def main(argv: list[str] | None = None) -> int:
    """``requester.py [JSON]``: print the echoed payload; exit 1 on failure, 2 on bad JSON."""
    args = sys.argv[1:] if argv is None else argv
    try:
        payload = json.loads(args[0]) if args else {"hello": "world"}
    except json.JSONDecodeError as exc:
        print(f"requester: the payload is not JSON: {exc}", file=sys.stderr)
        return 2
    try:
        print(trio.run(ask, payload))
    except BusEventsError as exc:
        print(f"requester: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
