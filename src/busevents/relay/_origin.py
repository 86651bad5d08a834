"""What the relay and ``import`` stamp on events, and the checks made before the first
publish: origin metadata only survives at a deployment from a service token.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Final

from .._config import Token
from .._errors import BusEventsError

__all__ = [
    "ORIGIN_ENVIRONMENT",
    "ORIGIN_EVENT",
    "SERVICE_AUDIENCE",
    "check_service_token",
    "origin_key",
    "token_audiences",
]

#: Metadata key: the environment where the event was first published.
ORIGIN_ENVIRONMENT: Final = "bus.origin.environment.id"
#: Metadata key: the event's id in its origin environment.
ORIGIN_EVENT: Final = "bus.origin.event.id"
#: The audience of service tokens: providers keep ``bus.*`` metadata only from those.
SERVICE_AUDIENCE: Final = "ai.hg.fi/internal"


def origin_key(environment_id: str, event_id: str) -> str:
    """The ``Idempotency-Key`` of an event copied from ``environment_id``: the same for
    every copy of one origin event, so a retry or a rerun inside the provider's window
    stores it once (a digest, so any environment id fits the key's 255 ASCII bytes)."""
    import hashlib

    digest = hashlib.sha256(f"{len(environment_id)}:{environment_id}{event_id}".encode())
    return "bus-origin-" + digest.hexdigest()[:40]


def token_audiences(value: str) -> tuple[str, ...] | None:
    """The ``aud`` claim of a JWT, read WITHOUT verifying it (the provider does that);
    None when ``value`` is not a JWT with a string or list ``aud``.  Never raises and
    never shows the token."""
    parts = value.split(".")
    if len(parts) != 3 or len(parts[1]) > 64 * 1024:
        return None
    segment = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        return None
    aud = claims.get("aud") if isinstance(claims, dict) else None
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        return tuple(aud)
    return None


def check_service_token(token: Token, what: str) -> bool:
    """Refuse, before anything is published, a token that cannot set ``bus.*`` metadata.

    Raises :class:`BusEventsError` (naming where the token came from, never its
    value) when its audience says it is an end user's.  Returns whether the
    audience could be read: when not (an opaque token), the caller checks the
    first published event instead.
    """
    audiences = token_audiences(token.value)
    if audiences is None:
        return False
    if SERVICE_AUDIENCE not in audiences:
        raise BusEventsError(
            f"{what}: the token from {token.source} is an end user's (audience "
            f"{', '.join(audiences)[:80]}), and providers drop the bus.origin.* metadata of "
            f"such tokens, so events could arrive twice; use a service token (audience "
            f"{SERVICE_AUDIENCE}); nothing was published"
        )
    return True
