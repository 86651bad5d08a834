"""Bearer-token checks (HS256 JWT) and the minting helper for development tokens.

Verification pins the algorithm to HS256, requires ``exp`` and ``sub``, honours
``nbf`` and ``iat`` with a small leeway, and accepts two audiences: end users
(``ai.hg.fi/api``) and services (``ai.hg.fi/internal``).  Every failure becomes
:class:`AuthError` with a short reason that never contains the token or the key.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.exceptions import InvalidSubjectError

__all__ = [
    "API_AUDIENCE",
    "INTERNAL_AUDIENCE",
    "AuthError",
    "Principal",
    "TokenVerifier",
    "mint_token",
]

API_AUDIENCE = "ai.hg.fi/api"
INTERNAL_AUDIENCE = "ai.hg.fi/internal"
_ALGORITHM = "HS256"
_LEEWAY = 5.0
_MIN_KEY_BYTES = 32
_MAX_TOKEN_CHARS = 16 * 1024

_log = logging.getLogger("busevents.provider")


class AuthError(Exception):
    """A request's credentials were refused; ``str()`` is safe to show the caller.

    ``reason`` is a short fixed code (``missing``, ``expired``, ``signature``, …)
    for metrics and logs.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the token's subject, scopes and kind."""

    subject: str
    scopes: frozenset[str]
    #: True for service tokens (audience ``ai.hg.fi/internal``).
    internal: bool

    def missing(self, required: Iterable[str]) -> list[str]:
        """The scopes of ``required`` this principal lacks, in order."""
        return [scope for scope in required if scope not in self.scopes]


def _scope_text(scopes: str | Iterable[str]) -> str:
    items = scopes.split() if isinstance(scopes, str) else [s for s in scopes]
    for item in items:
        if not item or any(c.isspace() for c in item):
            raise ValueError(f"invalid scope {item!r}: scopes are non-empty words")
    return " ".join(items)


def mint_token(
    secret: bytes,
    *,
    subject: str,
    scopes: str | Iterable[str] = "events:send events:listen",
    audience: str = API_AUDIENCE,
    ttl: float = 3600,
) -> str:
    """Sign an HS256 JWT for a development provider.

    The claims are ``sub``, ``aud``, ``scope`` (space-separated), ``iat``, ``nbf``
    and ``exp`` (``iat + ttl``; a negative ``ttl`` makes an expired token).
    Raises :class:`ValueError` for an empty subject or secret or a malformed scope.

    >>> token = mint_token(b"0" * 32, subject="alice", scopes=["events:send"])
    """
    if not secret:
        raise ValueError("mint_token needs a non-empty secret")
    if not subject:
        raise ValueError("mint_token needs a non-empty subject")
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "aud": audience,
        "scope": _scope_text(scopes),
        "iat": now,
        "nbf": now,
        "exp": int(now + ttl),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return jwt.encode(claims, secret, algorithm=_ALGORITHM)


_REASONS: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "expired", "token has expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid", "token is not valid yet (nbf/iat in the future)"),
    (
        jwt.InvalidAudienceError,
        "audience",
        f"token audience is not accepted (expected {API_AUDIENCE} or {INTERNAL_AUDIENCE})",
    ),
    (jwt.InvalidAlgorithmError, "algorithm", "token algorithm is not allowed (only HS256)"),
    (jwt.InvalidSignatureError, "signature", "token signature does not verify"),
    (InvalidSubjectError, "claims", "token sub claim must be a string"),
    (jwt.InvalidIssuedAtError, "claims", "token iat claim must be a number"),
    (jwt.DecodeError, "malformed", "token is malformed"),
)


def _auth_error(exc: jwt.PyJWTError) -> AuthError:
    # Map to fixed texts: PyJWT's own messages are fine today, but fixed texts
    # guarantee that nothing from the token or the key ever reaches a response.
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return AuthError(f"token lacks the required {exc.claim} claim", "claims")
    for kind, reason, message in _REASONS:
        if isinstance(exc, kind):
            return AuthError(message, reason)
    return AuthError("token is not valid")


