"""busevents: client, SDK and CLI for the Bus Events API.

Publish with :meth:`EventsClient.send`, stream with :meth:`EventsClient.listen`::

    import trio
    from busevents import EventsClient

    async def main() -> None:
        async with EventsClient.from_env() as client:
            await client.send("example.ping", {"ok": True})

    trio.run(main)

The names imported under ``TYPE_CHECKING`` below are the whole public API, declared
once; everything in ``_``-modules is private.  Submodules are imported on first
use, so ``import busevents`` (and ``bus-events --version``) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

if TYPE_CHECKING:
    # The public API, one name a line: type checkers and IDEs read these imports, and
    # at run time __getattr__ (below) reads them to load each name on first use.
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
    from ._depth import MAX_DEPTH as MAX_DEPTH
    from ._depth import nesting_error as nesting_error
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
    from ._sync import SyncClient as SyncClient
    from .relay._config import load_relay_routes as load_relay_routes
    from .relay._engine import RelayRoute as RelayRoute
    from .relay._engine import run_relay as run_relay
    from .relay._import import import_events as import_events
    from .relay._state import relay_status as relay_status
    from .workers._host import WorkerHost as WorkerHost
    from .workers._host import run_host as run_host
    from .workers._listener import Readiness as Readiness
    from .workers._requester import Requester as Requester
    from .workers._requester import open_requester as open_requester
    from .workers._worker import ClientPublisher as ClientPublisher
    from .workers._worker import Worker as Worker
    from .workers._worker import run_worker as run_worker


def _public_names() -> dict[str, str]:
    """Public name -> module, read from the TYPE_CHECKING imports above: they are the one
    declaration of the public API (type checkers read them as explicit re-exports, and
    this reads them for the lazy loading), so the two cannot disagree."""
    with open(__file__, encoding="utf-8") as file:  # this very file (its loader may vary)
        source = file.read()
    block = source.split("if TYPE_CHECKING:", 1)[1].split("\n\n", 1)[0]
    names = {}
    for line in block.splitlines():  # "    from .module import Name as Name" (no regex to
        words = line.split()  # compile: the CLI's fast send is the first to ask)
        if (
            line.startswith("    from .")
            and len(words) == 6
            and words[2] == "import"
            and words[4] == "as"
            and words[3] == words[5]
        ):
            names[words[3]] = words[1][1:]
    return names


_MODULE_OF: dict[str, str] = {}


def __getattr__(name: str) -> Any:
    if not _MODULE_OF:
        _MODULE_OF.update(_public_names())
    if name == "__all__":
        return sorted([*_MODULE_OF, "__version__"])
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'busevents' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"busevents.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __getattr__("__all__")  # type: ignore[no-any-return]
