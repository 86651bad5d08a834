"""The OpenAPI 3.1 document of the Events API as the reference provider serves it.

Served at ``GET {base}/openapi.json`` and printed by ``bus-events serve
--print-openapi``, so that teams can generate clients in other languages.  It
describes publish, the NDJSON stream with every query parameter (including
the ``after`` resume extension), the error bodies, the bearer scheme and the
health probes.  The tests validate it with ``openapi-spec-validator`` and fuzz a
running provider from it with schemathesis.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .._version import __version__
from ._names import MAX_NAME_LENGTH

__all__ = ["EVENTS_BASE", "openapi_document", "openapi_json"]

#: The events base the document describes (the provider accepts any prefix).
EVENTS_BASE = "/api/v1/events"

_NAME_PATTERN = r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$"
_LABEL_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
_FLAG = {"type": "string", "enum": ["true", "false", "1", "0"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref("Error")}},
    }


def _schemas() -> dict[str, Any]:
    name = {
        "type": "string",
        "pattern": _NAME_PATTERN,
        "maxLength": MAX_NAME_LENGTH,
        "description": "Dot-separated lowercase words, e.g. example.ping.",
        "examples": ["example.ping"],
    }
    metadata = {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": "String to string; keys with the bus. prefix are kept only "
        "from service tokens.",
    }
    return {
        "EventName": name,
        "PublishRequest": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": _ref("EventName"),
                "correlationId": {"type": "string", "description": "Request/reply key."},
                "payload": {"description": "Any JSON value; null when absent."},
                "metadata": metadata,
                "identity_id": {
                    "type": "string",
                    "description": "Service tokens only: publish on behalf of this "
                    "identity (must not be empty). Ignored for end-user tokens.",
                },
            },
        },
        "Accepted": {
            "type": "object",
            "required": ["accepted", "id", "name"],
            "properties": {
                "accepted": {"const": True},
                "id": {"type": "string", "description": "Provider-assigned, unique."},
                "name": _ref("EventName"),
                "correlationId": {"type": "string"},
                "time": {"type": "string", "format": "date-time"},
            },
        },
        "Envelope": {
            "type": "object",
            "description": "One line of a stream (application/x-ndjson).",
            "required": ["id", "name", "payload", "identity_id", "time"],
            "properties": {
                "id": {"type": "string"},
                "name": _ref("EventName"),
                "correlationId": {"type": "string"},
                "payload": {},
                "identity_id": {"type": "string"},
                "metadata": metadata,
                "time": {"type": "string", "format": "date-time"},
            },
        },
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {
                    "type": "string",
                    "description": "bad_request, invalid_auth, forbidden, not_found, "
                    "method_not_allowed, request_timeout, payload_too_large, "
                    "backend_unavailable, internal_error, …",
                },
                "message": {"type": "string"},
                "required_scopes": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "403 only: the scopes that would allow the request. "
                    "Absent for a reserved name, which no scope allows.",
                },
            },
        },
        "Health": {
            "type": "object",
            "required": ["ok", "service"],
            "properties": {
                "ok": {"type": "boolean"},
                "service": {"const": "bus-events"},
                "backend": {"type": "string"},
                "error": {"type": "string"},
                "message": {"type": "string"},
            },
        },
    }


def _query(name: str, description: str, schema: dict[str, Any], *, required: bool = False) -> Any:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema,
    }


def _stream_operation() -> dict[str, Any]:
    return {
        "operationId": "streamEvents",
        "summary": "Stream matching events as NDJSON",
        "description": "One JSON envelope per line, sent as events arrive. A following "
        "stream writes a blank line after a quiet interval (keep-alive) and ends "
        "cleanly (terminating chunk) when the provider shuts down. Every refusal "
        "comes before the first line.",
        "parameters": [
            _query("name", "Event name to stream.", _ref("EventName"), required=True),
            _query(
                "delivery",
                "broadcast: every authorised listener gets every event; unicast: one "
                "consumer of the group gets each event.",
                {"type": "string", "enum": ["broadcast", "unicast"], "default": "broadcast"},
            ),
            _query(
                "group",
                "Unicast group; its consumers compete for events.",
                {"type": "string", "pattern": _LABEL_PATTERN, "default": "default"},
            ),
            _query(
                "consumer",
                "Stable consumer name inside the group.",
                {"type": "string", "pattern": _LABEL_PATTERN, "default": "default"},
            ),
            _query(
                "replay",
                "First send the retained matching events. Not with delivery=unicast "
                "(400): a group's consumers share live events only.",
                {**_FLAG, "default": "false"},
            ),
            _query(
                "follow",
                "false: end the response after the replayed snapshot.",
                {**_FLAG, "default": "true"},
            ),
            _query(
                "after",
                "Extension (with replay=true): replay only events after this event id, "
                "to resume from a cursor. A provider that does not know it ignores it; "
                "clients then skip up to the cursor themselves.",
                {
                    "type": "string",
                    "pattern": r"^[0-9]{1,20}-[0-9]{1,20}$",
                    "examples": ["1700000000000-0"],
                },
            ),
        ],
        "responses": {
            "200": {
                "description": "The stream: NDJSON, one Envelope per line.",
                "content": {
                    "application/x-ndjson": {
                        "schema": {"type": "string"},
                        "x-line-schema": _ref("Envelope"),
                    }
                },
            },
            "400": _error("Invalid name, delivery, group, consumer, flag or repeated parameter."),
            "401": _error("Missing or invalid bearer token."),
            "403": _error("The token lacks the listen scope, or the name is reserved."),
            "503": _error("The backend is unavailable."),
        },
    }


_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Makes retries safe: the event is stored with this key, per identity, "
    "atomically. A repeat within the provider's idempotency window (serve "
    "--idempotency-window, default 24h) stores nothing and answers 202 with the original "
    "body and Idempotent-Replayed: true. The SDK sends a random one when retries > 0.",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        # HTTP drops spaces around a header value: none at either end.
        "pattern": r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$",
    },
}


def _publish_operation() -> dict[str, Any]:
    return {
        "operationId": "publishEvent",
        "summary": "Publish one event",
        "description": "The provider stamps identity_id from the token's sub. Checks run "
        "in the order: token (401, before the body is read), body size (413), "
        "body (400), scope (403).",
        "parameters": [_IDEMPOTENCY_KEY],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("PublishRequest")}},
        },
        "responses": {
            "202": {
                "description": "Accepted; with Idempotent-Replayed: true, the original "
                "acceptance of the same Idempotency-Key (nothing stored this time).",
                "headers": {
                    "Idempotent-Replayed": {
                        "description": "true when this answer repeats an earlier acceptance.",
                        "schema": {"type": "string", "enum": ["true"]},
                    }
                },
                "content": {"application/json": {"schema": _ref("Accepted")}},
            },
            "400": _error(
                "The body is not JSON, not a publish request, or the name is invalid; "
                "invalid_idempotency_key: the Idempotency-Key is not 1-255 printable ASCII bytes."
            ),
            "401": _error("Missing or invalid bearer token."),
            "403": _error("The token lacks the send scope, or the name is reserved."),
            "408": _error("The body did not arrive within the read time limit."),
            "413": _error("The body exceeds the size limit."),
            "503": _error("The backend is unavailable."),
        },
    }


def _health(operation_id: str, summary: str, ready: bool) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {
            "description": "Alive." if not ready else "Ready: the backend answers.",
            "content": {"application/json": {"schema": _ref("Health")}},
        }
    }
    if ready:
        responses["503"] = {
            "description": "Not ready: the backend does not answer, or the provider is "
            "shutting down.",
            "content": {"application/json": {"schema": _ref("Health")}},
        }
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "security": [],
            "responses": responses,
        }
    }


def openapi_document() -> dict[str, Any]:
    """The document as a JSON-ready dict (a new one on every call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Bus Events API",
            "version": __version__,
            "description": "Publish events and stream them as NDJSON, as served by the "
            "busevents reference provider (bus-events serve). Tokens are HS256 JWTs "
            "(audience ai.hg.fi/api for end users, ai.hg.fi/internal for services); "
            "each event name needs a scope by namespace (events:send / events:listen "
            "for unprotected names).",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            EVENTS_BASE: {"post": _publish_operation()},
            EVENTS_BASE + "/stream": {"get": _stream_operation()},
            EVENTS_BASE + "/openapi.json": {
                "get": {
                    "operationId": "openapiDocument",
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1 document.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/healthz": _health("healthz", "Liveness: the process serves requests", False),
            "/readyz": _health("readyz", "Readiness: the backend answers", True),
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "Authorization: Bearer <token>.",
                }
            },
            "schemas": _schemas(),
        },
    }


def openapi_json() -> bytes:
    """The document encoded as JSON (UTF-8, two-space indent, newline at the end)."""
    return msgspec.json.format(msgspec.json.encode(openapi_document()), indent=2) + b"\n"
