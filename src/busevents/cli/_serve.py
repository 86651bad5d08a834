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


def _split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"--addr {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:8081")
    return host.strip("[]"), int(port)


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
) -> int:
    """Run the reference Events API provider (for development and tests).

    Tokens are HS256 JWTs signed with $BUS_API_JWT_SECRET (raw text, or
    base64:<value>); mint one with `bus-events dev-token`.

    Example: BUS_API_JWT_SECRET=dev-secret bus-events serve --addr 127.0.0.1:8081
    """
    host, port = _split_addr(addr)
    provider = provider_module()
    secret_key = secret()
    g = current()
    diag = g.diagnostics()
    options = {}
    if policy is not None:
        try:
            options["policy"] = provider.ScopePolicy.from_file(policy)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--policy {policy}: {exc}") from None
    from busevents import ConfigError, parse_duration

    try:
        keepalive_s = parse_duration(keepalive)
    except ConfigError as exc:
        raise UsageError(f"--keepalive: {exc}") from None
    try:
        config = provider.ProviderConfig(
            secret=secret_key,
            backend=events_backend,
            keepalive=keepalive_s or None,
            max_body_bytes=max_body,
            listener_queue=listener_queue,
            history_limit=history,
            **options,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    import signal

    import trio

    async def main() -> None:
        # SIGINT/SIGTERM are the normal way to stop a server: a clean shutdown, exit 0.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(provider.serve, config, host, port)
                diag.note(f"Events API on {url} ({events_backend} backend); Ctrl-C stops")
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
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
