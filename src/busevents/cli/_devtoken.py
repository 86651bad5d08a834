"""``dev-token``: mint a development token for the reference provider."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from cyclopts import Parameter

from ._app import EXIT_OK, Duration, app, current
from ._serve import provider_module, secret

__all__ = ["dev_token"]

_ONE_HOUR = Duration(3600.0)


@app.command(name="dev-token")
def dev_token(
    *,
    subject: Annotated[str, Parameter(help="Token subject: the identity (JWT sub).")] = "dev",
    scope: Annotated[str, Parameter(help="Space-separated scopes.")] = "events:send events:listen",
    audience: Annotated[
        Literal["ai.hg.fi/api", "ai.hg.fi/internal"],
        Parameter(help="api: an end user; internal: a trusted service."),
    ] = "ai.hg.fi/api",
    ttl: Annotated[Duration, Parameter(help="Lifetime, Go syntax.")] = _ONE_HOUR,
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
    from busevents import config_root

    token: str = provider_module().mint_token(
        secret(), subject=subject, scopes=scope, audience=audience, ttl=float(ttl)
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
