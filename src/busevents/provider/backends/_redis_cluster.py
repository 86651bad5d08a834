"""Redis Cluster addresses for the ``redis`` backend: parsing, location, the client.

``redis+cluster://[user:password@]host:port[,host:port…]`` (``rediss+cluster://``
for TLS) names one or more nodes of a cluster; coredis' cluster client asks them
for the slot map and talks to every master.  The backend keeps each name's keys
on one slot with a hash tag (``…s:{name}``), so its Lua script touches one node.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import coredis
from coredis.typing import Node

__all__ = ["check_cluster", "cluster_client", "cluster_location", "is_cluster"]

_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}


def is_cluster(addr: str) -> bool:
    """Whether ``addr`` names a Redis Cluster (``redis+cluster://`` / ``rediss+cluster://``)."""
    scheme, sep, _ = addr.partition("://")
    return bool(sep) and scheme.lower() in _SCHEMES


def _parse(addr: str) -> tuple[bool, str | None, str | None, list[tuple[str, int]]]:
    """``(tls, username, password, nodes)`` of a cluster address; ``ValueError`` if malformed."""
    scheme, _, rest = addr.partition("://")
    tls = _SCHEMES[scheme.lower()]
    rest = rest.split("/", 1)[0].split("?", 1)[0]
    userinfo, at, hosts = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes: list[tuple[str, int]] = []
    for part in hosts.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
            raise ValueError(
                f"Redis Cluster node {part.strip()!r}: expected HOST:PORT, e.g. "
                "redis+cluster://10.0.0.1:7000,10.0.0.2:7000"
            )
        nodes.append((host.strip("[]"), int(port)))
    return tls, username, password, nodes


def check_cluster(addr: str) -> None:
    """Raise ``ValueError`` (saying what to write) when ``addr`` is a malformed cluster address."""
    _parse(addr)


def cluster_location(addr: str) -> str:
    """The nodes of a cluster address, without any credentials: ``cluster host:port,…``."""
    try:
        nodes = _parse(addr)[3]
    except ValueError:
        return "cluster (an invalid address)"
    return "cluster " + ",".join(f"{host}:{port}" for host, port in nodes)


def cluster_client(addr: str, common: dict[str, Any]) -> coredis.RedisCluster[bytes]:
    """A (not yet entered) cluster client for ``addr``; ``common`` holds timeouts and policy.

    A password in ``common`` (from ``BUS_EVENTS_REDIS_PASSWORD``) wins over one in the URL.
    """
    tls, username, password, nodes = _parse(addr)
    options = dict(common)
    if username is not None:
        options.setdefault("username", username)
    if password is not None:
        options.setdefault("password", password)
    return coredis.RedisCluster(
        startup_nodes=[Node(host=host, port=port) for host, port in nodes],
        ssl=tls,
        **options,
    )
