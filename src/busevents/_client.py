"""EventsClient: publish events and stream them, on trio and httpx.

One client holds one connection pool; use it as an async context manager::

    async with EventsClient.from_env() as client:
        accepted = await client.send("example.ping", {"ok": True})
        async with client.listen("example.ping", replay=True, follow=False) as stream:
            async for event in stream:
                print(event.id, event.payload_obj())

Timeouts are trio cancel scopes: ``timeout`` bounds connecting plus each
``send`` exchange, and the opening of a stream (until its headers arrive).
How long a stream is read is the caller's business: wrap the ``async for`` in
``trio.move_on_after`` or ``trio.fail_after``.
"""

from __future__ import annotations

import email.utils
import functools
import logging
import re
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
import trio

from ._config import Token, find_token, normalize_events_url, resolve_url
from ._contracts import Accepted, Delivery, ErrorBody, Event, PublishRequest, StreamSpec
from ._errors import (
    APIError,
    BadRequest,
    ConnectError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    StreamInterrupted,
    StreamStalled,
    Timeout,
    TransportError,
    Unauthorized,
    bounded_text,
)
from ._ndjson import DEFAULT_MAX_LINE, NDJSONDecoder
from ._version import __version__

__all__ = ["EventStream", "EventsClient"]

log = logging.getLogger("busevents")

#: Default bound of connecting plus one HTTP exchange, in seconds (spec §5).
DEFAULT_TIMEOUT: Final = 30.0
#: The most of an error body that is read, in bytes.
MAX_ERROR_BODY: Final = 64 * 1024

_encode = msgspec.json.Encoder().encode
_decode_accepted = msgspec.json.Decoder(Accepted).decode
_decode_error_body = msgspec.json.Decoder(ErrorBody).decode
_SCOPE = re.compile(r"^[A-Za-z0-9:._*-]{1,64}$")


class _EnvelopeCheck(msgspec.Struct, gc=False):
    """What pass-through output validates of each line: an object with id and name."""

    id: str
    name: str


def _keepalive_options() -> list[tuple[int, int, int]]:
    """TCP keep-alive, so that a peer that vanished is noticed on a quiet stream."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default verifying context, built once per process: loading the CA
    bundle costs tens of milliseconds, which every new client would pay again."""
    return httpx.create_ssl_context()


# For http:// URLs no TLS is ever used (redirects are not followed), so no CA bundle
# is loaded; should TLS happen anyway, this context verifies against nothing and fails.
_NO_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _format_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


