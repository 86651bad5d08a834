"""The relay engine: forward events of some names from one deployment to another,
exactly once, with a durable cursor, and never back to where they came from.

**Origin.**  Every forwarded event carries ``bus.origin.environment.id`` (the
environment where it was first published: the route's ``environment_id``) and
``bus.origin.event.id`` (its id there).  A route forwards only events that
originated at its source: those without ``bus.origin.environment.id`` or with
the route's own id.  An event that arrived from elsewhere is *skipped* — so
routes A→B and B→A can run together without echo.  (``import`` differs: it
restores every event of a file, whatever its origin; see :mod:`._import`.)
Providers keep ``bus.*`` metadata only from service tokens: a destination token
whose audience says it is an end user's is refused before anything is published
(an opaque token: the metadata of the first publish is checked).

**Cursors.**  Per name, the state file holds the id of the last source event
handled and the destination id of the last event forwarded.  The source is read
with ``after=<cursor>`` (the stream resumes, it does not restart).

**Exactly once, on evidence.**  Events of a name are published one at a time,
in source order, and the state file is saved (atomically) only after the
destination acknowledged them — not after each one.  So after a crash the
destination may hold events the state does not know of.  On start and after
every failure, the relay reads the destination's history of the name after its
destination cursor and notes the events of its origin there (:meth:`_Relay._held`).
An event found there is *trusted* only when the source holds the same id with
the same payload: then it is counted as forwarded, not sent again.  Anything
else claiming the route's origin (an id the source never had, or another
payload) moves no cursor: the route stops with one line naming it
(:class:`UntrustedOrigin`), before publishing anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from .._client import EventsClient
from .._config import find_token, normalize_events_url
from .._contracts import Event, PublishRequest
from .._errors import APIError, BusEventsError, Forbidden, Unauthorized
from .._groups import single_error
from .._ids import event_id_key
from .._retry import Backoff, RetryPolicy, is_retryable
from ._origin import (
    ORIGIN_ENVIRONMENT,
    ORIGIN_EVENT,
    SERVICE_AUDIENCE,
    check_service_token,
    origin_key,
)
from ._state import (
    Cursor,
    RelayLock,
    RouteInfo,
    RouteState,
    public_url,
    read_state,
    utc_now,
    write_state,
)

__all__ = ["NameReport", "RelayReport", "RelayRoute", "UntrustedOrigin", "run_relay"]

log = logging.getLogger("busevents.relay")

#: Save the state at least this often (seconds) while a long backlog is forwarded.
_SAVE_EVERY = 0.5
#: At most this many untrusted ids are named in an error.
_SHOWN: Final = 3


class UntrustedOrigin(BusEventsError):
    """The destination holds events claiming the route's origin that the source never had."""


@dataclass
class NameReport:
    """What one run did for one name."""

    forwarded: int = 0
    skipped: int = 0
    pending: int = 0


@dataclass
class RelayReport:
    """What :func:`run_relay` did (per name, in this run), for its summary line."""

    label: str
    names: dict[str, NameReport] = field(default_factory=dict)

    def line(self) -> str:
        """``label: NAME forwarded N skipped M pending K, …``"""
        parts = [
            f"{name} forwarded {r.forwarded} skipped {r.skipped} pending {r.pending}"
            for name, r in self.names.items()
        ]
        return f"{self.label}: {', '.join(parts)}"

    def to_builtins(self) -> dict[str, object]:
        return {
            "route": self.label,
            "names": {
                name: {"forwarded": r.forwarded, "skipped": r.skipped, "pending": r.pending}
                for name, r in self.names.items()
            },
        }


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
class _Held:
    """An event of the route's origin found at the destination."""

    destination_id: str
    payload: bytes


