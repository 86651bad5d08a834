"""An echo worker: answers each ``example.echo`` request on ``example.echo.reply``.

Run it against ``bus-events serve`` (see the README), with the URL and token
found the way the CLI finds them (``BUS_EVENTS_API_URL``, ``BUS_API_TOKEN``…)::

    cd examples && bus-events worker echo_worker:worker   # Ctrl-C (or SIGTERM) stops it
    python examples/echo_worker.py                          # the same, through main()
    python examples/requester.py '{"hello": "world"}'

Workers of the ``echo`` unicast group share the requests: start two and each
request is answered once.  A request whose payload is not a JSON object gets
an error response (the requester raises ``ResponseError``).
"""

from __future__ import annotations

import sys

from busevents import Event, Publisher, Worker, run_host

REQUEST = "example.echo"
RESPONSE = "example.echo.reply"


async def echo(event: Event, publisher: Publisher) -> None:
    """Reply with the request's payload, or with an error response for a non-object."""
    payload = event.payload_obj()
    if not isinstance(payload, dict):
        await publisher.reply_error(event, RESPONSE, "bad_request", "expected a JSON object")
        return
    await publisher.reply(event, RESPONSE, {"echo": payload})


worker = Worker(REQUEST, echo, delivery="unicast", group="echo", concurrency=32)


def main() -> int:
    """Run the worker until SIGINT/SIGTERM; return the exit status."""
    return run_host(worker)


if __name__ == "__main__":
    sys.exit(main())
