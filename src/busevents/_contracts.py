"""The shared contracts: wire types of the Events API and the worker protocols.

The wire types are ``msgspec.Struct`` so that a stream decodes straight into
typed values.  Hot-path types are ``gc=False`` (they hold no cycles) and keep
the payload as :class:`msgspec.Raw`: the bytes are decoded only when the caller
asks (:meth:`Event.payload_as`).  Unknown fields are ignored on decode, so a
newer provider can add fields without breaking an older client.

The worker contracts are the :class:`Handler` and :class:`Publisher`
protocols; :class:`~busevents.Worker`, the declaration a host runs, lives with
the worker runtime (it holds a callable and never goes on the wire).
"""

from __future__ import annotations

import builtins
import enum
import re
from collections.abc import Mapping
from typing import Any, Final, Protocol, TypeVar, overload

import msgspec

from ._errors import ConfigError, InvalidPayload, bounded_text
from ._ids import event_id_key as event_id_key  # the bounded parser, one for all

__all__ = [
    "Accepted",
    "Delivery",
    "ErrorBody",
    "Event",
    "PublishRequest",
    "StreamSpec",
]

T = TypeVar("T")

_NULL = msgspec.Raw(b"null")
_AT_PATH = re.compile(r" - at `(\$[^`]*)`$")
_check_json = msgspec.json.Decoder(msgspec.Raw).decode


def raw_json(data: bytes | bytearray | memoryview) -> msgspec.Raw:
    """``data``, one JSON value already encoded, as :class:`msgspec.Raw`.

    Raises :class:`ValueError` when ``data`` is not exactly one JSON value
    (bytes are never base64-encoded behind the caller's back).
    """
    try:
        return _check_json(bytes(data))
    except msgspec.DecodeError as exc:
        raise ValueError(
            f"a bytes payload must hold one JSON value, already encoded ({exc}); "
            "pass a Python value to have it encoded"
        ) from None