def _time_claim(claims: dict[str, Any], name: str, default: float) -> float:
    value = claims.get(name)
    if value is None:
        return default
    try:
        result = float(value)
    except (TypeError, ValueError, OverflowError):
        raise AuthError(f"token {name} claim is not a usable time", "claims") from None
    if not math.isfinite(result):
        raise AuthError(f"token {name} claim is not a usable time", "claims")
    return result


class TokenVerifier:
    """Checks ``Authorization`` header values against one HS256 secret."""

    __slots__ = ("_cache", "_clock", "_quiet", "_secret")

    #: Verified tokens remembered, so that a client's every request does not pay
    #: for HMAC and claim checks again (a tenth of a publish's CPU otherwise).
    CACHE_SIZE = 1024

    def __init__(self, secret: bytes, *, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._clock = clock  # the wall clock of re-checks (tests move it)
        # token → (principal, not before, expires), oldest first
        self._cache: OrderedDict[str, tuple[Principal, float, float]] = OrderedDict()
        self._quiet = len(secret) < _MIN_KEY_BYTES
        if self._quiet:
            _log.warning(
                "the provider secret is shorter than %d bytes: fine for local development only",
                _MIN_KEY_BYTES,
            )

    def verify_header(self, value: bytes | None) -> Principal:
        """Verify an ``Authorization`` header value; raise :class:`AuthError` if refused."""
        if value is None:
            raise AuthError("missing bearer token (Authorization: Bearer <token>)", "missing")
        scheme, _, token = value.decode("latin-1").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("the Authorization header must be 'Bearer <token>'", "scheme")
        if len(token) > _MAX_TOKEN_CHARS:
            raise AuthError("token is too long", "malformed")
        return self.verify(token)

    def verify(self, token: str) -> Principal:
        """Verify a bare token; raise :class:`AuthError` if refused.

        A token verified before is only checked against the clock again, with the
        same leeway, until it expires.
        """
        cached = self._cache.get(token)
        if cached is not None:
            principal, not_before, expires = cached
            if self._in_time(not_before, expires):
                self._cache.move_to_end(token)
                return principal
            del self._cache[token]
        principal, not_before, expires = self._verify(token)
        if not self._in_time(not_before, expires):  # PyJWT checked its own clock
            raise AuthError(
                "token has expired" if self._clock() > expires else "token is not valid yet"
            )
        self._cache[token] = (principal, not_before, expires)
        if len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return principal

    def _in_time(self, not_before: float, expires: float) -> bool:
        return not_before - _LEEWAY <= self._clock() <= expires + _LEEWAY

    def _verify(self, token: str) -> tuple[Principal, float, float]:
        try:
            if self._quiet:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
                    claims = self._decode(token)
            else:
                claims = self._decode(token)
        except jwt.PyJWTError as exc:
            raise _auth_error(exc) from None
        except (OverflowError, ValueError, TypeError, RecursionError):
            # PyJWT compares claims as numbers: an exp of 10**400 or a huge
            # nested header must be a refusal, not a server error.
            raise AuthError("token is malformed", "malformed") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthError("token sub claim must be a non-empty string", "claims")
        principal = Principal(
            subject, _scopes(claims.get("scope")), _is_internal(claims.get("aud"))
        )
        not_before = _time_claim(claims, "nbf", float("-inf"))
        return principal, not_before, _time_claim(claims, "exp", float("-inf"))

    def _decode(self, token: str) -> dict[str, Any]:
        return jwt.decode(
            token,
            self._secret,
            algorithms=[_ALGORITHM],
            audience=[API_AUDIENCE, INTERNAL_AUDIENCE],
            leeway=_LEEWAY,
            options={"require": ["exp", "sub", "aud"]},
        )


def _scopes(claim: object) -> frozenset[str]:
    if claim is None:
        return frozenset()
    if isinstance(claim, str):
        return frozenset(claim.split())
    if isinstance(claim, list) and all(isinstance(item, str) for item in claim):
        return frozenset(claim)
    raise AuthError("token scope claim must be a space-separated string", "claims")


def _is_internal(claim: object) -> bool:
    # A token naming both audiences is treated as an end-user token: least privilege.
    audiences = [claim] if isinstance(claim, str) else claim
    if not isinstance(audiences, list):
        return False
    return INTERNAL_AUDIENCE in audiences and API_AUDIENCE not in audiences
