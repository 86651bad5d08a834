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
REDIS_ADDR_ENV = "BUS_EVENTS_REDIS_ADDR"
REDIS_PASSWORD_ENV = "BUS_EVENTS_REDIS_PASSWORD"
REDIS_PREFIX_ENV = "BUS_EVENTS_REDIS_PREFIX"
POSTGRES_DSN_ENV = "BUS_EVENTS_POSTGRES_DSN"


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
        Literal["memory", "redis", "postgres"],
        Parameter(
            help="Event store: memory (one process, nothing kept), redis or postgres "
            "(durable, shared by several serve processes; see docs/backends.md)."
        ),
    ] = "memory",
    redis_addr: Annotated[
        str | None,
        Parameter(help=f"Redis HOST:PORT or redis:// URL [env {REDIS_ADDR_ENV}; 127.0.0.1:6379]."),
    ] = None,
    redis_prefix: Annotated[
        str | None,
        Parameter(help=f"Prefix of every Redis key [env {REDIS_PREFIX_ENV}; bus-events:]."),
    ] = None,
    postgres_dsn: Annotated[
        str | None,
        Parameter(
            help=f"PostgreSQL connection string [env {POSTGRES_DSN_ENV}]; "
            "prefer the variable when it holds a password."
        ),
    ] = None,
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
    history: Annotated[
        int, Parameter(help="Events kept for --replay (Redis: MAXLEN ~; PostgreSQL: rows).")
    ] = 100_000,
    history_bytes: Annotated[
        int, Parameter(help="Memory backend: bytes of history kept (oldest dropped first).")
    ] = 64 << 20,
    listener_queue_bytes: Annotated[
        int, Parameter(help="Memory backend: bytes buffered per listener or unicast group.")
    ] = 8 << 20,
    max_groups: Annotated[
        int, Parameter(help="Memory backend: unicast groups held at most (more: 429).")
    ] = 1_000,
    max_groups_per_identity: Annotated[
        int, Parameter(help="Memory backend: unicast groups per identity at most.")
    ] = 20,
    group_idle: Annotated[
        str, Parameter(help="Memory backend: free a unicast group idle (no consumer) this long.")
    ] = "10m",
) -> int:
    """Run the reference Events API provider (for development and tests).

    Tokens are HS256 JWTs signed with $BUS_API_JWT_SECRET (raw text, or
    base64:<value>); mint one with `bus-events dev-token`.

    Example: BUS_API_JWT_SECRET=dev-secret bus-events serve --addr 127.0.0.1:8081

    Redis's password is read from $BUS_EVENTS_REDIS_PASSWORD only (never a flag).
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
        group_idle_s = parse_duration(group_idle)
    except ConfigError as exc:
        raise UsageError(f"--group-idle: {exc}") from None
    env = os.environ
    options["redis"] = provider.RedisOptions(
        addr=redis_addr or env.get(REDIS_ADDR_ENV) or "127.0.0.1:6379",
        password=env.get(REDIS_PASSWORD_ENV) or None,
        prefix=redis_prefix
        if redis_prefix is not None
        else env.get(REDIS_PREFIX_ENV, "bus-events:"),
    )
    dsn = postgres_dsn or env.get(POSTGRES_DSN_ENV)
    if events_backend == "postgres" and not dsn:
        raise UsageError(
            f"--events-backend postgres needs a database: set {POSTGRES_DSN_ENV} "
            "(e.g. postgresql://user@127.0.0.1:5432/events) or --postgres-dsn"
        )
    if dsn:
        options["postgres"] = provider.PostgresOptions(dsn=dsn)
    try:
        config = provider.ProviderConfig(
            secret=secret_key,
            backend=events_backend,
            keepalive=keepalive_s or None,
            max_body_bytes=max_body,
            listener_queue=listener_queue,
            history_limit=history,
            history_bytes=history_bytes,
            listener_queue_bytes=listener_queue_bytes,
            max_groups=max_groups,
            max_groups_per_identity=max_groups_per_identity,
            group_idle=group_idle_s,
            **options,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    import signal

    import trio

    try:
        backend = provider.make_backend(config)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    async def check_backend() -> None:
        # Fail at once, in one line, rather than from inside the server's startup.
        async with backend.running():
            pass

    async def main() -> None:
        # SIGINT/SIGTERM are the normal way to stop a server: a clean shutdown, exit 0.
        await check_backend()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(provider.serve, config, host, port)
                diag.note(f"Events API on {url} ({events_backend} backend); Ctrl-C stops")
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        diag.note("stopped")

    from hypercorn.utils import LifespanFailureError

    from busevents import single_error

    try:
        with single_error():
            trio.run(main)
    except (provider.BackendUnavailable, LifespanFailureError) as exc:
        diag.error(f"cannot start: {exc}")
        return EXIT_FAILURE
    except OSError as exc:
        diag.error(f"cannot listen on {addr}: {exc.strerror or exc}")
        return EXIT_FAILURE
    return EXIT_OK


__all__ = ["provider_module", "secret", "serve"]
