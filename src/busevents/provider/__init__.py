"""The reference Events API provider, for local development and tests.

It serves the Events API contract (publish, NDJSON stream; spec §1-3) as an ASGI
app on a lean HTTP/1.1 server (h11 over trio streams), with HS256 bearer tokens, a
data-driven scope policy, identity stamping and filtering, broadcast and
unicast fan-out, and replay/follow.  Nothing in the client imports this
package; it needs the ``provider`` extra (``pip install 'busevents[provider]'``).

Behaviour worth knowing (the ``memory`` backend, the default; ``redis`` and
``postgres`` keep events durably and let several processes serve one
deployment: see ``docs/backends.md``):

* **Event ids** are Redis-stream style ``"<unix-ms>-<seq>"``: unique, and
  increasing when compared as integer pairs.  ``time`` is RFC 3339 UTC with
  microseconds and ``Z``.
* **Slow broadcast listeners**: each listener buffers at most
  ``listener_queue`` events; a listener whose buffer is full is disconnected
  (its stream writes what it holds, then ends — like a NATS slow consumer) and
  a warning is logged on ``busevents.provider``.  Publishers and other
  listeners never wait for it.
* **Unicast groups** are keyed by ``(name, owner, group)`` — end users get
  their own groups — and share one buffer among their consumers, which
  compete for events.  A group, once created by a first consumer, keeps
  buffering up to ``listener_queue`` events while no consumer is connected;
  when full, new events for that group are dropped and counted.  Delivery is
  at most once.  Groups are bounded (``max_groups``, ``max_groups_per_identity``:
  one more is ``429``) and freed after ``group_idle`` seconds without a consumer.
  ``replay=true`` with ``delivery=unicast`` is refused (``400``): a group's
  consumers share live events; history is read with a broadcast stream.
* **Memory bounds**: history and every buffer are bounded in events and in
  bytes (``history_limit``/``history_bytes``, ``listener_queue``/
  ``listener_queue_bytes``); the oldest history goes first.
* **Identity**: end-user tokens (audience ``ai.hg.fi/api``) publish as their
  ``sub`` and only ever receive their own events; service tokens (audience
  ``ai.hg.fi/internal``) see every event and may publish on behalf of an
  identity with ``identity_id`` in the body.  Platform metadata keys (``bus.``
  prefix) are kept only from service tokens; an end user's are dropped.
* **Payload**: stored as sent, except that whitespace between JSON tokens is
  removed when it holds a line break (it would break the NDJSON framing).
* **Keep-alive**: a following stream silent for ``keepalive`` seconds writes a
  blank line.
* **Operations**: ``GET /healthz`` and ``GET /readyz`` (the backend answers)
  without a token; ``GET {base}/openapi.json``; Prometheus metrics on a
  separate address (``serve(..., metrics_addr=...)``).  A graceful stop ends
  every stream with its last chunk and closes what is still open after
  ``shutdown_grace`` seconds, whatever the peers do.
* **Wildcards** (``allow_wildcards=True``): ``*`` matches one word, a final
  ``>`` the rest; only service tokens may stream a pattern, and they need every
  listen scope of the policy rows under the pattern's literal prefix.

Example::

    async with open_provider() as provider:
        token = provider.token("alice")
        ...  # POST provider.url; GET provider.url + "/stream?name=example.ping"
"""

# The dependency check must run before the submodules import jwt and prometheus_client.
# ruff: noqa: E402

from __future__ import annotations

_MISSING = "the reference provider needs extra packages: pip install 'busevents[provider]'"


class ProviderDependencyError(ImportError):
    """The ``provider`` extra (PyJWT, prometheus_client) is not installed."""


try:
    import jwt  # noqa: F401
    import prometheus_client  # noqa: F401
except ImportError as _exc:
    raise ProviderDependencyError(_MISSING, name=_exc.name) from _exc

from ._app import EventsApp as EventsApp
from ._app import create_app as create_app
from ._app import make_backend as make_backend
from ._auth import API_AUDIENCE as API_AUDIENCE
from ._auth import INTERNAL_AUDIENCE as INTERNAL_AUDIENCE
from ._auth import mint_token as mint_token
from ._config import PostgresOptions as PostgresOptions
from ._config import ProviderConfig as ProviderConfig
from ._config import RedisOptions as RedisOptions
from ._config import secret_from_env as secret_from_env
from ._openapi import openapi_document as openapi_document
from ._policy import ScopePolicy as ScopePolicy
from ._policy import ScopeRule as ScopeRule
from ._server import RunningProvider as RunningProvider
from ._server import open_provider as open_provider
from ._server import serve as serve
from .backends._base import BackendUnavailable as BackendUnavailable

__all__ = [
    "API_AUDIENCE",
    "INTERNAL_AUDIENCE",
    "BackendUnavailable",
    "EventsApp",
    "PostgresOptions",
    "ProviderConfig",
    "RedisOptions",
    "RunningProvider",
    "ScopePolicy",
    "ScopeRule",
    "create_app",
    "make_backend",
    "mint_token",
    "open_provider",
    "openapi_document",
    "secret_from_env",
    "serve",
]
