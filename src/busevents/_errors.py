"""Exceptions raised by busevents.

Every exception derives from :class:`BusEventsError`; catch the family you can
act on::

    BusEventsError
    ├── ConfigError              bad configuration or usage: no URL, bad duration, …
    │   └── TokenError           no token, unreadable or empty token file
    ├── TransportError           the network failed; names the URL, never the token
    │   ├── ConnectError         could not connect (refused, DNS, TLS)
    │   ├── Timeout              a deadline passed (names the timeout that fired)
    │   │   └── ReplyTimeout     no reply to a request in time (``correlation_id``)
    │   ├── StreamInterrupted    (also a StreamError, below)
    │   └── ListenerUnavailable  a required worker listener could not connect or ended
    ├── APIError                 the provider answered with an error status
    │   ├── BadRequest           400: invalid name, payload, group, …
    │   ├── Unauthorized         401: missing, invalid or expired token
    │   ├── Forbidden            403: the token lacks a scope (``required_scopes``)
    │   ├── NotFound             404: wrong URL
    │   ├── PayloadTooLarge      413
    │   ├── RateLimited          429 (``retry_after``)
    │   └── ServerError          5xx
    ├── StreamError              the event stream broke its framing or contract
    │   ├── InvalidEvent         a line that is not JSON, or not an event envelope
    │   ├── LineTooLong          a line longer than the configured maximum
    │   ├── StreamTruncated      the stream ended in the middle of a line
    │   └── StreamInterrupted    the connection failed while streaming (a TransportError too)
    │       └── StreamStalled    no byte arrived within the stall timeout
    ├── InvalidPayload           an event's payload is not of the type asked for
    │                            (``event_id``, ``path``; also a ValueError)
    ├── ResponseError            the reply to a request is an error response (``code``)
    └── WorkerError              the worker runtime failed
        └── HandlerError         a handler failed and its worker stops (``stop_on_error``)

Messages are bounded in length and free of control characters, whatever the
provider sent, and no message, ``str`` or ``repr`` ever contains a token.
"""

from __future__ import annotations

import enum
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._contracts import Event


class ExitStatus(enum.IntEnum):
    """Process exit statuses of ``bus-events`` and :func:`~busevents.run_host`."""

    OK = 0
    #: Any failure: network, HTTP error status, broken stream, unwritable output.
    FAILURE = 1
    #: Invalid usage or configuration: nothing was sent.
    USAGE = 2
    #: A ``.bus`` script has a syntax error (sysexits' EX_DATAERR); nothing ran.
    DATA_ERROR = 65
    #: Interrupted by SIGINT (128 + 2).
    INTERRUPTED = 130
    #: Stopped by SIGTERM (128 + 15).
    TERMINATED = 143


#: The longest diagnostic taken from a provider, in characters.
MAX_DIAGNOSTIC = 300

# Compiled at the first diagnostic (re's cache keeps them): a publish that succeeds
# need not pay for them at start-up.
_CONTROL = r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+"
_TAGS = r"(?is)<(script|style)\b.*?</\1\s*>|<[^>]*>"


def bounded_text(text: str | bytes, limit: int = MAX_DIAGNOSTIC) -> str:
    """Make ``text`` safe for one diagnostic line.

    Bytes are decoded as UTF-8 with replacement, HTML tags are dropped, control
    characters and runs of whitespace become one space, and the result is cut
    to ``limit`` characters with an ellipsis.
    """
    if isinstance(text, bytes | bytearray | memoryview):
        text = bytes(text[: limit * 8]).decode("utf-8", "replace")
    else:
        text = text[: limit * 8]
    if "<" in text and ">" in text:
        text = re.sub(_TAGS, " ", text)
    text = " ".join(re.sub(_CONTROL, " ", text).split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def _rebuild(
    cls: type[BusEventsError], args: tuple[object, ...], state: dict[str, object]
) -> BusEventsError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class BusEventsError(Exception):
    """The root of every busevents exception.

    Every exception of the tree pickles (for multiprocessing and worker
    processes): its arguments and attributes travel, whatever its constructor.
    """

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class ConfigError(BusEventsError):
    """Configuration or usage is invalid; nothing was sent."""


class TokenError(ConfigError):
    """No usable bearer token was found."""


class TransportError(BusEventsError):
    """The network failed while talking to ``url``."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class ConnectError(TransportError):
    """The provider could not be reached."""


class Timeout(TransportError):
    """A deadline passed; ``timeout`` is the limit that fired, in seconds."""

    def __init__(self, message: str, *, url: str, timeout: float) -> None:
        super().__init__(message, url=url)
        self.timeout = timeout


class APIError(BusEventsError):
    """The provider answered with an error status.

    ``status`` is the HTTP status, ``code`` the provider's error code (``None``
    when the body was not a provider error body), ``message`` the provider's
    bounded, printable diagnostic, ``retry_after`` the seconds of a
    ``Retry-After`` header (429, 503), when the provider sent one.
    """

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        url: str,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.url = url
        self.retry_after = retry_after
        super().__init__(self._describe())

    def _describe(self) -> str:
        label = f"HTTP {self.status}" + (f" {self.code}" if self.code else "")
        return f"{label}: {self.message}" if self.message else label


class BadRequest(APIError):
    """400: the provider rejected the request (name, payload, group, …)."""


class Unauthorized(APIError):
    """401: the token is missing, invalid or expired; :attr:`hint` says what to do."""

    @property
    def hint(self) -> str | None:
        """How to get a token that works, from the provider's reason (None when unknown)."""
        reason = self.message.lower()
        if "expired" in reason or "not valid yet" in reason:
            return (
                "get a new token: bus auth token (for the reference provider: "
                "bus-events dev-token --write, with its BUS_API_JWT_SECRET)"
            )
        if any(word in reason for word in ("signature", "issuer", "audience")):
            return (
                "the token belongs to another deployment or was signed with another secret: "
                "get one for this API URL (bus auth token; for the reference provider, "
                "bus-events dev-token with the BUS_API_JWT_SECRET it serves with)"
            )
        return None


