"""The bearer token of one client, and how it is renewed (``BUS_EVENTS_TOKEN_REFRESH``).

A client with refresh on (``EventsClient(..., token_refresh=True)``, or a
``token_provider``) renews its token:

* **after a 401**: the token is re-resolved from where it came from (the file
  it was read from, or the provider callable) and the request is sent once
  more with the new token.  A token that did not change is fatal: the 401
  propagates with a note saying so.  A value from ``BUS_API_TOKEN`` cannot
  change, so the note says to use a token file.
* **shortly before it expires**: before a request, when the JWT ``exp`` (read
  without verifying) is less than a quarter of the token's remaining lifetime
  at the time it was obtained away (at most 30 s), the source is re-read; a
  failure to re-read is logged and the current token kept.

The new token is used by every later request of the client.  The value never
appears in a log record or an error; only where it came from does.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import trio

from ._config import TOKEN_REFRESH_ENV, Token, token_expiry
from ._errors import BusEventsError, TokenError

__all__ = ["TokenKeeper", "TokenProvider"]

log = logging.getLogger("busevents")

#: A callable returning the current token (a ``str`` or a :class:`Token`), sync or async.
TokenProvider: TypeAlias = Callable[[], "str | Token | Awaitable[str | Token]"]

#: The longest time before ``exp`` at which a token is renewed, in seconds.
MAX_MARGIN = 30.0
#: The shortest time between two re-reads of the source for an expiring token, in seconds.
MIN_REREAD = 1.0


class TokenKeeper:
    """Holds a client's token and renews it (see the module documentation).

    ``on_change(value)`` is called with each new value (to set the header).
    """

    __slots__ = (
        "_checked",
        "_lock",
        "_margin",
        "_on_change",
        "_provider",
        "_token",
        "refresh",
        "refreshes",
        "values",
    )

    def __init__(
        self,
        token: str | Token | None,
        *,
        provider: TokenProvider | None = None,
        refresh: bool = False,
        on_change: Callable[[str | None], None],
    ) -> None:
        if isinstance(token, str):
            token = Token(token, "the token given to the client") if token else None
        self._token = token
        self._provider = provider
        self.refresh = refresh or provider is not None
        #: How many times a new token was put in place.
        self.refreshes = 0
        #: The values used so far (the newest last), for redacting server echoes.
        self.values: list[str] = [token.value] if token else []
        self._on_change = on_change
        self._lock = trio.Lock()
        self._checked = -math.inf
        self._margin = self._margin_for(token)
        on_change(token.value if token else None)

    @property
    def value(self) -> str | None:
        return self._token.value if self._token else None

    @property
    def source(self) -> str | None:
        if self._token is not None:
            return self._token.source
        return "the token provider" if self._provider is not None else None

    async def current(self) -> str | None:
        """The token to send now, renewed first when it is about to expire."""
        if not self.refresh:
            return self.value
        if self._token is None and self._provider is not None:
            async with self._lock:
                if self._token is None:
                    self._set(await self._load())
            return self.value
        expires = self._token.expires if self._token is not None else None
        if (
            expires is not None
            and time.time() >= expires - self._margin
            and time.monotonic() - self._checked >= MIN_REREAD
        ):
            self._checked = time.monotonic()
            async with self._lock:
                try:
                    token = await self._load()
                except BusEventsError as exc:
                    log.warning("token from %s expires soon; cannot renew it: %s", self.source, exc)
                else:
                    if token.value != self.value:
                        self._set(token)
        return self.value

    async def after_unauthorized(self, used: str | None) -> tuple[bool, str]:
        """A request sent with ``used`` got 401: renew the token if possible.

        Returns ``(True, "")`` when another token is now in place (send the
        request again), else ``(False, note)`` with why not (empty with refresh off).
        """
        if not self.refresh:
            return False, ""
        async with self._lock:
            if self.value != used:
                return True, ""  # another request renewed it meanwhile
            try:
                token = await self._load()
            except BusEventsError as exc:
                return False, f"token refresh failed: {exc}"
            if token.value == used:
                return False, (
                    f"the token re-read from {token.source} has not changed "
                    f"({TOKEN_REFRESH_ENV}=1); write a valid token there"
                )
            self._set(token)
            return True, ""

    async def _load(self) -> Token:
        if self._provider is None:
            if self._token is None:
                raise TokenError("the client has no token to refresh")
            return self._token.reread()
        result = self._provider()
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, Token):
            return result
        if not isinstance(result, str) or not result.strip():
            raise TokenError(
                f"the token provider returned {type(result).__name__}, not a non-empty token"
            )
        return Token(result.strip(), "the token provider")

    def _set(self, token: Token) -> None:
        first = self._token is None
        self._token = token
        self._margin = self._margin_for(token)
        self._checked = -math.inf
        if token.value not in self.values:
            self.values = [*self.values[-3:], token.value]
        if not first:
            self.refreshes += 1
        expires = token.expires
        left = f", valid for {expires - time.time():.0f}s" if expires is not None else ""
        log.info("token %s from %s%s", "loaded" if first else "renewed", token.source, left)
        self._on_change(token.value)

    @staticmethod
    def _margin_for(token: Token | None) -> float:
        expires = token_expiry(token.value) if token is not None else None
        if expires is None:
            return 0.0
        return max(0.0, min(MAX_MARGIN, (expires - time.time()) / 4))
