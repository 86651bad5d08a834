"""A counted bound on how deeply a JSON document nests, the same on every Python (the
provider checks publish bodies with it, `import` every line).

The stdlib parser gives up where the interpreter's recursion limit happens to
be (about 1,000 levels on 3.11, further on 3.12+), so "too deep" used to depend
on the Python running the provider.  This module counts instead: arrays and
objects opened and not yet closed, outside strings.

Cost: a body with at most :data:`MAX_DEPTH` brackets in total cannot nest
deeper, which ``bytes.count`` (C speed) settles for almost every body; only the
rest is scanned token by token, and the scan stops at the first level too deep.
"""

from __future__ import annotations

import re

__all__ = ["MAX_DEPTH", "nesting_error"]

#: Arrays and objects a publish body may nest, the body's own object included.
MAX_DEPTH = 512

# A JSON string (escapes included) or one bracket: strings are skipped whole, so
# brackets inside them do not count.  Invalid JSON is left to the parser.
# (The string pattern is "unrolled": runs of plain bytes are one step each, not
# one alternation per byte, so a long string costs a scan, not a backtracking walk.)
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_OPEN = frozenset(b"[{")


def nesting_error(
    body: bytes, limit: int = MAX_DEPTH, *, what: str = "the publish body"
) -> str | None:
    """Why ``body`` nests too deeply for the provider, or ``None`` when it does not
    (``what`` names it in the reason).

    >>> nesting_error(b'{"payload": [[1]]}') is None
    True
    >>> nesting_error(b"[" * 600 + b"]" * 600)
    'the publish body nests deeper than 512 levels (at byte 512): flatten the payload'
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return None
    depth = 0
    for match in _TOKEN.finditer(body):
        first = body[match.start()]
        if first in _OPEN:
            depth += 1
            if depth > limit:
                return (
                    f"{what} nests deeper than {limit} levels "
                    f"(at byte {match.start()}): flatten the payload"
                )
        elif first != 0x22:  # a closing bracket ('"' starts a string, skipped whole)
            depth -= 1
    return None
