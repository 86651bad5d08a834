"""``serve``: the reference provider from the command line.

The provider's packages (hypercorn, PyJWT) are imported only here, inside the
commands, so the client commands never load them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated, Literal

from cyclopts import Parameter

from ._app import EXIT_FAILURE, EXIT_OK, UsageError, app, current

if TYPE_CHECKING:
    from types import ModuleType

SECRET_ENV = "BUS_API_JWT_SECRET"


def provider_module() -> ModuleType:
    """The provider package; a usage error naming the extra to install when missing."""
    try:
        from .. import provider
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    return provider


def secret() -> bytes:
    """The provider's HS256 secret from ``$BUS_API_JWT_SECRET``; a usage error if unset."""
    value = os.environ.get(SECRET_ENV, "")
    if not value:
        raise UsageError(
            f"{SECRET_ENV} is not set: the provider signs and checks tokens with it; e.g. "
            f"export {SECRET_ENV}=\"$(python3 -c 'import secrets; print(secrets.token_hex(32))')\""
        )
    try:
        secret: bytes = provider_module().secret_from_env(value)
    except ValueError as exc:
        raise UsageError(f"{SECRET_ENV}: {exc}") from None
    return secret


def _split_addr(addr: str, option: str = "--addr") -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"{option} {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:8081")
    return host.strip("[]"), int(port)


def _seconds(value: str, option: str) -> float:
    from busevents import ConfigError, parse_duration

    try:
        return parse_duration(value)
    except ConfigError as exc:
        raise UsageError(f"{option}: {exc}") from None


@app.command
def serve(
    *,
    addr: Annotated[str, Parameter(help="Address to listen on, HOST:PORT.")] = "127.0.0.1:8081",
    events_backend: Annotated[
        Literal["memory"], Parameter(help="Event store: memory (non-durable).")
    ] = "memory",
    policy: Annotated[
        str | None, Parameter(help="Scope policy JSON file replacing the default table.")
    ] = None,
    keepalive: Annotated[
        str,
        Parameter(help="Silence after which a following stream writes a blank line; 0 disables."),
    ] = "15s",
    max_body: Annotated[int, Parameter(help="Largest publish body in bytes (larger: 413).")] = 1
    << 20,
    listener_queue: Annotated[
        int, Parameter(help="Events buffered per listener or unicast group (see README).")
    ] = 10_000,
    history: Annotated[int, Parameter(help="Events kept in memory for --replay.")] = 100_000,
    shutdown_grace: Annotated[
        str,
        Parameter(
            help="On SIGTERM/SIGINT: time open connections get to finish after the "
            "streams end; then they are closed. A second signal stops at once."
        ),
    ] = "3s",
    body_timeout: Annotated[
        str, Parameter(help="Time a publish body may take to arrive (slower: 408).")
    ] = "10s",
    metrics_addr: Annotated[
        str | None,
        Parameter(
            help="Serve GET /metrics (Prometheus), /healthz and /readyz on this HOST:PORT "
            "too; keep it where only operators reach. Off by default."
        ),
    ] = None,
    print_openapi: Annotated[
        bool,
        Parameter(negative="", help="Print the OpenAPI 3.1 document of the API and exit."),
    ] = False,
) -> int:
    """Run the reference Events API provider (for development and tests).

    Tokens are HS256 JWTs signed with $BUS_API_JWT_SECRET (raw text, or
    base64:<value>); mint one with `bus-events dev-token`. GET /healthz and
    /readyz answer without a token; the OpenAPI document is at
    {base}/openapi.json.

    Example: BUS_API_JWT_SECRET=dev-secret bus-events serve --addr 127.0.0.1:8081
    """
    g = current()
    if print_openapi:
        import json

        document = provider_module().openapi_document()
        results = g.results()
        results.open()
        results.write(json.dumps(document, indent=2, ensure_ascii=False).encode() + b"\n")
        results.close()
        return EXIT_OK
    host, port = _split_addr(addr)
    metrics = None if metrics_addr is None else _split_addr(metrics_addr, "--metrics-addr")
    grace_s = _seconds(shutdown_grace, "--shutdown-grace")
    body_timeout_s = _seconds(body_timeout, "--body-timeout")
    provider = provider_module()
    secret_key = secret()
    diag = g.diagnostics()
    options = {}
    if policy is not None:
        try:
            options["policy"] = provider.ScopePolicy.from_file(policy)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--policy {policy}: {exc}") from None
    keepalive_s = _seconds(keepalive, "--keepalive")
    try:
        config = provider.ProviderConfig(
            secret=secret_key,
            backend=events_backend,
            keepalive=keepalive_s or None,
            max_body_bytes=max_body,
            listener_queue=listener_queue,
            history_limit=history,
            shutdown_grace=grace_s,
            body_timeout=body_timeout_s,
            **options,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    import signal

    import trio

    async def main() -> None:
        # SIGINT/SIGTERM are the normal way to stop a server: a clean shutdown within
        # the grace period whatever the peers do, exit 0.  A second signal: at once.
        shutdown = trio.Event()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def run(task_status: trio.TaskStatus[str]) -> None:
                    await provider.serve(
                        config,
                        host,
                        port,
                        shutdown=shutdown,
                        metrics_addr=metrics,
                        task_status=task_status,
                    )
                    nursery.cancel_scope.cancel()  # stopped: no more signals to wait for

                url = await nursery.start(run)
                diag.note(f"Events API on {url} ({events_backend} backend); Ctrl-C stops")
                if metrics is not None:
                    diag.note(f"metrics on http://{metrics_addr}/metrics")
                async for _ in signals:
                    if shutdown.is_set():
                        nursery.cancel_scope.cancel()
                        break
                    diag.note(f"stopping (at most {grace_s:g} s; a second signal stops now)")
                    shutdown.set()
        diag.note("stopped")

    from busevents import single_error

    try:
        with single_error():
            trio.run(main)
    except OSError as exc:
        diag.error(f"cannot listen on {addr}: {exc.strerror or exc}")
        return EXIT_FAILURE
    return EXIT_OK


__all__ = ["provider_module", "secret", "serve"]
