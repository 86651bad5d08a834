"""The relay engine: forward events of some names from one deployment to another,
exactly once, with a durable cursor, and never back to where they came from.

**Origin.**  Every forwarded event carries ``bus.origin.environment.id`` (the
environment where it was first published: the route's ``environment_id``) and
``bus.origin.event.id`` (its id there).  A route forwards only events that
originated at its source: those without ``bus.origin.environment.id`` or with
the route's own id.  An event that arrived from elsewhere is *skipped* — so
routes A→B and B→A can run together without echo.  Providers keep ``bus.*``
metadata only from service tokens: the destination token must be one (the
relay checks that the metadata survived its first publish).

**Cursors.**  Per name, the state file holds the id of the last source event
handled and the destination id of the last event forwarded.  The source is read
with ``after=<cursor>`` (the stream resumes, it does not restart).

**Exactly once.**  Events of a name are published one at a time, in source
order, and the state file is saved (atomically) only after the destination
acknowledged them — not after each one.  So after a crash the destination may
hold events the state does not know of: before forwarding, the relay reads the
destination's history of the name *after its destination cursor* and moves the
source cursor past every event with its origin found there
(:meth:`_Relay._reconcile`).  It does so on start and after every failure,
because a publish whose answer was lost may have landed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from .._client import EventsClient
from .._config import find_token, normalize_events_url
from .._contracts import Event, PublishRequest, event_id_key
from .._errors import APIError, BusEventsError, Forbidden, TransportError, Unauthorized
from .._groups import single_error
from .._retry import Backoff, RetryPolicy, is_retryable
from ._relay_state import (
    Cursor,
    RelayLock,
    RouteInfo,
    RouteState,
    public_url,
    read_state,
    utc_now,
    write_state,
)

__all__ = [
    "ORIGIN_ENVIRONMENT",
    "ORIGIN_EVENT",
    "RelayRoute",
    "import_events",
    "run_relay",
]

log = logging.getLogger("busevents.relay")

#: Metadata key: the environment where the event was first published (upstream's name).
ORIGIN_ENVIRONMENT: Final = "bus.origin.environment.id"
#: Metadata key: the event's id in its origin environment.
ORIGIN_EVENT: Final = "bus.origin.event.id"

#: Save the state at least this often (seconds) while a long backlog is forwarded.
_SAVE_EVERY = 0.5


@dataclass(frozen=True, slots=True)
class RelayRoute:
    """One route: forward ``names`` from ``from_url`` to ``to_url``.

    ``environment_id`` names the source deployment (stamped as
    ``bus.origin.environment.id``).  ``state_file`` holds cursors and counters
    (one route per file).  Token files default to the usual discovery
    (``BUS_API_TOKEN``, …); they are read again at every pass, so a rotated
    token file is picked up.  ``id`` is a label for status and logs.
    """

    from_url: str
    to_url: str
    names: tuple[str, ...]
    state_file: Path
    environment_id: str
    from_token_file: str | None = None
    to_token_file: str | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        from .._errors import ConfigError

        object.__setattr__(self, "from_url", normalize_events_url(self.from_url))
        object.__setattr__(self, "to_url", normalize_events_url(self.to_url))
        if not self.names:
            raise ConfigError("a relay route needs at least one event name")
        if not self.environment_id.strip():
            raise ConfigError("a relay route needs a non-empty environment id")
        if self.from_url == self.to_url:
            raise ConfigError(
                f"a relay route goes from one deployment to another, not to itself ({self.to_url})"
            )

    @property
    def label(self) -> str:
        return self.id or f"{public_url(self.from_url)} -> {public_url(self.to_url)}"

    def side_of(self, url: str | None) -> str | None:
        """``"source"`` or ``"destination"``: which end ``url`` (of an error) belongs to."""
        if url is None:
            return None
        if url.startswith(self.from_url):
            return "source"
        if url.startswith(self.to_url):
            return "destination"
        return None


@dataclass
class _Relay:
    route: RelayRoute
    timeout: float | None
    state: RouteState = field(init=False)
    #: The destination may hold events the state does not know of (start, after a failure).
    unsure: bool = True
    verified: bool = False
    last_save: float = 0.0
    source: EventsClient | None = None
    dest: EventsClient | None = None

    # -- state ---------------------------------------------------------------

    def load(self) -> None:
        route = self.route
        info = RouteInfo(
            public_url(route.from_url), public_url(route.to_url), route.environment_id, route.id
        )
        state = read_state(route.state_file)
        if state is None:
            state = RouteState(route=info, created=utc_now())
        else:
            old = state.route
            if (old.from_url, old.to_url, old.environment_id) != (
                info.from_url,
                info.to_url,
                info.environment_id,
            ):
                raise BusEventsError(
                    f"the relay state file {route.state_file} belongs to another route "
                    f"({old.environment_id}: {old.from_url} -> {old.to_url}); "
                    "give this route its own --state-file"
                )
            state.route = info
        state.names = sorted({*state.names, *route.names})
        self.state = state

    def save(self) -> None:
        write_state(self.route.state_file, self.state)
        self.last_save = trio.current_time()

    def record_error(self, exc: BaseException) -> None:
        self.state.last_error = str(exc)[:500]
        self.state.last_error_time = utc_now()

    # -- one pass ------------------------------------------------------------

    def _client(self, url: str, token_file: str | None) -> EventsClient:
        return EventsClient(url, find_token(token_file), timeout=self.timeout)

    async def close_clients(self) -> None:
        """Drop the connections (after a failure: the next pass connects, and reads the
        token files, afresh)."""
        for client in (self.source, self.dest):
            if client is not None:
                await client.aclose()
        self.source = self.dest = None

    async def run_pass(self) -> None:
        """Forward everything the source holds after the cursors, name by name."""
        route = self.route
        self.state.last_attempt = utc_now()
        self.state.counters.pending = 0  # what a failed pass left is read again
        if self.source is None:
            self.source = self._client(route.from_url, route.from_token_file)
        if self.dest is None:
            self.dest = self._client(route.to_url, route.to_token_file)
        source, dest = self.source, self.dest
        for name in route.names:
            if self.unsure:
                await self._reconcile(dest, name)
        self.unsure = False
        # Names are independent (a cursor each, order kept within a name): forward
        # them side by side, so that one long backlog does not hold up the others.
        with single_error():
            async with trio.open_nursery() as nursery:
                for name in route.names:
                    nursery.start_soon(self._forward, source, dest, name)
        self.state.last_success = utc_now()
        self.save()

    async def _reconcile(self, dest: EventsClient, name: str) -> None:
        """Move the cursor of ``name`` past events of ours the destination already holds."""
        cursor = self.state.cursor(name)
        best = event_id_key(cursor.source) if cursor.source else None
        found: str | None = None
        recovered = 0
        last: str | None = None
        env = self.route.environment_id
        async with dest.listen(name, replay=True, follow=False, after=cursor.destination) as stream:
            async for batch in stream.batches():
                for event in batch:
                    last = event.id
                    metadata = event.metadata
                    if not metadata or metadata.get(ORIGIN_ENVIRONMENT) != env:
                        continue
                    key = event_id_key(metadata.get(ORIGIN_EVENT, ""))
                    if key is not None and (best is None or key > best):
                        best, found = key, metadata[ORIGIN_EVENT]
                        recovered += 1
        if found is not None:
            log.info(
                "%s: %s: the destination already holds %d event(s) up to source id %s; "
                "resuming after it",
                self.route.label,
                name,
                recovered,
                found,
            )
            cursor.source = found
            self.state.counters.forwarded += recovered
        if last is not None:
            cursor.destination = last

    async def _forward(self, source: EventsClient, dest: EventsClient, name: str) -> None:
        cursor = self.state.cursor(name)
        counters = self.state.counters
        async with source.listen(name, replay=True, follow=False, after=cursor.source) as stream:
            async for batch in stream.batches():
                counters.received += len(batch)
                counters.pending += len(batch)
                for event in batch:
                    await self._forward_one(dest, event, cursor)
                    counters.pending -= 1
                    if trio.current_time() - self.last_save >= _SAVE_EVERY:
                        self.save()

    async def _forward_one(self, dest: EventsClient, event: Event, cursor: Cursor) -> None:
        env = self.route.environment_id
        metadata = dict(event.metadata or {})
        origin = metadata.get(ORIGIN_ENVIRONMENT)
        if origin is not None and origin != env:
            # It came from elsewhere: forwarding it could send it back there (echo).
            self.state.counters.skipped += 1
            cursor.source = event.id
            return
        metadata[ORIGIN_ENVIRONMENT] = env
        metadata[ORIGIN_EVENT] = event.id
        request = PublishRequest(
            name=event.name,
            payload=event.payload,
            correlation_id=event.correlation_id,
            metadata=metadata,
            identity_id=event.identity_id,
        )
        before = cursor.destination
        try:
            accepted, _ = await dest.publish(request)
        except APIError as exc:
            if is_retryable(exc) or isinstance(exc, Unauthorized | Forbidden):
                raise
            raise BusEventsError(
                f"the destination refused event {event.id} ({event.name}): {exc}; "
                "the relay stopped before it (nothing after it was forwarded)"
            ) from exc
        cursor.source = event.id
        cursor.destination = accepted.id
        self.state.counters.forwarded += 1
        if not self.verified:
            await verify_origin_kept(dest, event.name, before, accepted.id)
            self.verified = True


async def verify_origin_kept(
    dest: EventsClient, name: str, after: str | None, event_id: str
) -> None:
    """Check that the destination kept the origin metadata of event ``event_id``.

    Providers drop ``bus.*`` keys from end-user tokens; without them a restart
    could not recognise what was forwarded, so this is an error.
    """
    async with dest.listen(name, replay=True, follow=False, after=after) as stream:
        async for event in stream:
            if event.id == event_id:
                if (event.metadata or {}).get(ORIGIN_EVENT) is None:
                    raise BusEventsError(
                        f"the destination {public_url(dest.url)} dropped the bus.origin.* "
                        "metadata of the forwarded events: use a service token (audience "
                        "ai.hg.fi/internal) for the destination, or events could be "
                        "forwarded twice"
                    )
                return


async def run_relay(
    route: RelayRoute,
    *,
    loop: bool = False,
    interval: float = 1.0,
    retry: RetryPolicy | None = None,
    retries: int | None = None,
    http_timeout: float | None = 30.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forward the route's events; with ``loop``, every ``interval`` seconds until cancelled.

    Takes the route's lock (:class:`BusEventsError` when another relay holds
    it), reads its state file (an error naming the file when corrupt), and
    saves the state after every acknowledged batch, on failures and when
    cancelled.  Network failures, 5xx and 429 are retried with ``retry``
    (default :meth:`RetryPolicy.from_env`) — ``retries`` consecutive times
    (``None``: without limit), never skipping an event.  A 401 makes the relay
    read the token files again and retry once (a refreshed token); then it,
    403 and other refusals are raised.  ``http_timeout`` bounds each HTTP exchange.
    ``task_status.started()`` is called once the lock is held.
    """
    retry = retry or RetryPolicy.from_env()
    relay = _Relay(route, http_timeout)
    with RelayLock(route.state_file):
        relay.load()
        relay.save()
        task_status.started()
        backoff = Backoff(retry)
        reread = False
        try:
            while True:
                try:
                    await relay.run_pass()
                except BusEventsError as exc:
                    relay.unsure = True
                    relay.record_error(exc)
                    relay.save()
                    await relay.close_clients()
                    if isinstance(exc, Unauthorized) and not reread:
                        # An expired token: its file may hold a fresh one by now (a
                        # refresher rewrote it).  Read the files again, once.
                        reread = True
                        log.info("%s: %s; reading the token files again", route.label, exc)
                        continue
                    if not is_retryable(exc) or (
                        retries is not None and backoff.failures >= retries
                    ):
                        raise
                    delay = backoff.next_delay(exc)
                    log.warning(
                        "%s: %s; retry %d in %.1fs", route.label, exc, backoff.failures, delay
                    )
                    await trio.sleep(delay)
                    continue
                backoff.reset()
                reread = False
                if not loop:
                    return
                await trio.sleep(interval)
        finally:
            relay.save()  # synchronous: a cancellation cannot interrupt it
            await relay.close_clients()  # shielded inside


