"""The ``--stats`` line of ``listen``: counts a reader can take at face value."""

from __future__ import annotations

__all__ = ["plural", "rate", "size", "stats_line"]


def plural(count: int, noun: str) -> str:
    """``1 event``, ``2 events``, ``0 events`` (thousands separated)."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def rate(per_second: float) -> str:
    """A rate with the digits that mean something: ``0.25``, ``3.2``, ``41``, ``12,345``.

    Rounding a small rate to a whole number printed ``0 events/s`` for a stream
    that did deliver events.
    """
    if per_second == 0 or per_second >= 100:
        return f"{per_second:,.0f}"
    return f"{per_second:.2g}" if per_second < 10 else f"{per_second:.0f}"


def size(count: int) -> str:
    """Bytes in the unit that keeps them readable: ``120 B``, ``4.5 kB``, ``1.20 MB``."""
    if count < 1000:
        return f"{count} B"
    if count < 1_000_000:
        return f"{count / 1e3:.1f} kB"
    return f"{count / 1e6:,.2f} MB"


def stats_line(events: int, received: int, elapsed: float) -> str:
    """``3 events, 2 events/s, 360 B, 1.5 s``: counted, rated, sized and timed.

    >>> stats_line(1, 120, 4.0)
    '1 event, 0.25 events/s, 120 B, 4.0 s'
    """
    per_second = events / max(elapsed, 1e-9)
    counted = f"{plural(events, 'event')}, {rate(per_second)} events/s"
    return f"{counted}, {size(received)}, {elapsed:,.1f} s"
