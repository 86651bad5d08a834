"""Route log records to the CLI's stderr diagnostics (``-v`` shows them, ``-vv`` HTTP too)."""

from __future__ import annotations

import logging

from ._output import Diagnostics


class StderrHandler(logging.Handler):
    """Write each record as one ``bus-events:`` line on stderr."""

    def __init__(self, diagnostics: Diagnostics) -> None:
        super().__init__()
        self.diagnostics = diagnostics

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not kill the CLI
            message = str(record.msg)
        if record.levelno >= logging.ERROR:
            self.diagnostics.error(message)
        elif record.levelno >= logging.WARNING:
            self.diagnostics.warning(message)
        else:
            self.diagnostics.info(f"{record.name}: {message}")


#: Loggers that speak once per HTTP request or frame, and from which verbosity on.
_CHATTY = {"httpx": 2, "httpcore": 3, "hpack": 3, "hypercorn.access": 3}


def quiet_http_loggers(verbose: int) -> None:
    """Per-request lines (httpx's ``HTTP Request: POST …``) only from ``-vv`` on,
    protocol internals from ``-vvv``: ``-v`` shows what happened, not every request."""
    for name, level in _CHATTY.items():
        logging.getLogger(name).setLevel(logging.NOTSET if verbose >= level else logging.WARNING)
