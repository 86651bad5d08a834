"""One publish call, without I/O: its body, its idempotency key, its attempts, its answer.

Shared by :class:`EventsClient` (trio) and :class:`SyncClient` (blocking), so a
publish behaves the same from both: the same retries, keys, errors and messages.

msgspec is imported where it is used, not here: the CLI's fast ``send``
(``cli/_fastsend.py``) encodes its body itself and reads a plain acceptance
with :func:`accepted_fields`, and its start-up need not pay for msgspec.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ._errors import APIError, TransportError, bounded_text
from ._http import MAX_BODY, Response
from ._responses import Headers, api_error

if TYPE_CHECKING:
    import msgspec

    from ._contracts import Accepted, PublishRequest
    from ._retry import Backoff

__all__ = [
    "Attempts",
    "acceptance",
    "accepted_fields",
    "as_raw",
    "encode",
    "error_for",
    "request_body",
    "retry_identity",
]

log = logging.getLogger("busevents")


def encode(value: Any) -> bytes:
    """``value`` as JSON (msgspec's encoder)."""
    import msgspec

    return msgspec.json.encode(value)


def as_raw(payload: Any) -> msgspec.Raw:
    """A payload as JSON: bytes are JSON already (checked), anything else is encoded."""
    import msgspec

    from ._contracts import raw_json

    if isinstance(payload, msgspec.Raw):
        return payload
    if isinstance(payload, bytes | bytearray | memoryview):
        return raw_json(payload)
    return msgspec.Raw(encode(payload))


def retry_identity(
    correlation_id: str | None, retries: int, key: str | None
) -> tuple[str | None, str | None]:
    """The correlation id and idempotency key that every attempt of a publish carries.

    With ``retries``, both are set: generated when not given (the key: 128 random
    bits), so that the provider and the receivers can recognise a duplicate.
    Raises :class:`ValueError` for a ``key`` that cannot be one.
    """
    if key is not None and not (0 < len(key) <= 255 and key.isascii() and key.isprintable()):
        raise ValueError(
            "idempotency_key must be 1 to 255 printable ASCII characters "
            f"(got {len(key)} characters)"
        )
    if retries:
        # os.urandom, not uuid and secrets: their imports cost a one-shot send milliseconds
        if correlation_id is None:
            # uuid.uuid4().hex: 122 random bits, the version (4) and variant bits set
            raw = bytearray(os.urandom(16))
            raw[6] = (raw[6] & 0x0F) | 0x40
            raw[8] = (raw[8] & 0x3F) | 0x80
            correlation_id = raw.hex()
        if key is None:
            key = os.urandom(16).hex()  # secrets.token_hex(16): the same for every attempt
    return correlation_id, key


def request_body(name: str, payload: bytes, correlation_id: str | None) -> bytes:
    """``PublishRequest(name, Raw(payload), correlation_id)`` as msgspec encodes it,
    written with the standard library's ``json`` (without loading msgspec): the same
    field order and escapes, UTF-8 unescaped; :class:`UnicodeEncodeError` for a lone
    surrogate, as msgspec."""
    import json

    head = '{"name":' + json.dumps(name, ensure_ascii=False) + ',"payload":'
    tail = "}"
    if correlation_id is not None:
        tail = ',"correlationId":' + json.dumps(correlation_id, ensure_ascii=False) + "}"
    return head.encode() + payload + tail.encode()


class Attempts:
    """The attempts of one publish call (see :meth:`EventsClient.publish`).

    ``body`` and ``key`` are what every attempt sends; :meth:`wait_after` says how
    long to wait before the next attempt, or re-raises the failure.
    """

    __slots__ = ("_backoff", "body", "key", "retries")

    def __init__(self, request: PublishRequest, retries: int, key: str | None) -> None:
        correlation_id, key = retry_identity(request.correlation_id, retries, key)
        if correlation_id != request.correlation_id:
            import msgspec

            request = msgspec.structs.replace(request, correlation_id=correlation_id)
        self._start(encode(request), retries, key)

    @classmethod
    def encoded(cls, body: bytes, retries: int, key: str | None) -> Attempts:
        """The attempts of a body encoded already, whose correlation id and ``key``
        came from :func:`retry_identity` (the CLI's fast ``send``)."""
        attempts = cls.__new__(cls)
        attempts._start(body, retries, key)
        return attempts

    def _start(self, body: bytes, retries: int, key: str | None) -> None:
        self.body = body
        self.key = key
        self.retries = retries
        self._backoff: Backoff | None = None  # at the first failure

    def wait_after(self, error: APIError | TransportError) -> float:
        """Seconds to wait before trying again after ``error``; raises it when no
        retry is left or retrying cannot help."""
        from ._retry import PUBLISH_RETRY, Backoff, is_retryable

        if self._backoff is None:
            self._backoff = Backoff(PUBLISH_RETRY)
        backoff = self._backoff
        if backoff.failures == self.retries or (
            isinstance(error, APIError) and not is_retryable(error)
        ):
            raise error
        wait = backoff.next_delay(error)
        log.info(
            "publish failed (%s); retry %d of %d in %.2fs",
            error,
            backoff.failures,
            self.retries,
            wait,
        )
        return wait


def error_for(
    status: int, headers: Headers, body: bytes, url: str, tokens: Iterable[str]
) -> APIError:
    """The error of an error response, with any of ``tokens`` the server echoed removed."""
    error = api_error(status, headers, body, url)
    redacted = _redact(error.message, tokens)
    if redacted != error.message:
        error.message = redacted
        error.args = (error._describe(),)
    return error


def acceptance(response: Response, url: str, tokens: Iterable[str]) -> tuple[Accepted, bytes]:
    """The acceptance of a 2xx response; :class:`APIError` when it is not one."""
    import msgspec

    from ._contracts import Accepted

    content = response.content
    try:
        if response.more:
            raise ValueError(f"longer than {MAX_BODY // 1024} KiB")
        return msgspec.json.decode(content, type=Accepted), content
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise APIError(
            response.status_code,
            None,
            f"the provider accepted the event but its reply is not an acceptance ({exc}): "
            + _redact(bounded_text(content, 120), tokens),
            url=url,
        ) from None


def _redact(text: str, tokens: Iterable[str]) -> str:
    """``text`` without the tokens (a hostile server may echo them)."""
    for token in tokens:
        if token and token in text:
            text = text.replace(token, "<redacted>")
    return text


def accepted_fields(response: Response, url: str, tokens: Iterable[str]) -> tuple[str, str, bytes]:
    """The name and id of a 2xx response's acceptance, and the body: what
    :func:`acceptance` gives, without loading msgspec when the body is plainly an
    acceptance (the standard library's ``json`` reads it).

    Plainly: UTF-8, no ``\\u`` escape, no repeated key, no NaN or Infinity, no
    long integer, and every field of :class:`Accepted` of its type.  Any other
    body goes to :func:`acceptance`, so what is accepted, and every error, is
    exactly its.
    """
    content = response.content
    if not response.more and b"\\u" not in content:
        value = _plain_json(content)
        if (
            type(value) is dict
            and type(value.get("id")) is str
            and type(value.get("name")) is str
            and type(value.get("accepted", True)) is bool
            and type(value.get("correlationId", "")) in _OPTIONAL_STR
            and type(value.get("time", "")) in _OPTIONAL_STR
        ):
            return value["name"], value["id"], content
    accepted, content = acceptance(response, url, tokens)
    return accepted.name, accepted.id, content


_OPTIONAL_STR = (str, type(None))


class _NotPlain(Exception):
    pass


def _plain_json(data: bytes) -> Any:
    """``data`` as Python values when it is plain JSON (see :func:`accepted_fields`),
    else None."""
    import json

    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_not_plain,
            parse_int=_short_int,
        )
    except (ValueError, RecursionError, _NotPlain):  # UnicodeDecodeError is a ValueError
        return None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise _NotPlain
    return found


def _not_plain(text: str) -> Any:
    raise _NotPlain


def _short_int(text: str) -> int:
    if len(text) > 18:
        raise _NotPlain
    return int(text)
