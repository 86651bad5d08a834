"""``request``: publish a request and wait for the correlated response (like ``nats request``)."""

from __future__ import annotations

from typing import Annotated

from cyclopts import Parameter

from ._base import EXIT_FAILURE, EXIT_OK, Globals, app
from ._commands import _client, _parse_payload, run_client_command
from ._output import TextFormatter


@app.command
def request(
    *,
    name: Annotated[str, Parameter(help="Request event name, e.g. example.echo.")],
    response_name: Annotated[
        str, Parameter(help="Event name the response arrives on, e.g. example.echo.reply.")
    ],
    payload: Annotated[str, Parameter(help="Request payload, any JSON value.")] = "null",
) -> int:
    """Publish a request and print the response with the same correlation id.

    Listens on --response-name (broadcast) first, then publishes --name with a
    new correlation id and waits for the response: text (the default) prints
    one readable line, -f json the response envelope exactly as received.  The
    global --timeout (default 30s) bounds the whole exchange.  Exit 0 with a
    response, 1 with an error response (a payload {"error": code, ...}; the
    envelope is still printed) or when no response came in time.

    Example: bus-events request --name example.echo --response-name example.echo.reply
    """
    value = _parse_payload(payload)  # before anything is sent: bad JSON sends nothing

    async def body(g: Globals) -> int:
        import uuid

        import trio

        from busevents import (
            Event,
            ReplyTimeout,
            Requester,
            ResponseError,
            RetryPolicy,
            open_requester,
        )

        # One short-lived command: an unreachable provider is an error, not a reason to wait.
        retry = RetryPolicy.from_env(required=True, enabled=False)
        correlation_id = uuid.uuid4().hex
        answer: tuple[Event, bytes] | None = None
        # --timeout bounds the whole exchange: opening the listener, publishing, waiting.
        async with _client(g) as client:
            with trio.move_on_after(g.timeout):
                async with open_requester(client, response_name, retry=retry) as requester:
                    answer = await requester.exchange(name, value, correlation_id=correlation_id)
        if answer is None:
            raise ReplyTimeout.waiting_for(
                name,
                response_name,
                timeout=g.timeout,
                correlation_id=correlation_id,
                url=client.url,
            )
        response, line = answer
        results = g.results()
        results.open()
        try:
            if g.format == "json":
                results.write(line.rstrip(b"\r") + b"\n")
            else:
                results.write(TextFormatter(results.is_terminal).line(response))
        finally:
            results.close()
        try:
            Requester.check_response(response)
        except ResponseError as exc:
            g.diagnostics().error(str(exc))
            return EXIT_FAILURE
        return EXIT_OK

    return run_client_command(body)
