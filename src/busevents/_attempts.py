"""One publish call, without I/O: its body, its idempotency key, its attempts, its answer.

Shared by :class:`EventsClient` (trio) and :class:`SyncClient` (blocking), so a
publish behaves the same from both: the same retries, keys, errors and messages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Final

import msgspec

from ._contracts import Accepted, PublishRequest, raw_json
from ._errors import APIError, TransportError, bounded_text
from ._http import MAX_BODY, Response
from ._responses import Headers, api_error
from ._retry import Backoff, RetryPolicy, is_retryable

__all__ = ["PUBLISH_RETRY", "Attempts", "acceptance", "as_raw", "encode", "error_for"]

log = logging.getLogger("busevents")

#: The backoff of publish retries.
PUBLISH_RETRY: Final = RetryPolicy(min_delay=0.5, max_delay=10.0)

encode = msgspec.json.Encoder().encode
_decode_accepted = msgspec.json.Decoder(Accepted).decode


def as_raw(payload: Any) -> msgspec.Raw:
    """A payload as JSON: bytes are JSON already (checked), anything else is encoded."""
    if isinstance(payload, msgspec.Raw):
        return payload
    if isinstance(payload, bytes | bytearray | memoryview):
        return raw_json(payload)
    return msgspec.Raw(encode(payload))


class Attempts:
    """The attempts of one publish call (see :meth:`EventsClient.publish`).

    ``body`` and ``key`` are what every attempt sends; :meth:`wait_after` says how
    long to wait before the next attempt, or re-raises the failure.
    """

    __slots__ = ("_backoff", "body", "key", "retries")

    def __init__(self, request: PublishRequest, retries: int, key: str | None) -> None:
        if key is not None and not (0 < len(key) <= 255 and key.isascii() and key.isprintable()):
            raise ValueError(
                "idempotency_key must be 1 to 255 printable ASCII characters "
                f"(got {len(key)} characters)"
            )
        if retries:
            import secrets
            import uuid

            if request.correlation_id is None:
                request = msgspec.structs.replace(request, correlation_id=uuid.uuid4().hex)
            if key is None:
                key = secrets.token_hex(16)  # 128 random bits, the same for every attempt
        self.body = encode(request)
        self.key = key
        self.retries = retries
        self._backoff = Backoff(PUBLISH_RETRY)

    def wait_after(self, error: APIError | TransportError) -> float:
        """Seconds to wait before trying again after ``error``; raises it when no
        retry is left or retrying cannot help."""
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
    content = response.content
    try:
        if response.more:
            raise ValueError(f"longer than {MAX_BODY // 1024} KiB")
        return _decode_accepted(content), content
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
