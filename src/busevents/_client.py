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

import functools
import logging
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import msgspec
import trio

from ._config import (
    Token,
    check_token,
    find_token,
    normalize_events_url,
    resolve_url,
    token_refresh_from_env,
)
from ._contracts import Accepted, Delivery, PublishRequest, StreamSpec, raw_json
from ._errors import APIError, Timeout, TransportError, bounded_text
from ._ndjson import DEFAULT_MAX_LINE
from ._publish import LeanPublisher, LeanResponse, proxy_configured
from ._responses import (
    MAX_BODY,
    api_error,
    format_seconds,
    raise_transport,
    read_body,
    read_bounded,
)
from ._retry import Backoff, RetryPolicy, is_retryable
from ._tokens import TokenKeeper, TokenProvider
from ._version import __version__

if TYPE_CHECKING:
    # httpx (and _stream, which needs it) are imported when first used: a client
    # that only publishes over the lean path never loads httpx and httpcore.
    import httpx

    from ._stream import EventStream

__all__ = ["EventsClient"]

log = logging.getLogger("busevents")

#: Default bound of connecting plus one HTTP exchange, in seconds (spec §5).
DEFAULT_TIMEOUT: Final = 30.0
#: The backoff of :meth:`EventsClient.publish` retries.
PUBLISH_RETRY: Final = RetryPolicy(min_delay=0.5, max_delay=10.0)

_encode = msgspec.json.Encoder().encode
_decode_accepted = msgspec.json.Decoder(Accepted).decode


def _as_raw(payload: Any) -> msgspec.Raw:
    """A payload as JSON: bytes are JSON already (checked), anything else is encoded."""
    if isinstance(payload, msgspec.Raw):
        return payload
    if isinstance(payload, bytes | bytearray | memoryview):
        return raw_json(payload)
    return msgspec.Raw(_encode(payload))


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
    import httpx

    return httpx.create_ssl_context()


