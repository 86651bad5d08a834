"""busevents: client, SDK and CLI for the Bus Events API.

Publish with :meth:`EventsClient.send`, stream with :meth:`EventsClient.listen`::

    import trio
    from busevents import EventsClient

    async def main() -> None:
        async with EventsClient.from_env() as client:
            await client.send("example.ping", {"ok": True})

    trio.run(main)

The names below are the whole public API; everything in ``_``-modules is
private.  Submodules are imported on first use, so ``import busevents`` (and
``bus-events --version``) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

if TYPE_CHECKING:
    from ._client import EventsClient as EventsClient
    from ._client import EventStream as EventStream
    from ._config import Token as Token
    from ._config import config_root as config_root
    from ._config import find_token as find_token
    from ._config import normalize_events_url as normalize_events_url
    from ._config import parse_duration as parse_duration
    from ._contracts import Accepted as Accepted
    from ._contracts import Delivery as Delivery
    from ._contracts import Event as Event
    from ._contracts import Handler as Handler
    from ._contracts import Publisher as Publisher
    from ._contracts import PublishRequest as PublishRequest
    from ._contracts import StreamSpec as StreamSpec
    from ._contracts import Worker as Worker
    from ._errors import APIError as APIError
    from ._errors import BadRequest as BadRequest
    from ._errors import BusEventsError as BusEventsError
    from ._errors import ConfigError as ConfigError
    from ._errors import ConnectError as ConnectError
    from ._errors import Forbidden as Forbidden
    from ._errors import HandlerError as HandlerError
    from ._errors import InvalidEvent as InvalidEvent
    from ._errors import LineTooLong as LineTooLong
    from ._errors import ListenerUnavailable as ListenerUnavailable
    from ._errors import NotFound as NotFound
    from ._errors import PayloadTooLarge as PayloadTooLarge
    from ._errors import RateLimited as RateLimited
    from ._errors import RequestTimeout as RequestTimeout
    from ._errors import ResponseError as ResponseError
    from ._errors import ServerError as ServerError
    from ._errors import StreamError as StreamError
    from ._errors import StreamInterrupted as StreamInterrupted
    from ._errors import StreamStalled as StreamStalled
    from ._errors import StreamTruncated as StreamTruncated
    from ._errors import Timeout as Timeout
    from ._errors import TokenError as TokenError
    from ._errors import TransportError as TransportError
    from ._errors import Unauthorized as Unauthorized
    from ._errors import WorkerError as WorkerError
    from ._host import WorkerHost as WorkerHost
    from ._host import run_host as run_host
    from ._listener import Readiness as Readiness
    from ._listener import RetryPolicy as RetryPolicy
    from ._ndjson import NDJSONDecoder as NDJSONDecoder
    from ._requester import Requester as Requester
    from ._requester import open_requester as open_requester
    from ._worker import ClientPublisher as ClientPublisher
    from ._worker import run_worker as run_worker

_LOCATIONS = {
    "_client": (
        "EventsClient",
        "EventStream",
    ),
    "_config": (
        "Token",
        "config_root",
        "find_token",
        "normalize_events_url",
        "parse_duration",
    ),
    "_contracts": (
        "Accepted",
        "Delivery",
        "Event",
        "Handler",
        "PublishRequest",
        "Publisher",
        "StreamSpec",
        "Worker",
    ),
    "_errors": (
        "APIError",
        "BadRequest",
        "BusEventsError",
        "ConfigError",
        "ConnectError",
        "Forbidden",
        "HandlerError",
        "InvalidEvent",
        "LineTooLong",
        "ListenerUnavailable",
        "NotFound",
        "PayloadTooLarge",
        "RateLimited",
        "RequestTimeout",
        "ResponseError",
        "ServerError",
        "StreamError",
        "StreamInterrupted",
        "StreamStalled",
        "StreamTruncated",
        "Timeout",
        "TokenError",
        "TransportError",
        "Unauthorized",
        "WorkerError",
    ),
    "_ndjson": ("NDJSONDecoder",),
    "_listener": (
        "Readiness",
        "RetryPolicy",
    ),
    "_worker": (
        "ClientPublisher",
        "run_worker",
    ),
    "_requester": (
        "Requester",
        "open_requester",
    ),
    "_host": (
        "WorkerHost",
        "run_host",
    ),
}
_MODULE_OF = {name: module for module, names in _LOCATIONS.items() for name in names}

__all__ = sorted([*_MODULE_OF, "__version__"])


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'busevents' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"busevents.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
