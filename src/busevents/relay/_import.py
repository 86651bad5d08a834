"""``import``: restore a file of envelopes into a deployment, each event exactly once.

A route and an import differ.  A **route** forwards only what *started* at its
source (an event that came to the source from elsewhere is skipped: with routes
both ways, it would echo).  An **import** restores history: every event of the
file reaches the destination, whatever its origin — an export of A holding
events that came to A from B brings B's events too — exactly once, keyed by its
origin (``bus.origin.environment.id`` + ``bus.origin.event.id``; an envelope
without origin gets the ``environment_id`` given and its own id).  The only
events left out are those whose origin *is* the destination (it holds that id
with the same payload and no origin: it published the event itself); they are
counted as skipped.

Everything that can be checked before publishing is: each envelope's ids
(bounded, see :func:`busevents.parse_event_id`), and the destination token (an
end user's cannot keep the origin metadata).  A problem there publishes nothing.

An envelope's ``identity_id`` is sent with it, and a provider honours it from a
service token (the only kind ``import`` accepts): the restored event is
attributed to that identity, as it was at the source.  So a file to import is
as trusted as the service token: import only files you exported yourself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .._client import EventsClient
from .._config import Token
from .._contracts import Event, PublishRequest
from .._errors import BusEventsError, Forbidden, TransportError, Unauthorized
from .._ids import parse_event_id
from .._retry import is_retryable
from ._engine import verify_origin_kept
from ._origin import ORIGIN_ENVIRONMENT, ORIGIN_EVENT, check_service_token, origin_key

__all__ = ["ImportResult", "import_events"]

#: Bad lines named one by one in an error; the rest are counted.
SHOWN_ERRORS = 5


@dataclass
class ImportResult:
    """What :func:`import_events` did."""

    published: int = 0
    #: Events the destination held already (an earlier import or relay).
    duplicates: int = 0
    #: Events whose origin is the destination itself.
    skipped: int = 0
    failed: int = 0


def _origin(event: Event, environment_id: str) -> tuple[str, str]:
    """The envelope's origin; ValueError naming what is wrong with it."""
    metadata = event.metadata or {}
    origin_id = metadata.get(ORIGIN_EVENT)
    if origin_id is None:
        # Published where it was exported (a reply may carry its request's
        # environment id alone: it is still the exporting deployment's event).
        parse_event_id(event.id)
        return environment_id, event.id
    environment = metadata.get(ORIGIN_ENVIRONMENT, "")
    if not environment.strip() or len(environment) > 255:
        raise ValueError(f"{ORIGIN_ENVIRONMENT} must be 1 to 255 characters with {ORIGIN_EVENT}")
    try:
        parse_event_id(origin_id)
    except ValueError as exc:
        raise ValueError(f"{ORIGIN_EVENT}: {exc}") from None
    return environment, origin_id


def plan(
    events: Sequence[tuple[int, Event]], environment_id: str
) -> tuple[list[tuple[int, Event, tuple[str, str]]], list[tuple[int, str]]]:
    """Each numbered envelope with its origin, and the errors of those without a valid one."""
    planned: list[tuple[int, Event, tuple[str, str]]] = []
    errors: list[tuple[int, str]] = []
    for number, event in events:
        try:
            planned.append((number, event, _origin(event, environment_id)))
        except ValueError as exc:
            errors.append((number, str(exc)))
    return planned, errors


@dataclass
class _Destination:
    """What the destination holds of one name: the origins recorded there, and its own
    events (no origin) by id, with their payloads."""

    origins: set[tuple[str, str]]
    own: dict[str, bytes]
    newest: str | None


async def _scan(client: EventsClient, name: str) -> _Destination:
    found = _Destination(set(), {}, None)
    async with client.listen(name, replay=True, follow=False) as stream:
        async for batch in stream.batches():
            for event in batch:
                found.newest = event.id
                metadata = event.metadata or {}
                if ORIGIN_ENVIRONMENT in metadata and ORIGIN_EVENT in metadata:
                    found.origins.add((metadata[ORIGIN_ENVIRONMENT], metadata[ORIGIN_EVENT]))
                else:
                    found.own[event.id] = bytes(event.payload)
    return found


async def import_events(
    client: EventsClient,
    events: Sequence[tuple[int, Event]],
    *,
    environment_id: str,
    token: Token | None = None,
    bad_lines: Sequence[tuple[int, str]] = (),
    on_error: Callable[[int, str], None] | None = None,
) -> ImportResult:
    """Restore ``events`` (numbered envelopes, in order) at ``client``'s deployment,
    each once, with its origin recorded (see the module documentation).

    ``environment_id`` names the deployment the envelopes without origin came
    from.  Before publishing anything, raises :class:`BusEventsError`: when
    ``token`` (the client's) is an end user's; or listing the first bad lines
    (``bad_lines``, found while reading, and envelopes with an invalid id or
    origin) and how many more (``on_error`` hears of the first few).  Without
    ``token``, the first published event is checked to have kept its origin.
    ``on_error(number, message)`` hears of each envelope the destination refused;
    401/403 and network failures stop the import (raised).
    """
    if not environment_id.strip():
        raise BusEventsError("import needs an environment id for envelopes without an origin")
    verified = token is not None and check_service_token(token, "import")
    planned, errors = plan(events, environment_id)
    errors = sorted([*bad_lines, *errors])
    if errors:
        for number, message in errors[:SHOWN_ERRORS]:
            if on_error is not None:
                on_error(number, message)
        more = len(errors) - SHOWN_ERRORS
        raise BusEventsError(
            f"import: {len(errors)} line(s) cannot be imported"
            + (f" (the first {SHOWN_ERRORS} above, {more} more)" if more > 0 else "")
            + "; nothing was published"
        )
    result = ImportResult()
    held: dict[str, _Destination] = {}
    for number, event, key in planned:
        if event.name not in held:
            held[event.name] = await _scan(client, event.name)
        there = held[event.name]
        if key in there.origins:
            result.duplicates += 1
            continue
        own = there.own.get(key[1])
        if own is not None and own == bytes(event.payload):
            result.skipped += 1  # the destination published it itself
            continue
        metadata = dict(event.metadata or {})
        metadata[ORIGIN_ENVIRONMENT], metadata[ORIGIN_EVENT] = key
        request = PublishRequest(
            name=event.name,
            payload=event.payload,
            correlation_id=event.correlation_id,
            metadata=metadata,
            identity_id=event.identity_id,
        )
        try:
            accepted, _ = await client.publish(request, idempotency_key=origin_key(*key))
        except (Unauthorized, Forbidden, TransportError):
            raise
        except BusEventsError as exc:
            if is_retryable(exc):
                raise
            result.failed += 1
            if on_error is not None:
                on_error(number, str(exc))
            continue
        there.origins.add(key)
        result.published += 1
        if not verified:
            await verify_origin_kept(client, event.name, there.newest, accepted.id)
            verified = True
    return result