# For http:// URLs no TLS is ever used (redirects are not followed), so no CA bundle
# is loaded; should TLS happen anyway, this context verifies against nothing and fails.
_NO_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class EventsClient:
    """A client of one Events API deployment.

    ``url`` is normalised to the events base (spec §1); ``token`` is the bearer
    JWT (a :class:`str` or the :class:`Token` found by :func:`find_token`).
    Use :meth:`from_env` to resolve both the way the CLI does.

    ``token_refresh``: when a request gets 401, re-read the token from the
    file it came from and send the request once more; renew it too shortly
    before its JWT ``exp`` (``BUS_EVENTS_TOKEN_REFRESH=1`` in :meth:`from_env`).
    ``token_provider``: a callable (sync or async) returning the current
    token, for tokens that come from elsewhere; it implies refresh and is
    called for the first token when ``token`` is None.  A new token is used by
    every later request; :attr:`token_refreshes` counts the renewals.

    ``max_line`` bounds the length of one streamed line (memory stays bounded
    whatever the server sends).  ``transport`` replaces httpx's default
    transport (tests, proxies).
    """

    def __init__(
        self,
        url: str,
        token: str | Token | None = None,
        *,
        token_provider: TokenProvider | None = None,
        token_refresh: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_line: int = DEFAULT_MAX_LINE,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        self.url = normalize_events_url(url)
        parts = urlsplit(self.url)
        self.stream_url = urlunsplit(parts._replace(path=parts.path + "/stream"))
        # The stream's parameters go after the configured query, which is kept (spec §1).
        self._stream_query_start = self.stream_url + ("&" if parts.query else "?")
        self.timeout = timeout
        self.max_line = max_line
        if isinstance(token, str) and token:
            check_token(token, "the token argument")
        # identity: a stream is read raw, and no body may inflate beyond what is read.
        headers = {"User-Agent": f"bus-events/{__version__}", "Accept-Encoding": "identity"}
        self._headers = headers
        self._transport = transport
        self._max_connections = max_connections
        self._http_client: httpx.AsyncClient | None = None
        self._token = TokenKeeper(
            token, provider=token_provider, refresh=token_refresh, on_change=self._set_token
        )
        # Publishing goes over the lean h11 path unless the caller chose the transport
        # or a proxy applies (httpx knows proxies); see _publish.py for why.
        self._lean: LeanPublisher | None = None
        if transport is None and not proxy_configured():
            self._lean = LeanPublisher(
                self.url,
                user_agent=headers["User-Agent"],
                ssl_context=_tls_context,
                socket_options=_keepalive_options(),
                max_connections=max_connections,
            )

    @property
    def _http(self) -> httpx.AsyncClient:
        """The httpx client (streams, and publishing when the lean path does not
        apply), built on first use."""
        if self._http_client is None:
            import httpx

            https = urlsplit(self.url).scheme == "https"
            self._http_client = httpx.AsyncClient(
                headers=self._headers,
                timeout=None,  # deadlines are trio cancel scopes, see _deadline()
                transport=self._transport
                or httpx.AsyncHTTPTransport(
                    verify=_tls_context() if https else _NO_TLS,
                    socket_options=_keepalive_options(),
                    limits=httpx.Limits(
                        max_connections=self._max_connections,
                        max_keepalive_connections=self._max_connections,
                    ),
                ),
                follow_redirects=False,
            )
        return self._http_client

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
        options.setdefault("token_refresh", token_refresh_from_env(env))
        return cls(url, find_token(token_file, env), **options)

    def __repr__(self) -> str:
        source = self._token.source
        token = f"<hidden, from {source}>" if source else "None"
        return f"EventsClient(url={self.url!r}, token={token}, timeout={self.timeout!r})"

    @property
    def token_refreshes(self) -> int:
        """How many times this client put a new token in place (for metrics)."""
        return self._token.refreshes

    @property
    def _token_value(self) -> str | None:
        return self._token.value

    def _set_token(self, value: str | None) -> None:
        # Headers are merged into every request built after this point.
        for headers in (
            self._headers,
            *((self._http_client.headers,) if self._http_client else ()),
        ):
            if value:
                headers["Authorization"] = f"Bearer {value}"
            else:
                headers.pop("Authorization", None)

    async def _unauthorized(self, used: str | None, error: APIError) -> bool:
        """After a 401 sent with ``used``: True to send again with a renewed token;
        otherwise ``error`` gets the reason refresh could not help."""
        again, note = await self._token.after_unauthorized(used)
        if note:
            error.message = f"{error.message}; {note}" if error.message else note
            error.args = (error._describe(),)
        return again

    async def __aenter__(self) -> EventsClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        with trio.CancelScope(shield=True):
            if self._lean is not None:
                await self._lean.aclose()
            if self._http_client is not None:
                await self._http_client.aclose()

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

        ``payload`` is any value msgspec can encode, or JSON that is already
        encoded: :class:`msgspec.Raw` or ``bytes`` (checked to be one JSON
        value, :class:`ValueError` otherwise; bytes are never base64-encoded).
        ``identity_id`` is honoured by providers only for service tokens.
        Raises :class:`APIError` subclasses for error statuses,
        :class:`TransportError` subclasses for network failures.  Nothing is
        retried: an event is never published twice.
        """
        accepted, _ = await self.publish(
            PublishRequest(
                name=name,
                payload=_as_raw(payload),
                correlation_id=correlation_id,
                metadata=metadata,
                identity_id=identity_id,
            )
        )
        return accepted

    async def publish(
        self, request: PublishRequest, *, retries: int = 0, idempotency_key: str | None = None
    ) -> tuple[Accepted, bytes]:
        """Publish ``request``; return the acceptance and the provider's JSON body.

        ``idempotency_key`` is sent as the ``Idempotency-Key`` header (every attempt):
        a provider that knows it answers a repeat with the original acceptance.

        Nothing is retried unless ``retries`` > 0: then a 5xx, a 408, a 429 or a
        network failure is retried up to that many times, with the shared backoff
        (:data:`PUBLISH_RETRY`: full jitter from 0.5 s up to 10 s, the provider's
        ``Retry-After`` honoured up to 5 minutes).  An attempt
        whose answer was lost may have been published, so a retried event can
        arrive twice: it always carries a correlation id (one is generated when
        ``request`` has none) for consumers to de-duplicate by.
        """
        if retries and request.correlation_id is None:
            request = msgspec.structs.replace(request, correlation_id=uuid.uuid4().hex)
        body = _encode(request)
        backoff = Backoff(PUBLISH_RETRY)
        while True:
            try:
                return await self._publish_once(body, idempotency_key)
            except APIError as exc:
                if backoff.failures == retries or not is_retryable(exc):
                    raise
                error: APIError | TransportError = exc
            except TransportError as exc:
                if backoff.failures == retries:
                    raise
                error = exc
            wait = backoff.next_delay(error)
            log.info(
                "publish failed (%s); retry %d of %d in %.2fs",
                error,
                backoff.failures,
                retries,
                wait,
            )
            await trio.sleep(wait)

    async def _publish_once(
        self, body: bytes, idempotency_key: str | None = None
    ) -> tuple[Accepted, bytes]:
        response: httpx.Response | LeanResponse
        while True:
            used = await self._token.current()
            with self._deadline(self.url):
                if self._lean is not None:
                    # The lean path reads at most 1 MiB and never inflates.
                    response = await self._lean.post(body, used, idempotency_key)
                    content = response.content[:MAX_BODY]
                    more = len(response.content) > MAX_BODY
                else:
                    import httpx

                    headers = {"Content-Type": "application/json"}
                    if idempotency_key is not None:
                        headers["Idempotency-Key"] = idempotency_key
                    request = self._http.build_request(
                        "POST", self.url, content=body, headers=headers
                    )
                    try:
                        response = await self._http.send(request, stream=True)
                    except httpx.HTTPError as exc:
                        raise_transport(exc, self.url)
                    try:
                        # Bounded, and never inflated beyond the bound (a hostile or broken
                        # server may send an endless body or a gzip bomb).
                        ok = response.status_code in (200, 201, 202)
                        content, more = await read_body(response, url=self.url if ok else None)
                    finally:
                        with trio.CancelScope(shield=True):
                            await response.aclose()
            if response.status_code in (200, 201, 202):
                break
            error = self._api_error(response, content, self.url)
            if response.status_code != 401 or not await self._unauthorized(used, error):
                raise error
        try:
            if more:
                raise ValueError(f"longer than {MAX_BODY // 1024} KiB")
            return _decode_accepted(content), content
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            raise APIError(
                response.status_code,
                None,
                f"the provider accepted the event but its reply is not an acceptance ({exc}): "
                + self._redact(bounded_text(content, 120)),
                url=self.url,
            ) from None

    def _redact(self, text: str) -> str:
        """Remove the tokens from text a server sent (a hostile server may echo them)."""
        for token in self._token.values:
            if token in text:
                text = text.replace(token, "<redacted>")
        return text

    def _api_error(
        self, response: httpx.Response | LeanResponse, body: bytes, url: str
    ) -> APIError:
        error = api_error(response.status_code, response.headers, body, url)
        if any(token in error.message for token in self._token.values):
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
        after: str | None = None,
        stall_timeout: float | None = None,
        correlation_id: str | None = None,
    ) -> AsyncIterator[EventStream]:
        """Open a stream of events named ``name``; iterate it in the block.

        ``delivery="unicast"`` with a ``group`` makes listeners of that group
        compete (one of them gets each event).  ``replay`` first sends the
        history; ``follow=False`` ends the stream after it.  Leaving the block
        closes the response.

        ``after``: resume after the event with this id — the history starts with
        the first later event (implies ``replay``; an extension of the contract,
        ``after=<id>``).  Against a provider that ignores the parameter, the
        stream skips the events up to the cursor itself (ids of the
        ``"<ms>-<seq>"`` form compare as integer pairs).

        ``stall_timeout``: a following stream may carry no event for hours, and a
        peer that froze (or a network path that died silently) sends nothing
        either.  With a stall timeout, a stream that delivers no byte at all —
        neither an event nor the provider's blank keep-alive line — for that many
        seconds raises :class:`StreamStalled`.  Set it to a few keep-alive
        intervals of the provider (the reference provider's is 15 s).

        ``correlation_id``: yield only the events carrying this correlation id
        (a reply to one request, say).  The filter runs here, in the client:
        the provider still sends every event of ``name`` (the API has no such
        parameter), so prefer a dedicated event name for high-volume traffic.

        Raises :class:`APIError` subclasses when the provider refuses the stream
        (before any event).
        """
        import httpx

        from ._stream import EventStream

        replay = replay or after is not None
        spec = StreamSpec(name, Delivery.parse(delivery), group, consumer, replay, follow, after)
        while True:
            used = await self._token.current()
            request = self._http.build_request(
                "GET",
                self._stream_query_start + urlencode(spec.to_params(), quote_via=quote),
                headers={"Accept": "application/x-ndjson"},
            )
            with self._deadline(self.stream_url):
                try:
                    response = await self._http.send(request, stream=True)
                except httpx.HTTPError as exc:
                    raise_transport(exc, self.stream_url)
            if response.status_code != 401:
                break
            try:
                body = await read_bounded(response)
            finally:
                with trio.CancelScope(shield=True):
                    await response.aclose()
            error = self._api_error(response, body, self.stream_url)
            if not await self._unauthorized(used, error):
                raise error
        try:
            if response.status_code != 200:
                body = await read_bounded(response)
                raise self._api_error(response, body, self.stream_url)
            stream = EventStream(
                response,
                spec,
                self.max_line,
                self.stream_url,
                stall_timeout,
                correlation_id=correlation_id,
            )
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
                f"no answer from {self.url} within {format_seconds(self.timeout)} "
                "(the timeout= limit)",
                url=self.url,
                timeout=self.timeout,
            ) from None  # the trio.Cancelled behind it is an implementation detail
        return handled
