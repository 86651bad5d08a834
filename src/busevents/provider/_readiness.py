"""``/readyz``'s backend check, with the reason in the body.

A ``503`` says which check failed (``"check": "backend_ping"``), on which
backend, and the backend's own error text: an operator reads the cause from
the probe instead of the log.  The text is the backend's
:class:`~.backends._base.BackendUnavailable` message, which names the server
(``Redis at 127.0.0.1:6379``) and never holds a password (the backends scrub
it); control characters are removed and the length is bounded all the same.
Any other exception is named by its type only.
"""

from __future__ import annotations

import msgspec
import trio

from ._metrics import ProviderMetrics
from .backends._base import Backend, BackendUnavailable

__all__ = ["PING_SECONDS", "backend_not_ready"]

#: How long ``/readyz`` waits for the backend's answer.
PING_SECONDS = 2.0
_MAX_TEXT = 300
_encode = msgspec.json.Encoder().encode


def _clean(text: str) -> str:
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


async def backend_not_ready(backend: Backend, kind: str, metrics: ProviderMetrics) -> bytes | None:
    """``/readyz``'s ``503`` body when the backend does not answer a ping, else ``None``."""
    try:
        with trio.fail_after(PING_SECONDS), metrics.backend_call("ping"):
            await backend.ping()
    except trio.TooSlowError:
        reason = f"the {kind} backend did not answer a ping within {PING_SECONDS:g} s"
    except BackendUnavailable as exc:
        reason = _clean(str(exc)) or f"the {kind} backend does not answer"
    except Exception as exc:
        reason = f"the {kind} backend does not answer: {type(exc).__name__}"
    else:
        return None
    return _encode(
        {
            "ok": False,
            "service": "bus-events",
            "error": "backend_unavailable",
            "check": "backend_ping",
            "backend": kind,
            "message": reason,
        }
    )
