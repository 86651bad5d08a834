"""``serve``: the reference provider from the command line.

The provider's packages (hypercorn, PyJWT, the backends' drivers) are imported
only here, inside the command, so the client commands never load them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated, Any, Literal

from cyclopts import Parameter

from ._base import EXIT_FAILURE, EXIT_OK, Duration, UsageError, app, current

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import ModuleType

    from busevents.provider import ProviderConfig

    from ._output import Diagnostics

SECRET_ENV = "BUS_API_JWT_SECRET"
REDIS_ADDR_ENV = "BUS_EVENTS_REDIS_ADDR"
REDIS_PASSWORD_ENV = "BUS_EVENTS_REDIS_PASSWORD"
REDIS_PREFIX_ENV = "BUS_EVENTS_REDIS_PREFIX"
POSTGRES_DSN_ENV = "BUS_EVENTS_POSTGRES_DSN"
IDEMPOTENCY_WINDOW_ENV = "BUS_EVENTS_IDEMPOTENCY_WINDOW"

# Option defaults (module-level: a default is built once, not per call).
_KEEPALIVE, _GROUP_IDLE = Duration(15.0), Duration(600.0)
_SHUTDOWN_GRACE, _BODY_TIMEOUT = Duration(3.0), Duration(10.0)


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
    redis_cluster: Annotated[
        bool,
        Parameter(
            negative="",
            help="The Redis address is a Redis Cluster node (or several, comma-separated); "
            "same as a redis+cluster:// address.",
        ),
    ] = False,
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
        Duration,
        Parameter(help="Silence after which a following stream writes a blank line; 0 disables."),
    ] = _KEEPALIVE,
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
        int, Parameter(help="Bytes buffered per listener or unicast group (fuller: cut).")
    ] = 8 << 20,
    max_groups: Annotated[
        int, Parameter(help="Unicast groups held at most, all processes (more: 429).")
    ] = 1_000,
    max_groups_per_identity: Annotated[
        int, Parameter(help="Unicast groups per identity at most (more: 429).")
    ] = 20,
    group_idle: Annotated[
        Duration,
        Parameter(help="Free a unicast group idle (no consumer) this long, keys/rows included."),
    ] = _GROUP_IDLE,
    replay_page_bytes: Annotated[
        int, Parameter(help="Bytes of history one replay reads and holds at a time.")
    ] = 1 << 20,
    replay_bytes: Annotated[
        int, Parameter(help="Bytes of history pages all replays hold together at most.")
    ] = 64 << 20,
    shutdown_grace: Annotated[
        Duration,
        Parameter(
            help="On SIGTERM/SIGINT: time open connections get to finish after the "
            "streams end; then they are closed. A second signal stops at once."
        ),
    ] = _SHUTDOWN_GRACE,
    body_timeout: Annotated[
        Duration, Parameter(help="Time a publish body may take to arrive (slower: 408).")
    ] = _BODY_TIMEOUT,
    metrics_addr: Annotated[
        str | None,
        Parameter(
            help="Serve GET /metrics (Prometheus), /healthz and /readyz on this HOST:PORT "
            "too; keep it where only operators reach. Off by default."
        ),
    ] = None,
    idempotency_window: Annotated[
        Duration | None,
        Parameter(
            help="How long a publish's Idempotency-Key is remembered: a retry within it is "
            f"stored once [env {IDEMPOTENCY_WINDOW_ENV}; 24h]."
        ),
    ] = None,
    workers: Annotated[
        int,
        Parameter(
            help="Worker processes serving --addr together (SO_REUSEPORT; a dead one is "
            "restarted). More than 1 needs --events-backend redis or postgres."
        ),
    ] = 1,
    idempotency_keys: Annotated[
        int, Parameter(help="Memory backend: idempotency keys remembered at most (oldest first).")
    ] = 100_000,
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

    Redis's password is read from $BUS_EVENTS_REDIS_PASSWORD only (never a flag).
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
    provider = provider_module()
    secret_key = secret()
    diag = g.diagnostics()
    options = {}
    if policy is not None:
        try:
            options["policy"] = provider.ScopePolicy.from_file(policy)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--policy {policy}: {exc}") from None
    env = os.environ
    _idempotency_options(options, idempotency_window, env)
    redis_addr = _cluster_addr(redis_addr or env.get(REDIS_ADDR_ENV), redis_cluster)
    options["redis"] = provider.RedisOptions(
        addr=redis_addr or "127.0.0.1:6379",
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
            keepalive=float(keepalive) or None,
            max_body_bytes=max_body,
            listener_queue=listener_queue,
            history_limit=history,
            history_bytes=history_bytes,
            listener_queue_bytes=listener_queue_bytes,
            max_groups=max_groups,
            max_groups_per_identity=max_groups_per_identity,
            group_idle=float(group_idle),
            replay_page_bytes=replay_page_bytes,
            replay_bytes=replay_bytes,
            shutdown_grace=float(shutdown_grace),
            body_timeout=float(body_timeout),
            idempotency_keys=idempotency_keys,
            **options,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    if workers < 1:
        raise UsageError(f"--workers {workers}: expected 1 or more processes")
    if workers > 1:
        from ._serve_workers import check_workers, supervise

        check_workers(workers, events_backend)
        label = f"{events_backend} backend, {workers} workers"
        return supervise(workers, config, (host, port), metrics, label, diag)
    return serve_once(config, (host, port), metrics, f"{events_backend} backend", diag)


def serve_once(
    config: ProviderConfig,
    addr: tuple[str, int],
    metrics: tuple[str, int] | None,
    label: str,
    diag: Diagnostics,
    *,
    reuse_port: bool = False,
    ready: Callable[[str], None] | None = None,
) -> int:
    """Run one provider process until SIGINT/SIGTERM; its exit status.

    ``ready`` is called with the events URL once it listens (``serve --workers``
    tells its supervisor so); ``reuse_port`` shares the address with other processes.
    """
    import signal

    import trio

    provider = provider_module()
    host, port = addr
    try:
        backend = provider.make_backend(config)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    async def check_backend() -> None:
        # Fail at once, in one line, rather than from inside the server's startup.
        async with backend.running():
            pass

    async def main() -> None:
        # SIGINT/SIGTERM are the normal way to stop a server: a clean shutdown within
        # the grace period whatever the peers do, exit 0.  A second signal: at once.
        await check_backend()
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
                        reuse_port=reuse_port,
                        task_status=task_status,
                    )
                    nursery.cancel_scope.cancel()  # stopped: no more signals to wait for

                url = await nursery.start(run)
                if ready is not None:
                    ready(url)
                diag.note(f"Events API on {url} ({label}); Ctrl-C stops")
                if metrics is not None:
                    mhost = f"[{metrics[0]}]" if ":" in metrics[0] else metrics[0]
                    diag.note(f"metrics on http://{mhost}:{metrics[1]}/metrics")
                async for _ in signals:
                    if shutdown.is_set():
                        nursery.cancel_scope.cancel()
                        break
                    grace = Duration(config.shutdown_grace)
                    diag.note(f"stopping (at most {grace}; a second signal stops now)")
                    shutdown.set()
        diag.note("stopped")

    from busevents import single_error

    try:
        with single_error():
            trio.run(main)
    except provider.BackendUnavailable as exc:
        diag.error(f"cannot start: {exc}")
        return EXIT_FAILURE
    except OSError as exc:
        diag.error(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
        return EXIT_FAILURE
    return EXIT_OK


def _idempotency_options(
    options: dict[str, Any], window: Duration | None, env: Mapping[str, str]
) -> None:
    """``idempotency_window`` from the option, else from its variable (a usage error if bad)."""
    from busevents import ConfigError, parse_duration

    if window is None and env.get(IDEMPOTENCY_WINDOW_ENV):
        try:
            window = Duration(parse_duration(env[IDEMPOTENCY_WINDOW_ENV]))
        except ConfigError as exc:
            raise UsageError(f"{IDEMPOTENCY_WINDOW_ENV}: {exc}") from None
    if window is not None:
        options["idempotency_window"] = float(window)


def _cluster_addr(addr: str | None, cluster: bool) -> str | None:
    """``addr`` as a ``redis+cluster://`` address when ``--redis-cluster`` is given."""
    addr = addr or ("127.0.0.1:6379" if cluster else None)
    if (
        not cluster
        or addr is None
        or addr.lower().startswith(("redis+cluster://", "rediss+cluster://"))
    ):
        return addr
    if addr.startswith(("redis://", "rediss://")):
        scheme, _, rest = addr.partition("://")
        return f"{scheme}+cluster://{rest}"
    return "redis+cluster://" + addr


__all__ = ["provider_module", "secret", "serve", "serve_once"]
