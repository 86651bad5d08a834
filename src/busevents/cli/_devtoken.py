"""``dev-token``: mint a development token for the reference provider."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from cyclopts import Parameter

from ._base import EXIT_FAILURE, EXIT_OK, Duration, app, current
from ._serve import provider_module, secret

__all__ = ["dev_token"]


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, mode 600, atomically; never through a symlink.

    The new file is written beside ``path`` and renamed over it, so a symlink
    there would be replaced, not followed (the caller refuses symlinks first).
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(prefix=".api-token-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:  # mkstemp: mode 600, O_EXCL
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


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
        if path.is_symlink():
            # Someone else's file may be behind it: never write through it.
            g.diagnostics().error(f"{path} is a symbolic link; remove it, then write again")
            return EXIT_FAILURE
        _write_private(path, token + "\n")
        g.diagnostics().note(f"wrote a token for {subject!r} ({scope}) to {path}")
        return EXIT_OK
    results = g.results()
    results.open()
    results.write(token.encode() + b"\n")
    results.close()
    return EXIT_OK
