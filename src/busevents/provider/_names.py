"""Validation of event names, name patterns, groups, consumers and flags (spec §2).

Each check raises :class:`InvalidParameter` with a message that names the
parameter and what is allowed; the app turns it into ``400 bad_request``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = [
    "MAX_NAME_LENGTH",
    "InvalidParameter",
    "check_flag",
    "check_label",
    "check_name",
    "compile_pattern",
    "has_wildcard",
    "literal_prefix",
]

MAX_NAME_LENGTH = 255

_TOKEN = r"[a-z0-9_-]+"
_NAME = re.compile(rf"{_TOKEN}(?:\.{_TOKEN})*", re.ASCII)
_PATTERN = re.compile(rf"(?:{_TOKEN}|\*)(?:\.(?:{_TOKEN}|\*))*(?:\.>)?|>", re.ASCII)
_LABEL = re.compile(r"[A-Za-z0-9._-]{1,128}", re.ASCII)
_NAME_RULE = "dot-separated lowercase words of a-z, 0-9, '-' and '_' (e.g. example.ping)"
_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})


class InvalidParameter(ValueError):
    """A request parameter or body field is invalid; ``str()`` is safe to return."""


def _shown(value: str) -> str:
    text = value if len(value) <= 64 else value[:61] + "..."
    return repr(text)


def has_wildcard(name: str) -> bool:
    """Whether ``name`` contains a wildcard character (``*`` or ``>``)."""
    return "*" in name or ">" in name


def check_name(name: str, *, param: str = "name", wildcards: bool = False) -> str:
    """Return ``name`` if it is a valid event name (or pattern, when ``wildcards``).

    Patterns use NATS-style whole-word wildcards: ``*`` matches one word, a final
    ``>`` matches one or more words.
    """
    if not name:
        raise InvalidParameter(f"{param} is empty: event names are {_NAME_RULE}")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidParameter(
            f"{param} is {len(name)} characters long: at most {MAX_NAME_LENGTH} are allowed"
        )
    if has_wildcard(name):
        if not wildcards:
            raise InvalidParameter(
                f"invalid {param} {_shown(name)}: wildcards are not allowed (* and >)"
            )
        if not _PATTERN.fullmatch(name):
            raise InvalidParameter(
                f"invalid {param} pattern {_shown(name)}: use {_NAME_RULE}, "
                "with * for one whole word and a final > for the rest"
            )
        return name
    if not _NAME.fullmatch(name):
        raise InvalidParameter(f"invalid {param} {_shown(name)}: event names are {_NAME_RULE}")
    return name


def check_label(value: str, *, param: str) -> str:
    """Return ``value`` if it is a valid group or consumer name."""
    if not _LABEL.fullmatch(value):
        raise InvalidParameter(
            f"invalid {param} {_shown(value)}: use 1-128 characters of "
            "A-Z, a-z, 0-9, '.', '_' and '-'"
        )
    return value


def check_flag(value: str, *, param: str) -> bool:
    """Parse a boolean query flag: ``true``/``false``/``1``/``0`` (any case)."""
    folded = value.lower()
    if folded in _TRUE:
        return True
    if folded in _FALSE:
        return False
    raise InvalidParameter(f"invalid {param} {_shown(value)}: expected true, false, 1 or 0")


def literal_prefix(pattern: str) -> str:
    """The part of a pattern before its first wildcard word (``"bus.vm."`` for ``bus.vm.*``)."""
    words = pattern.split(".")
    for index, word in enumerate(words):
        if word in ("*", ">"):
            return "".join(w + "." for w in words[:index])
    return pattern


def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """A predicate telling whether an event name matches ``pattern``."""
    parts: list[str] = []
    for word in pattern.split("."):
        if word == "*":
            parts.append(_TOKEN)
        elif word == ">":
            parts.append(rf"{_TOKEN}(?:\.{_TOKEN})*")
        else:
            parts.append(re.escape(word))
    regex = re.compile(r"\.".join(parts), re.ASCII)

    def matches(name: str) -> bool:
        return regex.fullmatch(name) is not None

    return matches
