"""``export`` and ``import``: a deployment's history as NDJSON, and back with its origin."""

from __future__ import annotations

import sys
from typing import Annotated, Any, BinaryIO

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
    if after is not None:
        from busevents import parse_event_id

        try:
            parse_event_id(after)
        except ValueError as exc:
            raise UsageError(f"--after: {exc}") from None

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
            help="Id of the deployment the file was exported from, stamped as the origin "
            "of envelopes without bus.origin.environment.id metadata. Required."
        ),
    ] = None,
) -> int:
    """Restore envelopes into a deployment: every event of the file, each exactly once.

    Unlike a relay route (which forwards only what started at its source),
    import brings every event of the file, whatever its origin: an export of A
    holding events that came to A from B restores B's events too.  Each event
    is keyed by its origin (bus.origin.environment.id and bus.origin.event.id:
    the envelope's own, else --environment-id and the envelope's id); one the
    destination already holds is a duplicate, not published again, and one
    that the destination published itself is skipped.  Prints `published N
    duplicates D skipped S failed F`.

    Checked before anything is published (one message, exit 1): a service
    token at the destination (end-user tokens cannot keep the origin), every
    line readable (at most 16 MiB, as `send --ndjson`) and each envelope's ids.
    The envelope's identity_id is kept: the provider attributes the restored
    event to it (service tokens may), so import only files you trust.

    Example: bus-events --token-file c-service.token import --environment-id env-a a.ndjson
    """
    if not environment_id or not environment_id.strip():
        raise UsageError(
            "import needs --environment-id ID: the id of the deployment the file was "
            "exported from (the origin of envelopes without one), e.g. "
            "bus-events import --environment-id laptop history.ndjson"
        )
    env: str = environment_id
    label = "stdin" if source == "-" else source
    try:
        raw: BinaryIO = sys.stdin.buffer if source == "-" else open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"import: cannot read {source}: {exc.strerror}") from None

    async def body(g: Globals) -> int:
        from busevents import find_token, import_events

        diag = g.diagnostics()
        client = _client(g)  # a missing URL or token is reported before any line
        token = find_token(g.token_file)
        events, bad_lines = await _read_envelopes(raw, label)

        def on_error(number: int, message: str) -> None:
            diag.error(f"line {number}: {message}")

        async with client:
            result = await import_events(
                client,
                events,
                environment_id=env,
                token=token,
                bad_lines=bad_lines,
                on_error=on_error,
            )
        results = g.results()
        results.open()
        counts = (result.published, result.duplicates, result.skipped, result.failed)
        try:
            if g.format == "json":
                results.write(
                    b'{"published":%d,"duplicates":%d,"skipped":%d,"failed":%d}\n' % counts
                )
            else:
                results.write(b"published %d duplicates %d skipped %d failed %d\n" % counts)
        finally:
            results.close()
        return EXIT_FAILURE if result.failed else EXIT_OK

    try:
        return run_client_command(body)
    finally:
        if raw is not sys.stdin.buffer:
            raw.close()


#: Most bytes ``import`` reads: every line is checked before the first publish, so
#: the whole file is held; a bigger history is imported in parts (export --after).
MAX_IMPORT = 1024 * 1024 * 1024


class _Counted:
    """A binary file whose reads stop with :class:`UsageError` past :data:`MAX_IMPORT`."""

    def __init__(self, raw: Any, label: str) -> None:
        self.raw, self.label, self.total = raw, label, 0

    def read1(self, size: int = -1) -> bytes:
        block: bytes = self.raw.read1(size)
        self.total += len(block)
        if self.total > MAX_IMPORT:
            raise UsageError(
                f"import: {self.label} is larger than {MAX_IMPORT >> 30} GiB: import it in "
                "parts (export --after ID); nothing was published"
            )
        return block

    read = read1

    def close(self) -> None:
        self.raw.close()


async def _read_envelopes(
    raw: BinaryIO, label: str
) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
    """The numbered envelopes of ``source``, and its bad lines ``(number, why)``: an
    over-long line (reading stops there: ``/dev/zero`` is one), a line that is not
    an envelope, or one nested too deep.  Raises :class:`UsageError` for a file
    that cannot be read.
    """
    import msgspec

    from busevents import Event, nesting_error

    from ._send import MAX_LINE, _lines

    decode = msgspec.json.Decoder(Event).decode
    events: list[tuple[int, Any]] = []
    errors: list[tuple[int, str]] = []
    try:
        async for number, line in _lines(_Counted(raw, label)):  # type: ignore[arg-type]
            if line is None:
                errors.append((number, f"longer than {MAX_LINE >> 20} MiB: not an envelope"))
                break
            if (too_deep := nesting_error(line)) is not None:
                # Counted, not left to the interpreter's recursion: the same on every Python.
                errors.append((number, f"not an event envelope: {too_deep}"))
                continue
            try:
                events.append((number, decode(line)))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                errors.append((number, f"not an event envelope: {str(exc)[:200]}"))
            except RecursionError:
                errors.append((number, "not an event envelope: nested too deep"))
    except OSError as exc:
        raise UsageError(f"import: cannot read {label}: {exc.strerror}") from None
    return events, errors
