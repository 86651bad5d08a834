"""``relay``: forward events from one deployment to another, and show a route's status."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

from cyclopts import Parameter

from ._base import EXIT_FAILURE, EXIT_OK, Duration, Globals, UsageError, app, current

if TYPE_CHECKING:
    from busevents import RelayRoute


_ONE_SECOND = Duration(1.0)


@app.command
def relay(
    *,
    from_url: Annotated[
        str | None,
        Parameter(help="Source events URL. [default: --api-url, then $BUS_EVENTS_API_URL]"),
    ] = None,
    to_url: Annotated[str | None, Parameter(help="Destination events URL.")] = None,
    name: Annotated[
        list[str] | None,
        Parameter(help="Event name to forward, repeatable.", negative_iterable=""),
    ] = None,
    state_file: Annotated[
        str | None,
        Parameter(help="JSON file of the route's cursors and counters (one route per file)."),
    ] = None,
    from_token_file: Annotated[
        str | None,
        Parameter(help="Token file for the source. [default: the usual token discovery]"),
    ] = None,
    to_token_file: Annotated[
        str | None,
        Parameter(
            help="Token file for the destination; a service token, so that the origin "
            "metadata is kept. [default: the usual token discovery]"
        ),
    ] = None,
    environment_id: Annotated[
        str | None,
        Parameter(
            help="Id of the source deployment, stamped as bus.origin.environment.id "
            "(give each deployment its own short id, and keep it)."
        ),
    ] = None,
    once: Annotated[
        bool, Parameter(negative="", show_default=False, help="Forward what is there, then exit.")
    ] = False,
    loop: Annotated[
        bool,
        Parameter(
            negative="",
            show_default=False,
            help="Run as a service: a pass every --interval until SIGTERM (exit 0, state saved).",
        ),
    ] = False,
    interval: Annotated[
        Duration, Parameter(help="With --loop: pause between passes.")
    ] = _ONE_SECOND,
    retries: Annotated[
        int | None,
        Parameter(
            help="Consecutive failed passes (network, 5xx, 429) retried with backoff before "
            "giving up. [default: 5 with --once, no limit with --loop]"
        ),
    ] = None,
    config: Annotated[
        str | None,
        Parameter(help="TOML file of [[route]] tables: run (or show) all its routes."),
    ] = None,
    status: Annotated[
        bool,
        Parameter(
            negative="",
            show_default=False,
            help="Show the route's status from its state file (-f json for JSON); "
            "contacts no deployment.",
        ),
    ] = False,
) -> int:
    """Forward new events of some names from one Events API to another, exactly once.

    Events carry their origin (bus.origin.environment.id, bus.origin.event.id);
    events that came from another environment are not forwarded (no echo).
    The destination token must be a service token (an end user's is refused
    before anything is published).  The state file keeps a cursor per name: a
    restart resumes after it, and what a crash left unrecorded is found in the
    destination's history (trusted only when the source holds the same event),
    never sent twice.  A lock keeps a second relay off the same state file.
    --once ends with a summary line (forwarded, skipped, pending per name; on
    stdout with -f json).  See docs/relay.md.

    Example: bus-events relay --from-url http://127.0.0.1:8081 --to-url
    http://127.0.0.1:8082 --name example.ping --environment-id laptop
    --state-file a-to-b.json --to-token-file b.token --once
    """
    g = current()
    if status:
        if state_file is None and config is None:
            raise UsageError("--status needs --state-file FILE or --config FILE")
        return _show_status(g, state_file, config)
    if once == loop:
        raise UsageError("relay needs exactly one of --once and --loop")
    pause = float(interval)
    if retries is not None and retries < 0:
        raise UsageError("--retries must be 0 or more")
    routes = _routes(
        g,
        config=config,
        from_url=from_url,
        to_url=to_url,
        names=name,
        state_file=state_file,
        environment_id=environment_id,
        from_token_file=from_token_file,
        to_token_file=to_token_file,
    )
    limit = retries if retries is not None else (5 if once else None)

    async def body(g: Globals) -> int:
        import trio

        from busevents import run_relay

        reports: list[Any] = [None] * len(routes)

        async def one(index: int, route: RelayRoute, task_status: trio.TaskStatus[None]) -> None:
            report = await run_relay(
                route,
                loop=loop,
                interval=pause,
                retries=limit,
                http_timeout=g.timeout,
                task_status=task_status,
            )
            reports[index] = report

        async with trio.open_nursery() as nursery:
            for index, route in enumerate(routes):
                await nursery.start(one, index, route)
        if once:
            _summary(g, reports)
        return EXIT_OK

    return _run_service(body, routes)


def _summary(g: Globals, reports: list[Any]) -> None:
    """The one line a ``--once`` run ends with (stderr), or its JSON (stdout, ``-f json``)."""
    if g.format == "json":
        import json

        results = g.results()
        results.open()
        try:
            for report in reports:
                results.write(json.dumps(report.to_builtins()).encode() + b"\n")
        finally:
            results.close()
    else:
        g.diagnostics().note("relay: " + "; ".join(report.line() for report in reports))


def _routes(
    g: Globals,
    *,
    config: str | None,
    from_url: str | None,
    to_url: str | None,
    names: list[str] | None,
    state_file: str | None,
    environment_id: str | None,
    from_token_file: str | None,
    to_token_file: str | None,
) -> list[RelayRoute]:
    from pathlib import Path

    from busevents import ConfigError, RelayRoute, load_relay_routes, resolve_url

    if config is not None:
        given = [
            flag
            for flag, value in (
                ("--from-url", from_url),
                ("--to-url", to_url),
                ("--name", names),
                ("--state-file", state_file),
                ("--environment-id", environment_id),
                ("--from-token-file", from_token_file),
                ("--to-token-file", to_token_file),
            )
            if value
        ]
        if given:
            raise UsageError(f"--config takes the routes from its file; drop {given[0]}")
        try:
            return load_relay_routes(config)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    missing = [
        flag
        for flag, value in (
            ("--to-url", to_url),
            ("--name", names),
            ("--state-file", state_file),
            ("--environment-id", environment_id),
        )
        if not value
    ]
    if missing:
        raise UsageError(
            f"relay needs {', '.join(missing)} (or --config FILE); e.g. relay --to-url "
            "http://127.0.0.1:8082 --name example.ping --state-file a-to-b.json "
            "--environment-id laptop --to-token-file b-service.token --once"
        )
    assert to_url is not None and names and state_file is not None and environment_id
    try:
        source = resolve_url(from_url or g.api_url)
        return [
            RelayRoute(
                from_url=source,
                to_url=to_url,
                names=tuple(dict.fromkeys(names)),
                state_file=Path(state_file),
                environment_id=environment_id,
                from_token_file=from_token_file or g.token_file,
                to_token_file=to_token_file or g.token_file,
            )
        ]
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _run_service(body: Callable[[Globals], Awaitable[int]], routes: list[RelayRoute]) -> int:
    """Run ``body`` under trio; SIGTERM and SIGINT stop it cleanly (exit 0, state saved)."""
    import signal

    import trio

    from busevents import BusEventsError, Forbidden, Unauthorized, single_error

    from ._commands import _status_for

    g = current()

    async def main() -> int:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch)
                status = await body(g)
                nursery.cancel_scope.cancel()
                return status
        return EXIT_OK  # stopped by a signal: the relays saved their state

    try:
        with single_error():
            return trio.run(main)
    except BusEventsError as exc:
        status = _status_for(exc, g)
        assert status is not None
        if isinstance(exc, Unauthorized | Forbidden):
            _token_hint(g, exc, routes)
        return status
    except BaseException as exc:
        mapped = _status_for(exc, g)
        if mapped is None:
            raise
        return mapped


def _token_hint(g: Globals, exc: Any, routes: list[RelayRoute]) -> None:
    diag = g.diagnostics()
    for route in routes:
        side = route.side_of(exc.url)
        if side is None:
            continue
        file = route.from_token_file if side == "source" else route.to_token_file
        where = f"the token file {file}" if file else "the usual token discovery"
        what = "refused" if exc.status == 401 else "lacks a scope for"
        diag.hint(f"the {side} {what} the token from {where} (route {route.label})")
        return


def _show_status(g: Globals, state_file: str | None, config: str | None) -> int:
    import json

    from busevents import BusEventsError, ConfigError, load_relay_routes, relay_status

    if config is not None:
        if state_file is not None:
            raise UsageError("give --state-file or --config, not both")
        try:
            files = [str(route.state_file) for route in load_relay_routes(config)]
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    else:
        assert state_file is not None
        files = [state_file]
    documents = []
    for file in files:
        try:
            documents.append(relay_status(file))
        except BusEventsError as exc:
            g.diagnostics().error(str(exc))
            return EXIT_FAILURE
    results = g.results()
    results.open()
    try:
        if g.format == "json":
            for document in documents:
                results.write(json.dumps(document, sort_keys=True).encode() + b"\n")
        else:
            results.write("\n".join(_status_text(d) for d in documents).encode())
    finally:
        results.close()
    return EXIT_OK


def _status_text(d: dict[str, Any]) -> str:
    route = d["route"]
    counters = d["counters"]
    running = (
        f"running, pid {d['pid']}" if d.get("pid") else "running" if d["running"] else "not running"
    )
    lines = [
        f"route:        {route.get('id') or '-'} ({route['environment_id']}) "
        f"{route['from_url']} -> {route['to_url']}",
        f"state file:   {d['state_file']} ({running})",
    ]
    for name in d["names"]:
        cursor = d["cursors"].get(name, {})
        lines.append(
            f"cursor:       {name}: source {cursor.get('source') or '-'}, "
            f"destination {cursor.get('destination') or '-'}"
        )
    lines += [
        f"forwarded:    {counters['forwarded']}  skipped: {counters['skipped']}  "
        f"pending: {counters['pending']}  received: {counters['received']}",
        f"last success: {d.get('last_success') or 'never'}",
        f"last attempt: {d.get('last_attempt') or 'never'}",
        f"last error:   {d.get('last_error') or 'none'}"
        + (f" (at {d['last_error_time']})" if d.get("last_error_time") else ""),
    ]
    return "\n".join(lines) + "\n"
