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

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import trio

from ._attempts import Attempts, acceptance, as_raw, error_for
from ._config import Token, check_token, client_from_env, normalize_events_url
from ._contracts import Accepted, Delivery, PublishRequest, StreamSpec
from ._errors import APIError, Timeout, TransportError
from ._http import (
    DEFAULT_TIMEOUT,
    MAX_CONNECTIONS,
    HttpxStream,
    HttpxTransport,
    RequestHeaders,
    Response,
    Transport,
    client_network,
    httpx_client,
    httpx_error,
    keepalive_options,
)
from ._ndjson import DEFAULT_MAX_LINE
from ._publish import LeanTransport, StreamResponse
from ._responses import format_seconds
from ._tokens import TokenKeeper, TokenProvider

if TYPE_CHECKING:
    # httpx (and _stream, which needs it) are imported when first used: a client
    # that only publishes over the lean path never loads httpx and httpcore.
    import httpx

    from ._stream import EventStream

__all__ = ["EventsClient"]

log = logging.getLogger("busevents")


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
    whatever the server sends).  ``transport`` replaces the HTTP transport with
    an httpx one (tests); then no proxy or TLS setting of ours applies.

    Networks: ``proxy`` sends every request through this ``http://`` proxy;
    without it, ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY``
    (any case) decide per request URL, as curl and httpx read them.  ``ca_file``:
    a PEM file of the CAs to trust instead of the default ones (default:
    ``BUS_EVENTS_CA_FILE``; the default trust honours ``SSL_CERT_FILE`` and
    ``SSL_CERT_DIR`` as set when the client is built); ``verify=False`` checks
    no certificate at all (tests only).  ``trust_env=False`` ignores the proxy
    variables and ``BUS_EVENTS_CA_FILE``.
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
        max_connections: int = MAX_CONNECTIONS,
        proxy: str | None = None,
        trust_env: bool = True,
        ca_file: str | None = None,
        verify: bool = True,
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
        self._request_headers = RequestHeaders()
        self._headers = self._request_headers.as_dict()
        self._transport = transport
        self._max_connections = max_connections
        self._proxies, self._trust = client_network(
            proxy, trust_env=trust_env, ca_file=ca_file, verify=verify
        )
        self._http_client: httpx.AsyncClient | None = None
        self._stream_proxy: str | None = None
        self._token = TokenKeeper(
            token, provider=token_provider, refresh=token_refresh, on_change=self._set_token
        )
        # Publishing goes over the lean h11 transport unless the caller chose an httpx
        # one (see _http.py, the seam, and _publish.py for why).
        self._publisher: Transport = (
            LeanTransport(
                proxies=self._proxies,
                ssl_context=self._trust.context,
                socket_options=keepalive_options(),
                max_connections=max_connections,
            )
            if transport is None
            else HttpxTransport(self._http, None)
        )

    @property
    def _http(self) -> httpx.AsyncClient:
        """The httpx client (streams, and publishing through a caller's transport),
        built on first use."""
        if self._http_client is None:
            self._http_client, self._stream_proxy = httpx_client(
                self.stream_url,
                headers=self._headers,
                transport=self._transport,
                proxies=self._proxies,
                trust=self._trust,
                max_connections=self._max_connections,
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
        ``auth/api-token`` under the Bus config root.  CA file:
        ``BUS_EVENTS_CA_FILE`` unless ``ca_file`` is given.  Raises
        :class:`ConfigError` / :class:`TokenError` naming what is missing.
        """
        url, token = client_from_env(api_url, token_file, env, options)
        return cls(url, token, **options)

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
            await self._publisher.aclose()
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
        idempotency_key: str | None = None,
    ) -> Accepted:
        """Publish one event; return the provider's acceptance.

        ``payload`` is any value msgspec can encode, or JSON that is already
        encoded: :class:`msgspec.Raw` or ``bytes`` (checked to be one JSON
        value, :class:`ValueError` otherwise; bytes are never base64-encoded).
        ``identity_id`` is honoured by providers only for service tokens.
        Raises :class:`APIError` subclasses for error statuses,
        :class:`TransportError` subclasses for network failures.  Nothing is
        retried: an event is never published twice.  ``idempotency_key``: see
        :meth:`publish`.
        """
        accepted, _ = await self.publish(
            PublishRequest(
                name=name,
                payload=as_raw(payload),
                correlation_id=correlation_id,
                metadata=metadata,
                identity_id=identity_id,
            ),
            idempotency_key=idempotency_key,
        )
        return accepted

    async def publish(
        self, request: PublishRequest, *, retries: int = 0, idempotency_key: str | None = None
    ) -> tuple[Accepted, bytes]:
        """Publish ``request``; return the acceptance and the provider's JSON body.

        ``idempotency_key`` (1 to 255 printable ASCII characters) is sent as the
        ``Idempotency-Key`` header: a provider that knows it answers a repeat
        with the original acceptance and publishes nothing more.

        Nothing is retried unless ``retries`` > 0: then a 5xx, a 408, a 429 or a
        network failure is retried up to that many times, with the shared backoff
        (:data:`PUBLISH_RETRY`: full jitter from 0.5 s up to 10 s, the provider's
        ``Retry-After`` honoured up to 5 minutes).  Every attempt of the call
        carries the same idempotency key (one of 128 random bits is generated
        when none is given), so a provider that honours keys publishes the event
        once even when an answer was lost; one that does not may publish it
        twice, and the event always carries a correlation id (one is generated
        when ``request`` has none) for consumers to de-duplicate by.
        """
        attempts = Attempts(request, retries, idempotency_key)
        while True:
            try:
                return await self._publish_once(attempts.body, attempts.key)
            except (APIError, TransportError) as exc:
                wait = attempts.wait_after(exc)
            await trio.sleep(wait)

    async def _publish_once(self, body: bytes, key: str | None) -> tuple[Accepted, bytes]:
        while True:
            used = await self._token.current()
            headers = self._request_headers.publish(used, key)
            with self._deadline(self.url):
                response = await self._publisher.post(self.url, headers, body)
            if response.status_code in (200, 201, 202):
                return acceptance(response, self.url, self._token.values)
            error = self._api_error(response, response.content, self.url)
            if response.status_code != 401 or not await self._unauthorized(used, error):
                raise error

    def _api_error(
        self, response: Response | StreamResponse | HttpxStream, body: bytes, url: str
    ) -> APIError:
        return error_for(response.status_code, response.headers, body, url, self._token.values)

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
        from ._stream import EventStream

        replay = replay or after is not None
        spec = StreamSpec(name, Delivery.parse(delivery), group, consumer, replay, follow, after)
        query = urlencode(spec.to_params(), quote_via=quote)
        while True:
            used = await self._token.current()
            with self._deadline(self.stream_url):
                response = await self._open_stream(query, used)
            if response.status_code != 401:
                break
            try:
                body = await response.read_bounded()
            finally:
                with trio.CancelScope(shield=True):
                    await response.aclose()
            error = self._api_error(response, body, self.stream_url)
            if not await self._unauthorized(used, error):
                raise error
        try:
            if response.status_code != 200:
                body = await response.read_bounded()
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

    async def _open_stream(self, query: str, token: str | None) -> StreamResponse | HttpxStream:
        """The stream request sent and its response's head read, on the lean path (its
        own connection, large reads) or through the caller's httpx transport."""
        if isinstance(self._publisher, LeanTransport):
            headers = self._request_headers.stream(token)
            return await self._publisher.open_stream(self.stream_url, headers, query)
        import httpx

        request = self._http.build_request(
            "GET", self._stream_query_start + query, headers={"Accept": "application/x-ndjson"}
        )
        try:
            return HttpxStream(await self._http.send(request, stream=True))
        except httpx.HTTPError as exc:
            raise httpx_error(exc, self.stream_url, self._stream_proxy) from exc

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