class EventsClient:
    """A client of one Events API deployment.

    ``url`` is normalised to the events base (spec §1); ``token`` is the bearer
    JWT (a :class:`str` or the :class:`Token` found by :func:`find_token`).
    Use :meth:`from_env` to resolve both the way the CLI does.

    ``max_line`` bounds the length of one streamed line (memory stays bounded
    whatever the server sends).  ``transport`` replaces httpx's default
    transport (tests, proxies).
    """

    def __init__(
        self,
        url: str,
        token: str | Token | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_line: int = DEFAULT_MAX_LINE,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        self.url = normalize_events_url(url)
        parts = urlsplit(self.url)
        self.stream_url = urlunsplit(parts._replace(path=parts.path + "/stream"))
        self.timeout = timeout
        self.max_line = max_line
        value = token.value if isinstance(token, Token) else token
        self._token_value = value or None
        self._token_source = token.source if isinstance(token, Token) else None
        headers = {"User-Agent": f"bus-events/{__version__}"}
        if value:
            headers["Authorization"] = f"Bearer {value}"
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=None,  # deadlines are trio cancel scopes, see _deadline()
            transport=transport
            or httpx.AsyncHTTPTransport(
                verify=_tls_context() if parts.scheme == "https" else _NO_TLS,
                socket_options=_keepalive_options(),
                limits=httpx.Limits(
                    max_connections=max_connections, max_keepalive_connections=max_connections
                ),
            ),
            follow_redirects=False,
        )

    @classmethod
    def from_env(
        cls,
        *,
        api_url: str | None = None,
        token_file: str | None = None,
        env: Mapping[str, str] | None = None,
        **options: Any,
    ) -> EventsClient:
        """Resolve URL and token as the CLI does (spec §4), then build a client.

        URL: ``api_url``, else ``BUS_EVENTS_API_URL``.  Token: ``token_file``,
        else ``BUS_API_TOKEN``, else ``BUS_EVENTS_TOKEN_FILE``, else
        ``auth/api-token`` under the Bus config root.  Raises
        :class:`ConfigError` / :class:`TokenError` naming what is missing.
        """
        url = resolve_url(api_url, env)
        return cls(url, find_token(token_file, env), **options)

    def __repr__(self) -> str:
        token = "None" if self._http.headers.get("Authorization") is None else "<hidden>"
        if self._token_source:
            token = f"<hidden, from {self._token_source}>"
        return f"EventsClient(url={self.url!r}, token={token}, timeout={self.timeout!r})"

    async def __aenter__(self) -> EventsClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        with trio.CancelScope(shield=True):
            await self._http.aclose()

    # -- publish -----------------------------------------------------------

    async def send(
        self,
        name: str,
        payload: Any = None,
        *,
        correlation_id: str | None = None,
        metadata: dict[str, str] | None = None,
        identity_id: str | None = None,
    ) -> Accepted:
        """Publish one event; return the provider's acceptance.

        ``payload`` is any value msgspec can encode, or :class:`msgspec.Raw`
        holding JSON that is already encoded.  ``identity_id`` is honoured by
        providers only for service tokens.  Raises :class:`APIError` subclasses
        for error statuses, :class:`TransportError` subclasses for network
        failures.  Nothing is retried: an event is never published twice.
        """
        accepted, _ = await self.publish(
            PublishRequest(
                name=name,
                payload=payload
                if isinstance(payload, msgspec.Raw)
                else msgspec.Raw(_encode(payload)),
                correlation_id=correlation_id,
                metadata=metadata,
                identity_id=identity_id,
            )
        )
        return accepted

    async def publish(self, request: PublishRequest, *, retries: int = 0) -> tuple[Accepted, bytes]:
        """Publish ``request``; return the acceptance and the provider's JSON body.

        Nothing is retried unless ``retries`` > 0: then a 5xx, a 429 or a network
        failure is retried up to that many times, after 0.5 s doubling to 10 s at
        most, and never sooner than the provider's ``Retry-After``.  An attempt
        whose answer was lost may have been published, so a retried event can
        arrive twice: it always carries a correlation id (one is generated when
        ``request`` has none) for consumers to de-duplicate by.
        """
        if retries and request.correlation_id is None:
            request = msgspec.structs.replace(request, correlation_id=uuid.uuid4().hex)
        body = _encode(request)
        delay = 0.5
        for attempt in range(retries + 1):
            try:
                return await self._publish_once(body)
            except (ServerError, RateLimited, TransportError) as exc:
                if attempt == retries:
                    raise
                wait = max(delay, getattr(exc, "retry_after", None) or 0.0)
                log.info(
                    "publish failed (%s); retry %d of %d in %gs", exc, attempt + 1, retries, wait
                )
                await trio.sleep(wait)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _publish_once(self, body: bytes) -> tuple[Accepted, bytes]:
        with self._deadline(self.url):
            try:
                response = await self._http.post(
                    self.url, content=body, headers={"Content-Type": "application/json"}
                )
            except httpx.HTTPError as exc:
                self._raise_transport(exc, self.url)
        if response.status_code not in (200, 201, 202):
            raise self._api_error(response, response.content, self.url)
        try:
            return _decode_accepted(response.content), response.content
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise APIError(
                response.status_code,
                None,
                f"the provider accepted the event but its reply is not an acceptance ({exc}): "
                + self._redact(bounded_text(response.content, 120)),
                url=self.url,
            ) from None

    def _redact(self, text: str) -> str:
        """Remove the token from text a server sent (a hostile server may echo it)."""
        token = self._token_value
        return text.replace(token, "<redacted>") if token and token in text else text

    def _api_error(self, response: httpx.Response, body: bytes, url: str) -> APIError:
        error = _api_error(response.status_code, response.headers, body, url)
        if self._token_value and self._token_value in error.message:
            error.message = self._redact(error.message)
            error.args = (error._describe(),)
        return error

    # -- stream ------------------------------------------------------------

    @asynccontextmanager
    async def listen(
        self,
        name: str,
        *,
        delivery: Delivery | str = Delivery.BROADCAST,
        group: str | None = None,
        consumer: str | None = None,
        replay: bool = False,
        follow: bool = True,
        stall_timeout: float | None = None,
    ) -> AsyncIterator[EventStream]:
        """Open a stream of events named ``name``; iterate it in the block.

        ``delivery="unicast"`` with a ``group`` makes listeners of that group
        compete (one of them gets each event).  ``replay`` first sends the
        history; ``follow=False`` ends the stream after it.  Leaving the block
        closes the response.

        ``stall_timeout``: a following stream may carry no event for hours, and a
        peer that froze (or a network path that died silently) sends nothing
        either.  With a stall timeout, a stream that delivers no byte at all —
        neither an event nor the provider's blank keep-alive line — for that many
        seconds raises :class:`StreamStalled`.  Set it to a few keep-alive
        intervals of the provider (the reference provider's is 15 s).

        Raises :class:`APIError` subclasses when the provider refuses the stream
        (before any event).
        """
        spec = StreamSpec(name, Delivery.parse(delivery), group, consumer, replay, follow)
        request = self._http.build_request(
            "GET",
            self.stream_url,
            params=spec.to_params(),
            headers={"Accept": "application/x-ndjson"},
        )
        with self._deadline(self.stream_url):
            try:
                response = await self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                self._raise_transport(exc, self.stream_url)
        try:
            if response.status_code != 200:
                body = await _read_bounded(response)
                raise self._api_error(response, body, self.stream_url)
            stream = EventStream(response, spec, self.max_line, self.stream_url, stall_timeout)
            try:
                yield stream
            finally:
                await stream.aclose()
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()

    # -- helpers -----------------------------------------------------------

    def _deadline(self, url: str) -> _Deadline:
        return _Deadline(self.timeout, url)

    @staticmethod
    def _raise_transport(exc: httpx.HTTPError, url: str) -> NoReturn:
        reason = bounded_text(_reason(exc), 200)
        if isinstance(exc, httpx.ConnectError | httpx.UnsupportedProtocol):
            raise ConnectError(f"cannot connect to {url}: {reason}", url=url) from exc
        raise TransportError(f"request to {url} failed: {reason}", url=url) from exc


