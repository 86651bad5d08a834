"""The ``postgres`` backend: events in a PostgreSQL table, shared by every provider process.

Tables (created when missing, in one transaction under an advisory lock, so
several processes may start at once; nothing to migrate by hand), in the
connection's current schema:

* ``bus_events(seq, ms, name, identity_id, body)`` — ``seq`` is the global order;
  the event id is ``<ms>-<seq>``, where ``ms`` never goes backwards, so ids are
  strictly increasing as ``(ms, seq)`` pairs.  ``body`` is the envelope
  without its id (the line is rebuilt around the id).
* ``bus_event_group_cursors(name, owner, grp, last_seq, updated_at)`` — one row
  per unicast group: the last event handed to one of its consumers.  It is
  durable, so a group resumes where it stopped after every process restarted;
  a row nobody used for ``group_idle`` seconds is deleted.

Semantics:

* **Publish** inserts under a transaction-scoped advisory lock and sends
  ``NOTIFY`` in the same transaction; the ``202`` is sent after the commit.  The
  lock makes commit order equal ``seq`` order, so a reader that has seen
  ``seq = n`` can never later find a smaller one committed (no gaps).
* **Follow**: each process runs one reader per followed name (see
  :mod:`busevents.provider._hub`) that reads ``seq > position`` for the name and
  fans the rows out to every local stream of it, each through a buffer bounded
  in events and bytes (slow consumers are cut, as on memory).  Each process has
  one ``LISTEN`` connection that wakes its readers, and a reader looks anyway
  every ``poll_interval`` seconds, so a lost notification delays and never loses.
* **Unicast** groups are claimed by one claimer per group and process, which
  moves the group's cursor with ``SELECT … FOR UPDATE`` in one transaction: each
  event goes to one consumer of the group, on whatever process (at most once,
  as in memory).  Groups are bounded in all and per owner (``429``), counted in
  the cursor table under an advisory lock.
* **Replay** reads in pages of a bounded number of bytes, each read when the
  previous one was sent.
* **History** keeps the newest ``history_limit`` rows (trimmed as events arrive).

Driver: psycopg 3 with *synchronous* connections from a small
``psycopg_pool.ConnectionPool``, each call run in a worker thread with
``trio.to_thread.run_sync``.  psycopg's async API is built on asyncio and does
not run under trio; the sync API in threads is what psycopg itself supports
everywhere, and a short query per thread hop costs little next to its round trip.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import psycopg
import psycopg.conninfo
import psycopg_pool
import trio
from psycopg import sql

from .._config import PostgresOptions
from .._hub import Fanout, Feeds, Groups, HubSubscriptions
from .._idempotency import (
    POSTGRES_PRUNE,
    POSTGRES_REMEMBER,
    POSTGRES_SCHEMA,
    POSTGRES_SEEN,
    Replayed,
    accepted_body,
)
from ._base import (
    BackendLimit,
    BackendUnavailable,
    Draft,
    IdClock,
    PageSize,
    Selector,
    StoredEvent,
    encode_envelope_tail,
    splice_id,
)
from ._postgres_groups import create_group, group_key, keep_groups

__all__ = ["PostgresBackend", "postgres_location"]

_log = logging.getLogger("busevents.provider")
# The pool logs a warning per failed reconnection attempt; our own 503s and stream
# errors already say that the database is gone, once per request.
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
_T = TypeVar("_T")

_CONNECT_TIMEOUT = 5.0
#: Rows kept for followers even when ``history_limit`` is smaller (replay honours the limit).
_MIN_RETAIN = 1000
_TRIM_EVERY = 256
_LOCK_SCHEMA = 0x6275_7365  # "buse": serialises CREATE TABLE across processes
_LOCK_PUBLISH = 0x6275_7370  # "busp": serialises inserts so commit order is seq order
#: Rows one reader takes per query (shared by every local stream of the name) at
#: most, and the bytes it aims at (the count follows the events' mean size).
_READ_COUNT = 256
_READ_BYTES = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bus_events (
    seq bigint PRIMARY KEY,
    ms bigint NOT NULL,
    name text NOT NULL,
    identity_id text NOT NULL,
    body bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS bus_events_name_seq ON bus_events (name, seq);
CREATE TABLE IF NOT EXISTS bus_event_group_cursors (
    name text NOT NULL,
    owner text NOT NULL,
    grp text NOT NULL,
    last_seq bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, owner, grp)
);
"""

