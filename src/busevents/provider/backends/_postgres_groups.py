"""The PostgreSQL backend's unicast group rows: created within the bounds, kept, freed.

One row per group in ``bus_event_group_cursors`` (see :mod:`._postgres`).  The
functions run in a worker thread on a pooled connection, each in one transaction.
"""

from __future__ import annotations

from typing import Any

import psycopg

from ._base import Selector, too_many_groups

__all__ = ["GroupKey", "create_group", "group_key", "keep_groups"]

#: ``(name, owner, group)``; the owner is ``*`` (service tokens) or ``=<identity>``.
GroupKey = tuple[str, str, str]
_LOCK_GROUPS = 0x6275_7367  # "busg": serialises group creation so the bounds hold


def group_key(selector: Selector) -> GroupKey:
    owner = "*" if selector.identity is None else "=" + selector.identity
    return selector.name, owner, selector.group


def create_group(
    conn: psycopg.Connection[Any], key: GroupKey, total: int, per_owner: int
) -> str | None:
    """Touch the group's row, or create it at the table's end; a refusal message if full."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_GROUPS,))
        touched = conn.execute(
            "UPDATE bus_event_group_cursors SET updated_at = now()"
            " WHERE name = %s AND owner = %s AND grp = %s",
            key,
        )
        if touched.rowcount:
            return None
        row = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE owner = %s) FROM bus_event_group_cursors",
            (key[1],),
        ).fetchone()
        everyone, mine = (int(row[0]), int(row[1])) if row else (0, 0)
        if everyone >= total:
            return str(too_many_groups(total, per_identity=False))
        if mine >= per_owner:
            return str(too_many_groups(per_owner, per_identity=True))
        conn.execute(
            "INSERT INTO bus_event_group_cursors (name, owner, grp, last_seq)"
            " SELECT %s, %s, %s, coalesce(max(seq), 0) FROM bus_events"
            " ON CONFLICT DO NOTHING",
            key,
        )
        return None


def keep_groups(conn: psycopg.Connection[Any], keys: list[GroupKey], idle: float) -> None:
    """Mark ``keys`` as used now, and delete every row unused for ``idle`` seconds."""
    with conn.transaction():
        for key in keys:
            conn.execute(
                "UPDATE bus_event_group_cursors SET updated_at = now()"
                " WHERE name = %s AND owner = %s AND grp = %s",
                key,
            )
        conn.execute(
            "DELETE FROM bus_event_group_cursors"
            " WHERE updated_at < now() - make_interval(secs => %s)",
            (idle,),
        )
