"""``export`` and ``import``: a deployment's history as NDJSON, and back with its origin."""

from __future__ import annotations

import sys
from typing import Annotated

from cyclopts import Parameter

from ._base import EXIT_FAILURE, EXIT_OK, Globals, UsageError, app
from ._commands import _client, run_client_command


@app.command
def export(
    *,
    name: Annotated[
        list[str],
        Parameter(help="Event name to export, repeatable.", negative_iterable=""),
    ],
    after: Annotated[
        str | None, Parameter(help="Only events after this event id (a cursor).")
    ] = None,
) -> int:
    """Write the retained history of some names as NDJSON envelopes, then exit 0.

    The envelopes are exactly as `listen` writes them (one per line, never
    re-encoded), name after name in the order given.  Results go to stdout or
    to the global --output FILE.  Load them elsewhere with `import`.

    Example: bus-events -o history.ndjson export --name example.ping --name example.job
    """
    names = list(dict.fromkeys(name))

    async def body(g: Globals) -> int:
        results = g.results()
        async with _client(g) as client:
            results.open()
            try:
                for each in names:
                    async with client.listen(
                        each, replay=True, follow=False, after=after
                    ) as stream:
                        async for block in stream.raw_batches():
                            results.write(block)
            finally:
                results.close()
        return EXIT_OK

    return run_client_command(body)


@app.command(name="import")
def import_(
    source: Annotated[
        str,
        Parameter(
            help="NDJSON file of envelopes (as `export` or `listen` write them), or -.",
            allow_leading_hyphen=True,
        ),
    ] = "-",
    /,
    *,
    environment_id: Annotated[
        str | None,
        Parameter(
            help="Id of the deployment the envelopes came from, for those without "
            "bus.origin.environment.id metadata."
        ),
    ] = None,
) -> int:
    """Publish each envelope with its origin recorded; a re-run publishes nothing twice.

    The origin (bus.origin.environment.id and bus.origin.event.id metadata) is
    the envelope's own when it has one, else --environment-id and the
    envelope's id; with --environment-id, envelopes of another origin are
    skipped (as the relay does: no echo).  Envelopes whose origin the
    destination already holds are counted as duplicates, not published.
    Prints `published N duplicates D skipped S failed F`; each bad line is
    reported with its number on stderr (exit 1).
    The destination token must be a service token (origin metadata is kept
    only from those).

    Example: bus-events import --environment-id laptop history.ndjson
    """
    data = _read_source(source)

    async def body(g: Globals) -> int:
        import msgspec

        from busevents import Event, import_events

        diag = g.diagnostics()
        client = _client(g)  # a missing URL or token is reported before any line
        decode = msgspec.json.Decoder(Event).decode
        events: list[tuple[int, Event]] = []
        failed = 0
        for number, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                events.append((number, decode(line)))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                failed += 1
                diag.error(f"line {number}: not an event envelope: {exc}")

        def on_error(number: int, message: str) -> None:
            diag.error(f"line {number}: {message}")

        async with client:
            result = await import_events(
                client, events, environment_id=environment_id, on_error=on_error
            )
        failed += result.failed
        results = g.results()
        results.open()
        try:
            if g.format == "json":
                results.write(
                    b'{"published":%d,"duplicates":%d,"skipped":%d,"failed":%d}\n'
                    % (result.published, result.duplicates, result.skipped, failed)
                )
            else:
                results.write(
                    b"published %d duplicates %d skipped %d failed %d\n"
                    % (result.published, result.duplicates, result.skipped, failed)
                )
        finally:
            results.close()
        return EXIT_FAILURE if failed else EXIT_OK

    return run_client_command(body)


def _read_source(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        with open(source, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise UsageError(f"import: cannot read {source}: {exc.strerror}") from None