def _reason(exc: BaseException) -> str:
    """The first non-empty message down the exception's cause chain (httpcore often
    wraps an ``ssl.SSLError`` or ``OSError`` in an exception with no message)."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if text:
            return text if seen is exc else f"{type(seen).__name__}: {text}"
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


class _Deadline:
    """``trio.fail_after`` that raises our :class:`Timeout`, naming URL and limit."""

    __slots__ = ("_scope", "timeout", "url")

    def __init__(self, timeout: float | None, url: str) -> None:
        self.timeout = timeout
        self.url = url
        self._scope = trio.CancelScope(
            deadline=trio.current_time() + timeout if timeout is not None else float("inf")
        )

    def __enter__(self) -> _Deadline:
        self._scope.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> bool | None:
        handled = self._scope.__exit__(*exc_info)
        if self._scope.cancelled_caught:
            assert self.timeout is not None
            raise Timeout(
                f"no answer from {self.url} within {_format_seconds(self.timeout)} "
                "(the --timeout limit)",
                url=self.url,
                timeout=self.timeout,
            )
        return handled


class EventStream:
    """An open stream of events; iterate it with ``async for``.

    ``async for event in stream`` yields :class:`Event` values;
    ``async for batch in stream.batches()`` yields them a list per network read
    (fastest); ``async for block in stream.raw_batches()`` yields the original
    bytes of validated envelope lines (for pass-through output).  Use one of
    the three per stream.  Events received before a broken line or a dropped
    connection are always delivered before the error is raised.
    """

    def __init__(
        self,
        response: httpx.Response,
        spec: StreamSpec,
        max_line: int,
        url: str,
        stall_timeout: float | None = None,
    ) -> None:
        self.spec = spec
        self._stall_timeout = stall_timeout
        self.url = url
        self.bytes_received = 0
        self._response = response
        self._max_line = max_line
        self._chunks: AsyncIterator[bytes] | None = None
        self._decoder: NDJSONDecoder[Any] | None = None
        self._feed: Any = None
        self._pending: list[Event] = []
        self._pos = 0

    @property
    def events_received(self) -> int:
        """Complete events received so far."""
        return self._decoder.events if self._decoder is not None else 0

    def __aiter__(self) -> EventStream:
        self._begin(Event, raw=False)
        return self

    async def __anext__(self) -> Event:
        if self._pos < len(self._pending):
            event = self._pending[self._pos]
            self._pos += 1
            return event
        batch = await self._read()
        if batch is None:
            raise StopAsyncIteration
        self._pending, self._pos = batch, 1
        return batch[0]  # type: ignore[no-any-return]

    def batches(self) -> AsyncIterator[list[Event]]:
        """The events, a list per network read."""
        self._begin(Event, raw=False)
        return _Batches(self)

    def raw_batches(self) -> AsyncIterator[bytes]:
        """Validated envelope lines, their original bytes, a block per network read.

        Each line is checked to be a JSON object with string ``id`` and ``name``;
        blank keep-alive lines are left out; nothing is re-encoded.
        """
        self._begin(_EnvelopeCheck, raw=True)
        return _RawBlocks(self)

    def _begin(self, type: Any, *, raw: bool) -> None:
        if self._decoder is not None:
            raise RuntimeError("this stream is already being read")
        self._decoder = decoder = NDJSONDecoder(type, max_line=self._max_line)
        self._feed = decoder.feed_raw if raw else decoder.feed
        self._chunks = self._response.aiter_raw()

    async def _read(self) -> list[Any] | None:
        """The next non-empty batch, or None at the clean end of the stream."""
        decoder, chunks, feed = self._decoder, self._chunks, self._feed
        assert decoder is not None and chunks is not None
        while True:
            decoder.check()  # an error found with the last batch, once it was consumed
            try:
                if self._stall_timeout is None:
                    chunk = await chunks.__anext__()
                else:
                    chunk = await self._read_or_stall(chunks, self._stall_timeout)
            except StopAsyncIteration:
                decoder.close()
                return None
            except httpx.HTTPError as exc:
                raise StreamInterrupted(
                    f"connection to {self.url} failed after {decoder.events} events "
                    f"({decoder.offset} bytes): " + bounded_text(_reason(exc), 200),
                    offset=decoder.offset,
                    event_number=decoder.events + 1,
                ) from exc
            self.bytes_received += len(chunk)
            batch = feed(chunk)
            if batch:
                return batch  # type: ignore[no-any-return]

    async def _read_or_stall(self, chunks: AsyncIterator[bytes], limit: float) -> bytes:
        with trio.move_on_after(limit):
            return await chunks.__anext__()
        decoder = self._decoder
        assert decoder is not None
        raise StreamStalled(
            f"no data from {self.url} for {_format_seconds(limit)} (the stall timeout) "
            f"after {decoder.events} events; the connection is presumed dead",
            offset=decoder.offset,
            event_number=decoder.events + 1,
        )

    async def aclose(self) -> None:
        """Stop reading; the owning ``listen`` block closes the connection."""
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            with trio.CancelScope(shield=True):
                await chunks.aclose()  # type: ignore[attr-defined]


class _Batches:
    __slots__ = ("_stream",)

    def __init__(self, stream: EventStream) -> None:
        self._stream = stream

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> list[Event]:
        batch = await self._stream._read()
        if batch is None:
            raise StopAsyncIteration
        return batch


class _RawBlocks:
    """One validated block of envelope lines per step (a read gives one or two)."""

    __slots__ = ("_blocks", "_stream")

    def __init__(self, stream: EventStream) -> None:
        self._stream = stream
        self._blocks: list[bytes] = []

    def __aiter__(self) -> _RawBlocks:
        return self

    async def __anext__(self) -> bytes:
        if not self._blocks:
            blocks = await self._stream._read()
            if blocks is None:
                raise StopAsyncIteration
            self._blocks = blocks
        return self._blocks.pop(0)


async def _read_bounded(response: httpx.Response, limit: int = MAX_ERROR_BODY) -> bytes:
    body = bytearray()
    try:
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) >= limit:
                break
    except httpx.HTTPError:
        pass  # the status already says what matters
    return bytes(body[:limit])


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


_STATUS_ERRORS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    413: PayloadTooLarge,
    429: RateLimited,
}


def _api_error(status: int, headers: httpx.Headers, body: bytes, url: str) -> APIError:
    """The typed error for an error response, its diagnostic bounded and printable."""
    code: str | None = None
    message = ""
    scopes: tuple[str, ...] = ()
    try:
        parsed = _decode_error_body(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        message = bounded_text(body)
    else:
        code = bounded_text(parsed.error, 40) if parsed.error else None
        message = bounded_text(parsed.message or "") or ("" if code else bounded_text(body))
        scopes = tuple(s for s in parsed.required_scopes or () if _SCOPE.match(s))
    if not message:
        message = httpx.codes.get_reason_phrase(status)
        if not body:
            message = f"{message} (empty body)".strip()
    cls = _STATUS_ERRORS.get(status) or (ServerError if status >= 500 else APIError)
    if cls is Forbidden:
        return Forbidden(status, code, message, url=url, required_scopes=scopes)
    if cls is RateLimited:
        return RateLimited(
            status, code, message, url=url, retry_after=_retry_after(headers.get("retry-after"))
        )
    return cls(status, code, message, url=url)