class Delivery(enum.StrEnum):
    """How a stream shares events among listeners."""

    #: Every listener gets every matching event.
    BROADCAST = "broadcast"
    #: Listeners of one group compete: one of them gets each event.
    UNICAST = "unicast"

    @classmethod
    def parse(cls, value: Delivery | str) -> Delivery:
        """``value`` as a Delivery; :class:`ConfigError` naming the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(
                f"invalid delivery {value!r}: expected 'broadcast' or 'unicast'"
            ) from None


class Event(
    msgspec.Struct,
    frozen=True,
    gc=False,
    omit_defaults=True,
    rename={"correlation_id": "correlationId"},
):
    """One event envelope, as a stream delivers it (spec §1).

    ``payload`` holds the raw JSON bytes of the payload; decode them with
    :meth:`payload_as` (into any msgspec-supported type) or :meth:`payload_obj`
    (plain Python values).
    """

    id: str
    name: str
    payload: msgspec.Raw = _NULL
    correlation_id: str | None = None
    identity_id: str | None = None
    metadata: dict[str, str] | None = None
    time: str | None = None

    @overload
    def payload_as(self, type: type[T]) -> T: ...
    @overload
    def payload_as(self, type: Any) -> Any: ...
    def payload_as(self, type: Any) -> Any:
        """Decode the payload into ``type`` (a Struct, dataclass, ``dict[str, int]``, …).

        Raises :class:`InvalidPayload` (naming the event and the path in the
        payload; msgspec's error is the cause) when the payload does not match.
        """
        try:
            return msgspec.json.decode(self.payload, type=type)
        except (msgspec.DecodeError, RecursionError) as exc:  # ValidationError included
            wanted = type.__name__ if isinstance(type, builtins.type) else repr(type)
            raise self._invalid_payload(exc, wanted) from exc

    def payload_obj(self) -> Any:
        """Decode the payload into plain Python values (dict, list, str, …).

        Raises :class:`InvalidPayload` for a payload nested too deeply to decode.
        """
        try:
            return msgspec.json.decode(self.payload)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise self._invalid_payload(exc, "Python values") from exc

    def _invalid_payload(self, exc: Exception, wanted: str) -> InvalidPayload:
        text = str(exc)
        match = _AT_PATH.search(text)
        path = match.group(1) if match else "$"
        if match:
            text = text[: match.start()]
        if isinstance(exc, RecursionError):
            text = "nested too deeply to decode"
        return InvalidPayload(
            f"the payload of {bounded_text(self.name, 100)} event {bounded_text(self.id, 100)} "
            f"is not {bounded_text(wanted, 80)}: {bounded_text(text, 200)} (at {path})",
            event_id=self.id,
            event_name=self.name,
            path=path,
        )


class PublishRequest(
    msgspec.Struct,
    frozen=True,
    omit_defaults=True,
    rename={"correlation_id": "correlationId"},
):
    """The body of ``POST {base}``.

    ``payload`` is JSON already encoded: :class:`msgspec.Raw`, or ``bytes``
    (checked to be one JSON value; :class:`ValueError` otherwise).

    ``identity_id`` is honoured only for internal-audience (service) tokens, which
    may publish on behalf of an identity; providers ignore it otherwise.
    """

    name: str
    payload: msgspec.Raw = _NULL
    correlation_id: str | None = None
    metadata: dict[str, str] | None = None
    identity_id: str | None = None

    def __post_init__(self) -> None:
        # bytes would be encoded as a base64 string: they are JSON already (checked).
        payload: object = self.payload
        if isinstance(payload, bytes | bytearray | memoryview):
            msgspec.structs.force_setattr(self, "payload", raw_json(payload))


class Accepted(
    msgspec.Struct,
    frozen=True,
    omit_defaults=True,
    rename={"correlation_id": "correlationId"},
):
    """The provider's acceptance of a published event."""

    id: str
    name: str
    accepted: bool = True
    correlation_id: str | None = None
    time: str | None = None


class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    """A provider error body: ``{"error": code, "message": text, ...}``."""

    error: str | None = None
    message: str | None = None
    required_scopes: list[str] | None = None


class StreamSpec(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a stream asks for: the query of ``GET {base}/stream``."""

    name: str
    delivery: Delivery = Delivery.BROADCAST
    group: str | None = None
    consumer: str | None = None
    replay: bool = False
    follow: bool = True
    #: Resume after this event id (an extension of the contract; implies ``replay``).
    after: str | None = None

    def to_params(self) -> dict[str, str]:
        """The query parameters, omitting those left at the provider's default.

        ``after`` is sent with ``replay=true``: the history starts after that id.
        """
        params = {"name": self.name}
        if self.delivery is not Delivery.BROADCAST:
            params["delivery"] = self.delivery.value
        if self.group is not None:
            params["group"] = self.group
        if self.consumer is not None:
            params["consumer"] = self.consumer
        if self.replay or self.after is not None:
            params["replay"] = "true"
        if not self.follow:
            params["follow"] = "false"
        if self.after is not None:
            params["after"] = self.after
        return params


#: Request metadata keys with this prefix are copied onto replies.
ORIGIN_PREFIX: Final = "bus.origin."
#: ...except these: the relay's and import's record of which event the request itself
#: was at its origin (a reply is another event; carrying it would make it the request's twin).
EVENT_ORIGIN_KEYS: Final = frozenset({"bus.origin.event.id"})


class Publisher(Protocol):
    """What a worker handler may do: publish events and reply to a request.

    A reply carries the request's ``correlationId`` (the request's event id when
    it has none), its ``bus.origin.*`` metadata (not :data:`EVENT_ORIGIN_KEYS`: a
    reply is not the relayed request), and its ``identity_id`` (both
    honoured by providers for service tokens only; the identity is what lets
    the reply reach an end user's requester).

    An *error response* has the shape of an API error body as its payload:
    ``{"error": "<code>", "message": "<text>", ...details}``; a response whose
    payload is an object with a non-empty string ``error`` is one, and
    requesters raise it as ``ResponseError``.  (The payload, not ``bus.*``
    metadata, because providers drop ``bus.*`` keys that end users publish.)
    """

    async def send(
        self,
        name: str,
        payload: Any = None,
        *,
        correlation_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Accepted: ...

    async def reply(
        self,
        request: Event,
        name: str,
        payload: Any = None,
        *,
        metadata: dict[str, str] | None = None,
    ) -> Accepted: ...

    async def reply_error(
        self,
        request: Event,
        name: str,
        code: str,
        message: str = "",
        *,
        details: Mapping[str, Any] | None = None,
    ) -> Accepted: ...


class Handler(Protocol):
    """A worker handler: ``async def handle(event, publisher) -> None``."""

    async def __call__(self, event: Event, publisher: Publisher, /) -> None: ...