class Forbidden(APIError):
    """403: the token lacks a scope; ``required_scopes`` names what would do."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        url: str,
        retry_after: float | None = None,
        required_scopes: tuple[str, ...] = (),
    ) -> None:
        self.required_scopes = required_scopes
        super().__init__(status, code, message, url=url, retry_after=retry_after)

    @property
    def hint(self) -> str:
        """The command that gets a token with the scopes the provider named."""
        scopes = " ".join(self.required_scopes) or "<scopes>"
        return f'bus auth token --scope "{scopes}"'


class NotFound(APIError):
    """404: nothing answers at that URL; check the Events API URL."""


class PayloadTooLarge(APIError):
    """413: the event is larger than the provider accepts."""


class RateLimited(APIError):
    """429: too many requests; ``retry_after`` seconds, when the provider said."""


class ServerError(APIError):
    """5xx: the provider failed."""


class StreamError(BusEventsError):
    """The event stream broke its framing or contract.

    ``offset`` is the byte offset in the response body where the problem
    starts, ``event_number`` the 1-based number of the event in the stream
    (blank keep-alive lines not counted).
    """

    def __init__(self, message: str, *, offset: int, event_number: int) -> None:
        super().__init__(message)
        self.offset = offset
        self.event_number = event_number


class InvalidEvent(StreamError):
    """A line is not valid JSON, or not an event envelope."""


class LineTooLong(StreamError):
    """A line exceeds the configured maximum line length."""


class StreamTruncated(StreamError):
    """The stream ended in the middle of a line; the partial line was not decoded."""


class StreamInterrupted(StreamError, TransportError):
    """The connection to ``url`` failed while the stream was being read.

    Both a :class:`StreamError` (``offset``, ``event_number``) and a
    :class:`TransportError` (``url``): a handler for network failures catches it.
    """

    def __init__(self, message: str, *, url: str, offset: int, event_number: int) -> None:
        BusEventsError.__init__(self, message)  # both parents' fields are set here
        self.url = url
        self.offset = offset
        self.event_number = event_number


class StreamStalled(StreamInterrupted):
    """No byte (event or keep-alive line) arrived within the stream's stall timeout."""


class InvalidPayload(BusEventsError, ValueError):
    """An event's payload does not decode into the type asked for
    (:meth:`Event.payload_as`).

    ``event_id`` and ``event_name`` name the event, ``path`` the place in the
    payload (``$`` is the payload itself, ``$.items[2].n`` a field inside it);
    the decoder's own error is the ``__cause__``.
    """

    def __init__(self, message: str, *, event_id: str, event_name: str, path: str) -> None:
        super().__init__(message)
        self.event_id = event_id
        self.event_name = event_name
        self.path = path


class ReplyTimeout(Timeout):
    """No reply to a request arrived in time.

    ``name`` is the request's event name, ``correlation_id`` the id it was sent
    with, ``timeout`` the limit that fired, in seconds.
    """

    def __init__(
        self, message: str, *, url: str, timeout: float, name: str, correlation_id: str
    ) -> None:
        super().__init__(message, url=url, timeout=timeout)
        self.name = name
        self.correlation_id = correlation_id

    @classmethod
    def waiting_for(
        cls, name: str, response_name: str, *, timeout: float, correlation_id: str, url: str
    ) -> ReplyTimeout:
        """The error for no ``response_name`` reply to request ``name`` within ``timeout``."""
        return cls(
            f"no {response_name} response to {name} within {timeout:g}s "
            f"(correlation id {correlation_id})",
            url=url,
            timeout=timeout,
            name=name,
            correlation_id=correlation_id,
        )


class ListenerUnavailable(TransportError):
    """A listener that must be connected is not (``BUS_EVENTS_LISTENER_REQUIRED=1``).

    Raised when a required listener's first connection fails, or when its stream
    ends and retrying is turned off; the underlying error is the ``__cause__``.
    ``name`` is the event name the listener streams.
    """

    def __init__(self, message: str, *, url: str, name: str) -> None:
        super().__init__(message, url=url)
        self.name = name


class WorkerError(BusEventsError):
    """The worker runtime failed (above the HTTP layer)."""


class ResponseError(BusEventsError):
    """The response to a request is an error response.

    An error response's payload is shaped like an API error body:
    ``{"error": "<code>", "message": "<text>", ...details}``.  ``code`` and
    ``message`` are those, bounded and printable; ``response`` is the whole
    response :class:`~busevents.Event` (its payload holds the details);
    ``correlation_id`` is the request's.
    """

    def __init__(self, code: str, message: str, *, response: Event, correlation_id: str) -> None:
        self.code = bounded_text(code, 80)
        self.message = bounded_text(message)
        self.response = response
        self.correlation_id = correlation_id
        text = f"error response {self.code} (correlation id {correlation_id})"
        super().__init__(f"{text}: {self.message}" if self.message else text)


class HandlerError(WorkerError):
    """A worker handler raised and the worker was asked to stop on the first error.

    ``worker`` names the worker, ``event_id`` and ``event_name`` the event being
    handled; the handler's exception is the ``__cause__``.
    """

    def __init__(self, message: str, *, worker: str, event_id: str, event_name: str) -> None:
        super().__init__(message)
        self.worker = worker
        self.event_id = event_id
        self.event_name = event_name
