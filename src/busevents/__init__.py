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
    # For type checkers and IDEs; at run time names load lazily (below).
    from ._client import EventsClient as EventsClient
    from ._config import Token as Token
    from ._config import config_root as config_root
    from ._config import find_token as find_token
    from ._config import normalize_events_url as normalize_events_url
    from ._config import parse_duration as parse_duration
    from ._config import resolve_url as resolve_url
    from ._contracts import Accepted as Accepted
    from ._contracts import Delivery as Delivery
    from ._contracts import ErrorBody as ErrorBody
    from ._contracts import Event as Event
    from ._contracts import Handler as Handler
    from ._contracts import Publisher as Publisher
    from ._contracts import PublishRequest as PublishRequest
    from ._contracts import StreamSpec as StreamSpec
    from ._errors import APIError as APIError
    from ._errors import BadRequest as BadRequest
    from ._errors import BusEventsError as BusEventsError
    from ._errors import ConfigError as ConfigError
    from ._errors import ConnectError as ConnectError
    from ._errors import ExitStatus as ExitStatus
    from ._errors import Forbidden as Forbidden
    from ._errors import HandlerError as HandlerError
    from ._errors import InvalidEvent as InvalidEvent
    from ._errors import InvalidPayload as InvalidPayload
    from ._errors import LineTooLong as LineTooLong
    from ._errors import ListenerUnavailable as ListenerUnavailable
    from ._errors import NotFound as NotFound
    from ._errors import PayloadTooLarge as PayloadTooLarge
    from ._errors import RateLimited as RateLimited
    from ._errors import ReplyTimeout as ReplyTimeout
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
    from ._groups import single_error as single_error
    from ._ids import event_id_key as event_id_key
    from ._ids import parse_event_id as parse_event_id
    from ._ndjson import NDJSONDecoder as NDJSONDecoder
    from ._reconnect import DEDUPE_WINDOW as DEDUPE_WINDOW
    from ._reconnect import RecentIds as RecentIds
    from ._reconnect import follow_stream as follow_stream
    from ._retry import Backoff as Backoff
    from ._retry import RetryPolicy as RetryPolicy
    from ._retry import is_retryable as is_retryable
    from ._stream import EventStream as EventStream
    from .relay._config import load_relay_routes as load_relay_routes
    from .relay._engine import RelayRoute as RelayRoute
    from .relay._engine import run_relay as run_relay
    from .relay._import import import_events as import_events
    from .relay._state import relay_status as relay_status
    from ._sync import SyncClient as SyncClient
    from .workers._host import WorkerHost as WorkerHost
    from .workers._host import run_host as run_host
    from .workers._listener import Readiness as Readiness
    from .workers._requester import Requester as Requester
    from .workers._requester import open_requester as open_requester
    from .workers._worker import ClientPublisher as ClientPublisher
    from .workers._worker import Worker as Worker
    from .workers._worker import run_worker as run_worker

# The one list of public names: where each lives.  tests/test_package.py holds the
# TYPE_CHECKING imports above and the documentation to it.
_LOCATIONS = {
    "_client": ("EventsClient",),
    "_stream": ("EventStream",),
    "_sync": ("SyncClient",),
    "_config": (
        "Token",
        "config_root",
        "find_token",
        "normalize_events_url",
        "parse_duration",
        "resolve_url",
    ),
    "_contracts": (
        "Accepted",
        "Delivery",
        "ErrorBody",
        "Event",
        "Handler",
        "PublishRequest",
        "Publisher",
        "StreamSpec",
    ),
    "_errors": (
        "APIError",
        "BadRequest",
        "BusEventsError",
        "ConfigError",
        "ConnectError",
        "ExitStatus",
        "Forbidden",
        "HandlerError",
        "InvalidEvent",
        "InvalidPayload",
        "LineTooLong",
        "ListenerUnavailable",
        "NotFound",
        "PayloadTooLarge",
        "RateLimited",
        "ReplyTimeout",
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
    "_groups": ("single_error",),
    "_ndjson": ("NDJSONDecoder",),
    "_reconnect": ("DEDUPE_WINDOW", "RecentIds", "follow_stream"),
    "_retry": ("Backoff", "RetryPolicy", "is_retryable"),
    "workers._listener": ("Readiness",),
    "workers._worker": (
        "ClientPublisher",
        "Worker",
        "run_worker",
    ),
    "workers._requester": (
        "Requester",
        "open_requester",
    ),
    "workers._host": (
        "WorkerHost",
        "run_host",
    ),
    "relay._engine": ("RelayRoute", "run_relay"),
    "relay._import": ("import_events",),
    "relay._config": ("load_relay_routes",),
    "relay._state": ("relay_status",),
    "_ids": ("event_id_key", "parse_event_id"),
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
