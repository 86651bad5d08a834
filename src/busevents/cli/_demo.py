"""``bus-events demo``: the whole round trip in one process, against the real HTTP API."""

from __future__ import annotations

from typing import Annotated

from cyclopts import Parameter

from ._base import EXIT_OK, Globals, UsageError, app, current
from ._commands import run_client_command
from ._listen import EventWriter
from ._serve import provider_module

__all__ = ["demo", "run_demo"]


@app.command
def demo(
    *,
    name: Annotated[str, Parameter(help="Event name to use.")] = "example.ping",
    count: Annotated[int, Parameter(help="How many events to publish.")] = 3,
) -> int:
    """Start an in-process provider, listen, publish, and show the events arrive.

    Needs nothing but this package: the provider, a token and the client all
    run in this process, on 127.0.0.1.  Events go to stdout as NDJSON (or
    text with -f text); what happens is narrated on stderr.

    Example: bus-events demo --count 5
    """
    g = current()
    if count < 1:
        raise UsageError("--count must be at least 1")
    provider_module()
    try:
        return run_demo(g, name, count)
    except KeyboardInterrupt:
        return 130


def run_demo(g: Globals, name: str, count: int) -> int:
    """Start a provider on a free loopback port, listen, publish ``count`` events, replay."""

    async def body(g: Globals) -> int:
        import trio

        from busevents import EventsClient

        from ..provider import open_provider

        diag = g.diagnostics()
        results = g.results()
        results.open()
        try:
            async with open_provider() as provider:
                token = provider.token(subject="demo", scopes="events:send events:listen")
                diag.note(f"reference provider listening on {provider.url}")
                async with (
                    EventsClient(provider.url, token, timeout=g.timeout) as client,
                    client.listen(name) as stream,
                ):
                    diag.note(f"listening for {name!r} (broadcast)")

                    async def publish() -> None:
                        for i in range(1, count + 1):
                            accepted = await client.send(
                                name, {"n": i, "ok": True}, correlation_id=f"demo-{i}"
                            )
                            diag.note(f"sent {i}/{count}: accepted {accepted.name} {accepted.id}")

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(publish)
                        with trio.fail_after(g.timeout):
                            received = await EventWriter(results, g.format, count).run(stream)
                    diag.note(f"received {received}/{count} events")
                async with (
                    EventsClient(provider.url, token, timeout=g.timeout) as client,
                    client.listen(name, replay=True, follow=False) as history,
                ):
                    replayed = [event async for event in history]
                diag.note(
                    f"replay --no-follow returned the {len(replayed)} stored events; "
                    "try `bus-events serve` and `bus-events listen` next (see README)"
                )
        finally:
            results.close()
        return EXIT_OK

    return run_client_command(body)
