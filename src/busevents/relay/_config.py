"""Relay routes from a TOML file, for running several routes as one service.

::

    [[route]]
    id = "laptop-to-dev"
    from_url = "http://127.0.0.1:8081"
    to_url = "http://127.0.0.1:8082"
    names = ["example.ping", "example.job"]
    environment_id = "laptop"
    state_file = "laptop-to-dev.json"          # relative to this file's folder
    from_token_file = "~/.config/bus/laptop-service-token"
    to_token_file = "~/.config/bus/dev-service-token"

Tokens never go in this file, only the paths of token files.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Final

from .._errors import ConfigError
from ._engine import RelayRoute

__all__ = ["load_relay_routes"]

_REQUIRED: Final = ("from_url", "to_url", "names", "environment_id", "state_file")
_OPTIONAL: Final = ("id", "from_token_file", "to_token_file")
#: Largest config read (a route takes a few hundred bytes).
_MAX_CONFIG = 4 * 1024 * 1024


def load_relay_routes(path: str | Path) -> list[RelayRoute]:
    """The ``[[route]]`` tables of the TOML file ``path``.

    Relative ``state_file`` and token file paths are taken from the file's
    folder.  Raises :class:`ConfigError` naming the file, the route and the key
    for a missing or unknown key, a wrong type, or a token value in the file.
    """
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO must not block the open (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(
                    f"the relay config {path} is not a regular file (a directory, FIFO, "
                    "socket or device)"
                )
            data = tomllib.loads(fh.read(_MAX_CONFIG + 1).decode("utf-8", "replace"))
    except OSError as exc:
        raise ConfigError(f"cannot read the relay config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    unknown = set(data) - {"route"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key {sorted(unknown)[0]!r}; expected [[route]] tables"
        )
    tables = data.get("route")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: no routes: add at least one [[route]] table")
    routes = [_route(path, number, table) for number, table in enumerate(tables, 1)]
    seen: dict[Path, int] = {}
    for number, route in enumerate(routes, 1):
        if route.state_file in seen:
            raise ConfigError(
                f"{path}: routes {seen[route.state_file]} and {number} share the state file "
                f"{route.state_file}; each route needs its own"
            )
        seen[route.state_file] = number
    return routes


def _route(path: Path, number: int, table: Any) -> RelayRoute:
    where = f"{path}: route {number}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    if isinstance(table.get("id"), str):
        where += f" ({table['id']})"
    for key in table:
        if key not in _REQUIRED and key not in _OPTIONAL:
            if "token" in key:
                raise ConfigError(
                    f"{where}: {key!r}: tokens never go in the config file; "
                    "give from_token_file / to_token_file paths"
                )
            raise ConfigError(
                f"{where}: unknown key {key!r}; known: {', '.join(_REQUIRED + _OPTIONAL)}"
            )
    for key in _REQUIRED:
        if key not in table:
            raise ConfigError(f"{where}: missing {key}")
    names = table["names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: names must be a non-empty list of event names")
    for key in (*_REQUIRED, *_OPTIONAL):
        if key != "names" and key in table and not isinstance(table[key], str):
            raise ConfigError(f"{where}: {key} must be a string")
    base = path.parent

    def local(value: str | None) -> str | None:
        return None if value is None else str(base / Path(value).expanduser())

    try:
        return RelayRoute(
            from_url=table["from_url"],
            to_url=table["to_url"],
            names=tuple(names),
            state_file=Path(local(table["state_file"]) or ""),
            environment_id=table["environment_id"],
            from_token_file=local(table.get("from_token_file")),
            to_token_file=local(table.get("to_token_file")),
            id=table.get("id"),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