_INSERT = """
WITH last AS (SELECT seq, ms FROM bus_events ORDER BY seq DESC LIMIT 1)
INSERT INTO bus_events (seq, ms, name, identity_id, body)
SELECT coalesce((SELECT seq FROM last), 0) + 1,
       greatest((extract(epoch FROM clock_timestamp()) * 1000)::bigint,
                coalesce((SELECT ms FROM last), 0)),
       %s, %s, %s
RETURNING seq, ms
"""


def postgres_location(dsn: str) -> str:
    """``host:port/dbname`` of a DSN, without any credentials."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(an invalid DSN)"
    host = str(info.get("host") or "localhost")
    port = str(info.get("port") or 5432)
    return f"{host}:{port}/{info.get('dbname') or ''}"


def _row_event(name: str, row: tuple[Any, ...]) -> StoredEvent:
    seq, ms, identity, body = row
    event_id = f"{ms}-{seq}"
    return StoredEvent(seq, event_id, name, identity, "", splice_id(event_id, bytes(body)))


class PostgresBackend(HubSubscriptions):
    """Events in PostgreSQL; see the module docstring for tables and semantics.

    Not connected until :meth:`running` is entered (the app's lifespan does it).
    """

    def __init__(
        self,
        options: PostgresOptions,
        *,
        history_limit: int = 100_000,
        listener_queue: int = 10_000,
        listener_queue_bytes: int = 8 << 20,
        max_groups: int = 1_000,
        max_groups_per_identity: int = 20,
        group_idle: float = 600.0,
        idempotency_window: float = 24 * 3600.0,
    ) -> None:
        self._options = options
        self._max_groups = max_groups
        self._max_groups_per_owner = max_groups_per_identity
        self._group_idle = group_idle
        self.fanout = Fanout(listener_queue, listener_queue_bytes)
        self._read_size = PageSize(_READ_BYTES, _READ_COUNT, first=8)
        self._feeds = Feeds(self.fanout, self)
        self._groups = Groups(self._feeds, self, poll=options.poll_interval)
        self._window = idempotency_window
        self._where = f"PostgreSQL at {postgres_location(options.dsn)}"
        self._history_limit = history_limit
        self._retain = max(history_limit, _MIN_RETAIN)
        self._clock = IdClock()
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] | None = None
        self._channel = "bus_events"
        self._wakeups: dict[str, trio.Event] = {}
        self._published = 0

    def _unavailable(self, exc: BaseException) -> BackendUnavailable:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return BackendUnavailable(
            f"{self._where} is unavailable ({type(exc).__name__}: {text[:200]})"
        )

    async def _run(self, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """Run ``fn(conn)`` in a worker thread inside one transaction of a pooled connection."""
        pool = self._pool
        if pool is None:
            raise BackendUnavailable(f"{self._where} is not connected")

        def work() -> _T:
            with pool.connection(timeout=_CONNECT_TIMEOUT) as conn:
                return fn(conn)

        try:
            return await trio.to_thread.run_sync(work)
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
            raise self._unavailable(exc) from None

    # -- lifecycle -----------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Connect, create the tables if missing, and listen for wake-ups until exit."""
        pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = psycopg_pool.ConnectionPool(
            self._options.dsn,
            min_size=1,
            max_size=self._options.pool_size,
            open=False,
            timeout=_CONNECT_TIMEOUT,
            kwargs={"connect_timeout": int(_CONNECT_TIMEOUT)},
            name="bus-events",
        )
        try:
            # One direct connection first: its error says why (refused, auth, no database),
            # where the pool would only time out.
            await trio.to_thread.run_sync(self._probe)
            await trio.to_thread.run_sync(partial(pool.open, wait=True, timeout=_CONNECT_TIMEOUT))
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
            await trio.to_thread.run_sync(pool.close)
            raise self._unavailable(exc) from None
        self._pool = pool
        stop = threading.Event()
        try:
            self._channel = await self._run(self._create_tables)
            async with self._feeds.running(), trio.open_nursery() as nursery:
                nursery.start_soon(self._listen, stop)
                nursery.start_soon(self._keep_groups)
                try:
                    yield
                finally:
                    stop.set()
                    nursery.cancel_scope.cancel()
        finally:
            self._pool = None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(partial(pool.close, timeout=1.0))

    def _probe(self) -> None:
        with psycopg.connect(self._options.dsn, connect_timeout=int(_CONNECT_TIMEOUT)):
            pass

    @staticmethod
    def _create_tables(conn: psycopg.Connection[Any]) -> str:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_SCHEMA,))
            conn.execute(_SCHEMA)
            conn.execute(POSTGRES_SCHEMA)
            row = conn.execute("SELECT current_schema()").fetchone()
        schema = str(row[0]) if row else "public"
        return f"bus_events_{schema}"[:63]

    async def ping(self) -> None:
        """Return when PostgreSQL answers ``SELECT 1``; raise :class:`BackendUnavailable`."""
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    # -- wake-ups ------------------------------------------------------------

    def _wake(self, name: str) -> None:
        event = self._wakeups.pop(name, None)
        if event is not None:
            event.set()

    def _wake_all(self) -> None:
        wakeups, self._wakeups = self._wakeups, {}
        for event in wakeups.values():
            event.set()

    async def _listen(self, stop: threading.Event) -> None:
        token = trio.lowlevel.current_trio_token()

        def loop() -> None:
            while not stop.is_set():
                try:
                    with psycopg.connect(
                        self._options.dsn, autocommit=True, connect_timeout=int(_CONNECT_TIMEOUT)
                    ) as conn:
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                        # Anything sent while we were not listening: let readers look.
                        trio.from_thread.run_sync(self._wake_all, trio_token=token)
                        while not stop.is_set():
                            for note in conn.notifies(timeout=0.5):
                                trio.from_thread.run_sync(
                                    self._wake, note.payload, trio_token=token
                                )
                except (psycopg.Error, OSError):
                    # Readers poll meanwhile; try again shortly.
                    stop.wait(self._options.poll_interval)
                except trio.RunFinishedError:
                    return

        # Abandoned on cancel: the loop sees ``stop`` within half a second and exits.
        await trio.to_thread.run_sync(loop, abandon_on_cancel=True)

    async def _wait(self, name: str, event: trio.Event) -> None:
        with trio.move_on_after(self._options.poll_interval):
            await event.wait()

    def _wakeup(self, name: str) -> trio.Event:
        event = self._wakeups.get(name)
        if event is None:
            event = self._wakeups[name] = trio.Event()
        return event

    # -- publish -------------------------------------------------------------

    async def publish(self, draft: Draft, idempotency_key: str | None = None) -> StoredEvent:
        """Insert the event and ``NOTIFY`` in one transaction; return it after the commit.

        With ``idempotency_key``, the key's row is inserted in the same transaction
        (under the same lock); a key seen within the window stores nothing and
        raises :class:`Replayed` with the original ``202`` body.
        """
        _, stamp = self._clock.next()
        tail = encode_envelope_tail(draft, stamp)
        self._published += 1
        trim = self._published % _TRIM_EVERY == 0
        key, identity = idempotency_key, draft.identity_id

        def insert(conn: psycopg.Connection[Any]) -> tuple[int, int, bytes | None]:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_PUBLISH,))
                if key is not None:
                    seen = conn.execute(POSTGRES_SEEN, (identity, key)).fetchone()
                    if seen is not None:
                        return 0, 0, bytes(seen[0])
                row = conn.execute(_INSERT, (draft.name, identity, tail)).fetchone()
                assert row is not None
                if key is not None:
                    event_id = f"{row[1]}-{row[0]}"
                    body = accepted_body(event_id, draft.name, draft.correlation_id, stamp)
                    conn.execute(POSTGRES_REMEMBER, (identity, key, body, self._window))
                conn.execute("SELECT pg_notify(%s, %s)", (self._channel, draft.name))
            if trim:
                conn.execute("DELETE FROM bus_events WHERE seq <= %s", (row[0] - self._retain,))
                conn.execute(POSTGRES_PRUNE)
                conn.commit()
            return int(row[0]), int(row[1]), None

        seq, ms, replayed = await self._run(insert)
        if replayed is not None:
            raise Replayed(replayed)
        event_id = f"{ms}-{seq}"
        return StoredEvent(
            seq, event_id, draft.name, draft.identity_id, stamp, splice_id(event_id, tail)
        )

    # -- read ----------------------------------------------------------------

    # -- read ----------------------------------------------------------------

    async def replay(
        self, selector: Selector, page_bytes: int
    ) -> AsyncGenerator[list[StoredEvent], None]:
        """The retained events of the name (and owner), oldest first, in pages.

        The newest ``history_limit`` events in all are retained, as memory keeps
        them; each query asks for as many rows as fit ``page_bytes`` at the sizes
        seen so far (one at first).
        """
        if self._history_limit == 0:
            await trio.lowlevel.checkpoint()
            return
        name, owner = selector.name, selector.identity
        row = await self._run(
            lambda conn: conn.execute("SELECT coalesce(max(seq), 0) FROM bus_events").fetchone()
        )
        end = int(row[0]) if row else 0
        position = end - self._history_limit
        size = PageSize(page_bytes, _READ_COUNT)
        while True:

            def query(
                conn: psycopg.Connection[Any], after: int = position, limit: int = size.count()
            ) -> list[tuple[Any, ...]]:
                return conn.execute(
                    "SELECT seq, ms, identity_id, body FROM bus_events"
                    " WHERE name = %s AND (%s::text IS NULL OR identity_id = %s)"
                    " AND seq > %s AND seq <= %s ORDER BY seq LIMIT %s",
                    (name, owner, owner, after, end, limit),
                ).fetchall()

            count = size.count()
            rows = await self._run(query)
            if not rows:
                return
            page = [_row_event(name, row) for row in rows]
            del rows
            size.saw(page)
            position = page[-1].seq
            yield page
            if len(page) < count:
                return

    # -- the hub's reads (see busevents.provider._hub) ----------------------------

    async def end(self, name: str) -> int:
        """The newest ``seq`` (of any name): a new reader of ``name`` starts after it."""
        row = await self._run(
            lambda conn: conn.execute("SELECT coalesce(max(seq), 0) FROM bus_events").fetchone()
        )
        return int(row[0]) if row else 0

    async def read(self, name: str, position: int) -> tuple[list[StoredEvent], int]:
        """Rows of ``name`` after ``position``; waits for a wake-up (or the poll) when none."""
        # Taken before the query: a NOTIFY after it sets this event, never lost.
        wakeup = self._wakeup(name)
        count = self._read_size.count()

        def query(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return conn.execute(
                "SELECT seq, ms, identity_id, body FROM bus_events"
                " WHERE name = %s AND seq > %s ORDER BY seq LIMIT %s",
                (name, position, count),
            ).fetchall()

        with trio.CancelScope(shield=True):
            rows = await self._run(query)
        if not rows:
            await self._wait(name, wakeup)
            return [], position
        events = [_row_event(name, row) for row in rows]
        self._read_size.saw(events)
        await trio.lowlevel.checkpoint()
        return events, events[-1].seq

    async def claim(self, selector: Selector, limit: int) -> list[StoredEvent]:
        """Move the group's cursor past its next events in one transaction; those events."""
        key = group_key(selector)
        owner = selector.identity

        def claim(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            with conn.transaction():
                cursor = conn.execute(
                    "SELECT last_seq FROM bus_event_group_cursors"
                    " WHERE name = %s AND owner = %s AND grp = %s FOR UPDATE",
                    key,
                ).fetchone()
                if cursor is None:
                    # The row was freed behind our back: start again from now.
                    conn.execute(
                        "INSERT INTO bus_event_group_cursors (name, owner, grp, last_seq)"
                        " SELECT %s, %s, %s, coalesce(max(seq), 0) FROM bus_events"
                        " ON CONFLICT DO NOTHING",
                        key,
                    )
                    return []
                rows = conn.execute(
                    "SELECT seq, ms, identity_id, body FROM bus_events"
                    " WHERE name = %s AND seq > %s AND (%s::text IS NULL OR identity_id = %s)"
                    " ORDER BY seq LIMIT %s",
                    (key[0], cursor[0], owner, owner, limit),
                ).fetchall()
                if rows:
                    conn.execute(
                        "UPDATE bus_event_group_cursors SET last_seq = %s, updated_at = now()"
                        " WHERE name = %s AND owner = %s AND grp = %s",
                        (rows[-1][0], *key),
                    )
                return rows

        with trio.CancelScope(shield=True):
            rows = await self._run(claim)
        return [_row_event(selector.name, row) for row in rows]

    # -- subscribe -----------------------------------------------------------

    async def _open_group(self, selector: Selector) -> None:
        key = group_key(selector)
        total, per_owner = self._max_groups, self._max_groups_per_owner
        refusal = await self._run(partial(create_group, key=key, total=total, per_owner=per_owner))
        if refusal is not None:
            raise BackendLimit(refusal)

    async def _keep_groups(self) -> None:
        """Mark this process's groups as used, and delete groups idle for ``group_idle``."""
        every = min(self._group_idle / 3, 10.0)
        while True:
            await trio.sleep(every)
            keys = [group_key(selector) for selector in self._groups.active()]
            with contextlib.suppress(BackendUnavailable):
                await self._run(partial(keep_groups, keys=keys, idle=self._group_idle))

    # -- introspection -------------------------------------------------------

    def readers(self) -> int:
        """Name readers running in this process."""
        return self._feeds.readers()
