"""The provider's exact paths, and what a request for any other path is told.

The events API lives at :data:`EVENTS` only (the base the client builds from a
bare origin, spec §1); ``/foo/events`` or ``/events`` is a ``404`` naming the
real paths, so a wrong base URL fails at once instead of half-working.
"""

from __future__ import annotations

__all__ = ["EVENTS", "METRICS_ONLY", "NOT_FOUND", "OPENAPI", "STREAM"]

#: ``POST`` publishes here.
EVENTS = "/api/v1/events"
#: ``GET`` streams here.
STREAM = EVENTS + "/stream"
#: ``GET`` the OpenAPI document here.
OPENAPI = EVENTS + "/openapi.json"

NOT_FOUND = (
    f"no such endpoint: publish with POST {EVENTS}, stream with GET {STREAM} "
    f"(set the client's URL to the origin or to …{EVENTS})"
)
METRICS_ONLY = (
    "this is the provider's metrics address: it answers GET /metrics, /healthz and "
    f"/readyz only; publish and stream on the events address (serve --addr), {EVENTS}"
)