@dataclass
class _Relay:
    route: RelayRoute
    timeout: float | None
    state: RouteState = field(init=False)
    report: RelayReport = field(init=False)
    #: The destination may hold events the state does not know of (start, after a failure).
    unsure: bool = True
    #: Whether the destination token is known to keep the origin metadata.
    verified: bool = False
    last_save: float = 0.0
    source: EventsClient | None = None
    dest: EventsClient | None = None
    #: Per name: trusted events of ours the destination holds, by source id.
    held: dict[str, dict[str, _Held]] = field(default_factory=dict)

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
        self.report = RelayReport(route.label, {name: NameReport() for name in route.names})

    def save(self) -> None:
        write_state(self.route.state_file, self.state)
        self.last_save = trio.current_time()

    def record_error(self, exc: BaseException) -> None:
        self.state.last_error = str(exc)[:500]
        self.state.last_error_time = utc_now()

    # -- one pass ------------------------------------------------------------

    def _client(self, url: str, token_file: str | None, side: str) -> EventsClient:
        token = find_token(token_file)
        if side == "destination" and not self.verified:
            self.verified = check_service_token(token, f"{self.route.label}: the destination")
        return EventsClient(url, token, timeout=self.timeout)

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
        for each in self.report.names.values():
            each.pending = 0
        if self.dest is None:
            self.dest = self._client(route.to_url, route.to_token_file, "destination")
        if self.source is None:
            self.source = self._client(route.from_url, route.from_token_file, "source")
        source, dest = self.source, self.dest
        if self.unsure:
            for name in route.names:
                self.held[name] = await self._held(source, dest, name)
        self.unsure = False
        # Names are independent (a cursor each, order kept within a name): forward
        # them side by side, so that one long backlog does not hold up the others.
        with single_error():
            async with trio.open_nursery() as nursery:
                for name in route.names:
                    nursery.start_soon(self._forward, source, dest, name)
        self.state.last_success = utc_now()
        self.save()

    async def _held(self, source: EventsClient, dest: EventsClient, name: str) -> dict[str, _Held]:
        """The events of ours the destination holds after the cursor, checked against the
        source: only those the source holds (same id, same payload) are trusted.

        Raises :class:`UntrustedOrigin` when another claims the route's origin with an
        id after the source cursor that the source does not hold (forged, or another
        deployment with the same environment id).
        """
        cursor = self.state.cursor(name)
        env = self.route.environment_id
        found: dict[str, _Held] = {}
        async with dest.listen(name, replay=True, follow=False, after=cursor.destination) as stream:
            async for batch in stream.batches():
                for event in batch:
                    metadata = event.metadata
                    if metadata and metadata.get(ORIGIN_ENVIRONMENT) == env:
                        origin = metadata.get(ORIGIN_EVENT, "")
                        found.setdefault(origin, _Held(event.id, bytes(event.payload)))
        mark = event_id_key(cursor.source) if cursor.source else None
        # What the relay recorded is settled; the rest needs the source's word.
        open_ = {
            origin: held
            for origin, held in found.items()
            if mark is None or (key := event_id_key(origin)) is None or key > mark
        }
        if not open_:
            return {}
        trusted: dict[str, _Held] = {}
        first: tuple[int, int] | None = None
        last = mark
        async with source.listen(name, replay=True, follow=False, after=cursor.source) as stream:
            async for batch in stream.batches():
                for event in batch:
                    key = event_id_key(event.id)
                    if key is not None:
                        first = first or key
                        last = key
                    held = open_.get(event.id)
                    if held is not None and held.payload == bytes(event.payload):
                        trusted[event.id] = open_.pop(event.id)
        # Left: ids the source does not hold.  Those below its first retained event
        # may have been trimmed since they were forwarded; the others it never had.
        never = [
            (origin, held)
            for origin, held in open_.items()
            if (key := event_id_key(origin)) is None
            or (last is not None and (first is None or key >= first))
        ]
        if never:
            shown = ", ".join(
                f"{origin[:40]!r} (destination id {held.destination_id})"
                for origin, held in never[:_SHOWN]
            )
            raise UntrustedOrigin(
                f"{self.route.label}: {name}: the destination holds {len(never)} event(s) "
                f"claiming origin {env!r} that the source never had: {shown}; not trusting "
                "them, the relay stopped before publishing: find who published them (a "
                f"service token at the destination), then set cursors.{name}.destination "
                f"in {self.route.state_file} to the last of them to go on"
            )
        if trusted:
            log.info(
                "%s: %s: the destination already holds %d event(s) of this route that the "
                "state does not record (an interrupted run); they are not sent again",
                self.route.label,
                name,
                len(trusted),
            )
        return trusted

    async def _forward(self, source: EventsClient, dest: EventsClient, name: str) -> None:
        cursor = self.state.cursor(name)
        counters = self.state.counters
        report = self.report.names[name]
        async with source.listen(name, replay=True, follow=False, after=cursor.source) as stream:
            async for batch in stream.batches():
                counters.pending += len(batch)
                report.pending += len(batch)
                for event in batch:
                    await self._forward_one(dest, event, cursor, report)
                    counters.pending -= 1
                    report.pending -= 1
                    counters.received += 1
                    if trio.current_time() - self.last_save >= _SAVE_EVERY:
                        self.save()

    async def _forward_one(
        self, dest: EventsClient, event: Event, cursor: Cursor, report: NameReport
    ) -> None:
        env = self.route.environment_id
        metadata = dict(event.metadata or {})
        origin = metadata.get(ORIGIN_ENVIRONMENT)
        if origin is not None and origin != env:
            # It came from elsewhere: forwarding it could send it back there (echo).
            self.state.counters.skipped += 1
            report.skipped += 1
            cursor.source = event.id
            return
        held = self.held.get(event.name, {}).pop(event.id, None)
        if held is not None:
            # Sent by an interrupted run: the destination acknowledged it already.
            accepted_id = held.destination_id
        else:
            accepted_id = await self._publish(dest, event, metadata)
        cursor.source = event.id
        cursor.destination = accepted_id
        self.state.counters.forwarded += 1
        report.forwarded += 1

    async def _publish(self, dest: EventsClient, event: Event, metadata: dict[str, str]) -> str:
        metadata[ORIGIN_ENVIRONMENT] = self.route.environment_id
        metadata[ORIGIN_EVENT] = event.id
        request = PublishRequest(
            name=event.name,
            payload=event.payload,
            correlation_id=event.correlation_id,
            metadata=metadata,
            identity_id=event.identity_id,
        )
        before = self.state.cursor(event.name).destination
        try:
            key = origin_key(self.route.environment_id, event.id)
            accepted, _ = await dest.publish(request, idempotency_key=key)
        except APIError as exc:
            if is_retryable(exc) or isinstance(exc, Unauthorized | Forbidden):
                raise
            raise BusEventsError(
                f"the destination refused event {event.id} ({event.name}): {exc}; "
                "the relay stopped before it (nothing after it was forwarded)"
            ) from exc
        if not self.verified:
            await verify_origin_kept(dest, event.name, before, accepted.id)
            self.verified = True
        return accepted.id


