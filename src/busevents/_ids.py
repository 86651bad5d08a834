"""Event ids of the ``"<ms>-<seq>"`` form, parsed with a bound.

Providers hand out such ids (Redis-stream style); they increase in publish
order when compared as integer pairs, never as strings (``"9-0" < "10-0"``).
An id comes from outside (a stream, a file, a command line), so its parts are
bounded: :data:`MAX_ID_DIGITS` digits each (a 64-bit number has 20), and no
5,000-digit text is ever turned into an integer.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_ID_DIGITS", "event_id_key", "parse_event_id"]

#: Most digits in each part of an event id (``2**64 - 1`` has 20).
MAX_ID_DIGITS: Final = 20


def parse_event_id(text: str) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as the integer pair it is ordered by.

    Raises :class:`ValueError` (its message quotes at most 40 characters of
    ``text``) for anything else: another form, non-ASCII digits, a sign, or a
    part longer than :data:`MAX_ID_DIGITS` digits.
    """
    ms, sep, seq = text.partition("-")
    if (
        not sep
        or not (0 < len(ms) <= MAX_ID_DIGITS and 0 < len(seq) <= MAX_ID_DIGITS)
        or not (ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit())
    ):
        shown = text[:40] + ("…" if len(text) > 40 else "")
        raise ValueError(
            f"not an event id: {shown!r} (expected <ms>-<seq>, at most "
            f"{MAX_ID_DIGITS} digits each, such as 1700000000000-0)"
        )
    return int(ms), int(seq)


def event_id_key(event_id: str) -> tuple[int, int] | None:
    """:func:`parse_event_id`, or None when ``event_id`` is not such an id."""
    try:
        return parse_event_id(event_id)
    except ValueError:
        return None