# -- import --------------------------------------------------------------------


@dataclass
class ImportResult:
    """What :func:`import_events` did."""

    published: int = 0
    duplicates: int = 0
    #: Envelopes from another origin than ``environment_id`` (as the relay: no echo).
    skipped: int = 0
    failed: int = 0


async def import_events(
    client: EventsClient,
    events: Sequence[tuple[int, Event]],
    *,
    environment_id: str | None = None,
    on_error: Callable[[int, str], None] | None = None,
) -> ImportResult:
    """Publish ``events`` (numbered envelopes, in order) with their origin recorded.

    The origin is the envelope's ``bus.origin.*`` metadata when it has it, else
    ``environment_id`` and the envelope's id.  With ``environment_id``, an
    envelope of another origin is skipped, as the relay does (it arrived at the
    exporting deployment from elsewhere, perhaps from this one).  An event whose
    origin the destination already holds (an earlier import or relay) is not
    published again.  ``on_error(number, message)`` hears of each envelope that failed;
    401/403 and network failures stop the import (raised).
    """
    result = ImportResult()
    seen: dict[str, set[tuple[str, str]]] = {}
    newest: dict[str, str | None] = {}
    verified = False
    for number, event in events:
        metadata = dict(event.metadata or {})
        origin = metadata.get(ORIGIN_ENVIRONMENT) or environment_id
        if environment_id and origin != environment_id:
            result.skipped += 1
            continue
        if not origin:
            result.failed += 1
            if on_error is not None:
                on_error(
                    number,
                    f"no origin: the envelope has no {ORIGIN_ENVIRONMENT} metadata; "
                    "pass --environment-id naming the deployment it came from",
                )
            continue
        key = (origin, metadata.get(ORIGIN_EVENT) or event.id)
        if event.name not in seen:
            seen[event.name], newest[event.name] = await _origins_at(client, event.name)
        known = seen[event.name]
        if key in known:
            result.duplicates += 1
            continue
        metadata[ORIGIN_ENVIRONMENT], metadata[ORIGIN_EVENT] = key
        request = PublishRequest(
            name=event.name,
            payload=event.payload,
            correlation_id=event.correlation_id,
            metadata=metadata,
            identity_id=event.identity_id,
        )
        try:
            accepted, _ = await client.publish(request)
        except (Unauthorized, Forbidden, TransportError):
            raise
        except BusEventsError as exc:
            if is_retryable(exc):
                raise
            result.failed += 1
            if on_error is not None:
                on_error(number, str(exc))
            continue
        known.add(key)
        result.published += 1
        if not verified:
            await verify_origin_kept(client, event.name, newest[event.name], accepted.id)
            verified = True
    return result


async def _origins_at(client: EventsClient, name: str) -> tuple[set[tuple[str, str]], str | None]:
    """The origins ``(environment, event id)`` of the events named ``name`` that
    ``client``'s deployment holds, and the id of the newest one."""
    found: set[tuple[str, str]] = set()
    newest: str | None = None
    async with client.listen(name, replay=True, follow=False) as stream:
        async for batch in stream.batches():
            for event in batch:
                newest = event.id
                metadata = event.metadata
                if metadata and ORIGIN_ENVIRONMENT in metadata and ORIGIN_EVENT in metadata:
                    found.add((metadata[ORIGIN_ENVIRONMENT], metadata[ORIGIN_EVENT]))
    return found, newest
