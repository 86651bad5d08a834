"""``serve``, ``dev-token`` and ``demo``: the reference provider from the command line.

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


def _provider() -> ModuleType:
    try:
        from .. import provider
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    return provider


def _secret() -> bytes:
    value = os.environ.get(SECRET_ENV, "")
    if not value:
        raise UsageError(
            f"{SECRET_ENV} is not set: the provider signs and checks tokens with it; e.g. "
            f"export {SECRET_ENV}=\"$(python3 -c 'import secrets; print(secrets.token_hex(32))')\""
        )
    try:
        secret: bytes = _provider().secret_from_env(value)
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
    provider = _provider()
    secret = _secret()
    g = current()
    diag = g.diagnostics()
    options = {}
    if policy is not None:
        try:
            options["policy"] = provider.ScopePolicy.from_file(policy)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--policy {policy}: {exc}") from None
    from .._config import parse_duration
    from .._errors import ConfigError

    try:
        keepalive_s = parse_duration(keepalive)
    except ConfigError as exc:
        raise UsageError(f"--keepalive: {exc}") from None
    try:
        config = provider.ProviderConfig(
            secret=secret,
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

    try:
        trio.run(main)
    except BaseException as exc:
        from ._commands import _sole_leaf

        leaf = _sole_leaf(exc)
        if isinstance(leaf, OSError):
            diag.error(f"cannot listen on {addr}: {leaf.strerror or leaf}")
            return EXIT_FAILURE
        raise
    return EXIT_OK


@app.command(name="dev-token")
def dev_token(
    *,
    subject: Annotated[str, Parameter(help="Token subject: the identity (JWT sub).")] = "dev",
    scope: Annotated[str, Parameter(help="Space-separated scopes.")] = "events:send events:listen",
    audience: Annotated[
        Literal["ai.hg.fi/api", "ai.hg.fi/internal"],
        Parameter(help="api: an end user; internal: a trusted service."),
    ] = "ai.hg.fi/api",
    ttl: Annotated[str, Parameter(help="Lifetime, Go syntax.")] = "1h",
    write: Annotated[
        bool,
        Parameter(
            negative="",
            help="Write the token to auth/api-token under the Bus config root "
            "(mode 600) instead of printing it.",
        ),
    ] = False,
) -> int:
    """Mint a development token for the reference provider (HS256, $BUS_API_JWT_SECRET).

    Example: export BUS_API_TOKEN="$(bus-events dev-token --scope 'events:send events:listen')"
    """
    from .._config import config_root, parse_duration
    from .._errors import ConfigError

    try:
        seconds = parse_duration(ttl)
    except ConfigError as exc:
        raise UsageError(f"--ttl: {exc}") from None
    token: str = _provider().mint_token(
        _secret(), subject=subject, scopes=scope, audience=audience, ttl=seconds
    )
    g = current()
    if write:
        path = config_root() / "auth" / "api-token"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        os.chmod(path, 0o600)
        g.diagnostics().note(f"wrote a token for {subject!r} ({scope}) to {path}")
        return EXIT_OK
    results = g.results()
    results.open()
    results.write(token.encode() + b"\n")
    results.close()
    return EXIT_OK


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
    from ._demo import run_demo

    g = current()
    if count < 1:
        raise UsageError("--count must be at least 1")
    _provider()
    try:
        return run_demo(g, name, count)
    except KeyboardInterrupt:
        return 130


__all__ = ["demo", "dev_token", "serve"]
