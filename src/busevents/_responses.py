"""From HTTP responses to busevents' exceptions, and bounded bodies.

Every error status becomes the :class:`APIError` subclass a caller catches,
with the provider's diagnostic bounded and printable (failures below HTTP are
mapped in ``_http.transport_error``).
"""

from __future__ import annotations

import re
import time
import zlib
from typing import TYPE_CHECKING, Final, Protocol

from ._errors import (
    APIError,
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    Unauthorized,
    bounded_text,
)

if TYPE_CHECKING:  # httpx is imported by the code that hands us its objects
    import httpx

__all__ = [
    "MAX_BODY",
    "Inflater",
    "STATUS_ERRORS",
    "Headers",
    "api_error",
    "decode_body",
    "describe_cause",
    "format_seconds",
    "parse_retry_after",
    "read_body",
    "read_bounded",
]

#: The most of a response body that is read (acceptance or error), in bytes.
MAX_BODY: Final = 64 * 1024

_SCOPE = re.compile(r"^[A-Za-z0-9:._*-]{1,64}$")


def format_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def describe_cause(exc: BaseException) -> str:
    """The first non-empty message down the exception's cause chain (httpcore often
    wraps an ``ssl.SSLError`` or ``OSError`` in an exception with no message)."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if text:
            return text if seen is exc else f"{type(seen).__name__}: {text}"
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


class Headers(Protocol):
    """What :func:`api_error` needs of response headers (httpx's, or the lean path's
    dict of lower-case names)."""

    def get(self, key: str, /) -> str | None: ...


class Inflater:
    """Undo a response's ``Content-Encoding`` (gzip or deflate) with bounded output.

    busevents asks for ``identity``; this is for servers and proxies that encode
    anyway.  :meth:`inflate` never returns more than ``max_length`` bytes per
    call, whatever the ratio of the input (a "gzip bomb" inflates piece by
    piece, and a bounded reader stops when it has enough).
    """

    __slots__ = ("_deflate", "_zlib", "encoding")

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._deflate = encoding == "deflate"
        # gzip: a gzip header; deflate: zlib's wrapper, or (some servers) raw deflate.
        self._zlib = zlib.decompressobj(zlib.MAX_WBITS | (0 if self._deflate else 16))

    @classmethod
    def of(cls, response: httpx.Response) -> Inflater | None:
        """The inflater for ``response``'s encoding; None for none.

        Raises :class:`ValueError` naming an encoding busevents does not decode.
        """
        return cls.for_encoding(response.headers.get("content-encoding"))

    @classmethod
    def for_encoding(cls, header: str | None) -> Inflater | None:
        """The inflater for a ``Content-Encoding`` value (see :meth:`of`)."""
        encoding = (header or "").strip().lower()
        if encoding in ("", "identity"):
            return None
        if encoding in ("gzip", "x-gzip", "deflate"):
            return cls("deflate" if encoding == "deflate" else "gzip")
        raise ValueError(f"Content-Encoding: {bounded_text(encoding, 40)}")

    @property
    def pending(self) -> bytes:
        """Input not inflated yet because the last call reached its ``max_length``."""
        return self._zlib.unconsumed_tail

    def inflate(self, data: bytes, max_length: int) -> bytes:
        """Inflate ``data`` (plus :attr:`pending` when ``data`` is it) into at most
        ``max_length`` bytes.  Raises :class:`zlib.error` for a corrupt body."""
        try:
            out = self._zlib.decompress(data, max_length)
        except zlib.error:
            if not self._deflate:
                raise
            # Raw deflate without the zlib wrapper (the header is the first thing read).
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
            out = self._zlib.decompress(data, max_length)
        self._deflate = False  # the format is known now
        return out


def decode_body(encoding: str | None, data: bytes, limit: int = MAX_BODY) -> tuple[bytes, bool]:
    """A whole body as read (``Content-Encoding: encoding``), decoded and bounded
    like :func:`read_body`."""
    try:
        inflater = Inflater.for_encoding(encoding)
    except ValueError as exc:
        return f"(a body with {exc}, not decoded)".encode(), False
    if inflater is not None:
        try:
            data = inflater.inflate(data, limit + 1)
        except zlib.error:
            return f"(the {inflater.encoding} body is corrupt)".encode(), False
    return data[:limit], len(data) > limit


async def read_body(
    response: httpx.Response, limit: int = MAX_BODY, *, raise_errors: bool = False
) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the body, decoded; and whether there was more.

    A gzip or deflate body is inflated up to ``limit`` and no further; a body
    in another encoding reads as a short note saying so.  A network failure
    ends the body where it broke (an error status already says what matters),
    or, with ``raise_errors``, is raised (an ``httpx.HTTPError``).
    """
    try:
        inflater = Inflater.of(response)
    except ValueError as exc:
        return f"(a body with {exc}, not decoded)".encode(), False
    import httpx

    body = bytearray()
    more = False
    try:
        async for chunk in response.aiter_raw():
            if inflater is not None:
                chunk = inflater.inflate(chunk, limit + 1 - len(body))
            body += chunk
            if len(body) > limit:
                more = True
                break
    except httpx.HTTPError:
        if raise_errors:
            raise
    except zlib.error:
        assert inflater is not None
        body += f" (the {inflater.encoding} body is corrupt)".encode()
    return bytes(body[:limit]), more


async def read_bounded(response: httpx.Response, limit: int = MAX_BODY) -> bytes:
    """At most ``limit`` bytes of the (decoded) body: an error body's diagnostic."""
    return (await read_body(response, limit))[0]


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        import email.utils  # only for a Retry-After date: a cost send need not pay

        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


STATUS_ERRORS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    413: PayloadTooLarge,
    429: RateLimited,
}


def api_error(status: int, headers: Headers, body: bytes, url: str) -> APIError:
    """The typed error for an error response, its diagnostic bounded and printable."""
    # msgspec, the wire types and http's phrases only here: a publish that succeeds
    # (the sync path's start-up) need not pay for them.
    from http import HTTPStatus

    import msgspec

    from ._contracts import ErrorBody

    code: str | None = None
    message = ""
    scopes: tuple[str, ...] = ()
    try:
        parsed = msgspec.json.decode(body, type=ErrorBody)
    except (msgspec.DecodeError, msgspec.ValidationError):
        message = bounded_text(body)
    else:
        code = bounded_text(parsed.error, 40) if parsed.error else None
        message = bounded_text(parsed.message or "") or ("" if code else bounded_text(body))
        scopes = tuple(s for s in parsed.required_scopes or () if _SCOPE.match(s))
    if not message:
        try:
            message = HTTPStatus(status).phrase
        except ValueError:
            message = ""
        if not body:
            message = f"{message} (empty body)".strip()
    cls = STATUS_ERRORS.get(status) or (ServerError if status >= 500 else APIError)
    if cls is Forbidden:
        return Forbidden(status, code, message, url=url, required_scopes=scopes)
    if cls is RateLimited:
        return RateLimited(
            status,
            code,
            message,
            url=url,
            retry_after=parse_retry_after(headers.get("retry-after")),
        )
    return cls(status, code, message, url=url)