async def verify_origin_kept(
    dest: EventsClient, name: str, after: str | None, event_id: str
) -> None:
    """Check that the destination kept the origin metadata of event ``event_id``
    (for a token whose audience could not be read before publishing).

    Providers drop ``bus.*`` keys from end-user tokens; without them a restart
    could not recognise what was forwarded, so this is an error.
    """
    async with dest.listen(name, replay=True, follow=False, after=after) as stream:
        async for event in stream:
            if event.id == event_id:
                if (event.metadata or {}).get(ORIGIN_EVENT) is None:
                    raise BusEventsError(
                        f"the destination {public_url(dest.url)} dropped the bus.origin.* "
                        f"metadata of the forwarded events: use a service token (audience "
                        f"{SERVICE_AUDIENCE}) for the destination, or events could be "
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
) -> RelayReport:
    """Forward the route's events; with ``loop``, every ``interval`` seconds until cancelled.

    Takes the route's lock (:class:`BusEventsError` when another relay holds
    it), reads its state file (an error naming the file when corrupt), and
    saves the state after every acknowledged batch, on failures and when
    cancelled.  Network failures, 5xx and 429 are retried with ``retry``
    (default :meth:`RetryPolicy.from_env`) — ``retries`` consecutive times
    (``None``: without limit), never skipping an event.  A 401 makes the relay
    read the token files again and retry once (a refreshed token); then it,
    403, other refusals and :class:`UntrustedOrigin` are raised.  ``http_timeout``
    bounds each HTTP exchange.  ``task_status.started()`` is called once the lock
    is held.  Returns what this run did per name (after one pass, without ``loop``).
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
                    return relay.report
                await trio.sleep(interval)
        finally:
            relay.save()  # synchronous: a cancellation cannot interrupt it
            await relay.close_clients()  # shielded inside
