"""The shared contracts: wire types of the Events API and the worker protocols.

Everything here is a ``msgspec.Struct`` so that a stream decodes straight into
typed values.  Hot-path types are ``gc=False`` (they hold no cycles) and keep
the payload as :class:`msgspec.Raw`: the bytes are decoded only when the caller
asks (:meth:`Event.payload_as`).  Unknown fields are ignored on decode, so a
newer provider can add fields without breaking an older client.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol, TypeVar, overload

import msgspec

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


class Delivery(enum.StrEnum):
    """How a stream shares events among listeners."""

    #: Every listener gets every matching event.
    BROADCAST = "broadcast"
    #: Listeners of one group compete: one of them gets each event.
    UNICAST = "unicast"


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

        Raises :class:`msgspec.ValidationError` when the payload does not match.
        """
        return msgspec.json.decode(self.payload, type=type)

    def payload_obj(self) -> Any:
        """Decode the payload into plain Python values (dict, list, str, …)."""
        return msgspec.json.decode(self.payload)


class PublishRequest(
    msgspec.Struct,
    frozen=True,
    omit_defaults=True,
    rename={"correlation_id": "correlationId"},
):
    """The body of ``POST {base}``.

    ``identity_id`` is honoured only for internal-audience (service) tokens, which
    may publish on behalf of an identity; providers ignore it otherwise.
    """

    name: str
    payload: msgspec.Raw = _NULL
    correlation_id: str | None = None
    metadata: dict[str, str] | None = None
    identity_id: str | None = None


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

    def to_params(self) -> dict[str, str]:
        """The query parameters, omitting those left at the provider's default."""
        params = {"name": self.name}
        if self.delivery is not Delivery.BROADCAST:
            params["delivery"] = self.delivery.value
        if self.group is not None:
            params["group"] = self.group
        if self.consumer is not None:
            params["consumer"] = self.consumer
        if self.replay:
            params["replay"] = "true"
        if not self.follow:
            params["follow"] = "false"
        return params


class Publisher(Protocol):
    """What a worker handler may do: publish events and reply to a request."""

    async def send(
        self,
        name: str,
        payload: Any = None,
        *,
        correlation_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Accepted: ...

    async def reply(self, request: Event, name: str, payload: Any = None) -> Accepted: ...


class Handler(Protocol):
    """A worker handler: ``async def handle(event, publisher) -> None``."""

    async def __call__(self, event: Event, publisher: Publisher, /) -> None: ...
