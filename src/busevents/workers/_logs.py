"""Log formats of worker hosts: human text (the default) or one JSON object per line.

``BUS_EVENTS_LOG_FORMAT=json`` (or ``run_host(log_format="json")``) writes each
record as one JSON object: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
``message``, then ``worker``, ``event_name``, ``event_id``, ``correlation_id``
when the record was logged by a worker's task (a handler's own records too),
and ``exception`` with the traceback when there is one.  Only those fields:
never the record's arguments on their own, never a token or a payload (the
SDK's messages carry neither).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime

import msgspec

from .._errors import ConfigError
from ._observe import log_context

__all__ = ["LOG_FORMAT_ENV", "JsonFormatter", "configure_logging", "log_format_from_env"]

LOG_FORMAT_ENV = "BUS_EVENTS_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
#: The text format (run_host's default since before the JSON one).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    """Format a record as one line of JSON (see the module documentation)."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = str(record.msg)
        stamp = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, str] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        # Copied into the record by _ContextFilter (a record may be formatted elsewhere).
        entry.update(getattr(record, "busevents", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode()


class _ContextFilter(logging.Filter):
    """Attach the logging task's worker/event fields to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "busevents"):
            record.busevents = dict(log_context.get())
        return True


def log_format_from_env(env: Mapping[str, str] | None = None) -> str:
    """``BUS_EVENTS_LOG_FORMAT`` (``text`` or ``json``; unset: ``text``)."""
    raw = (env if env is not None else os.environ).get(LOG_FORMAT_ENV, "").strip().lower()
    return check_log_format(raw or "text", f"{LOG_FORMAT_ENV}={raw}")


def check_log_format(value: str, where: str = "log_format") -> str:
    """``value`` if it names a log format, else a :class:`ConfigError`."""
    if value not in LOG_FORMATS:
        raise ConfigError(f"{where}: unknown log format {value!r}; use 'text' or 'json'")
    return value


def configure_logging(log_format: str) -> None:
    """INFO and above to stderr, as text or JSON lines (only when no logging is set up)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        handler.addFilter(_ContextFilter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # What an operator needs (ready, reconnects, handler errors), not a line per request.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
