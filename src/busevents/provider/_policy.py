"""The namespace → scope policy, as data.

A :class:`ScopePolicy` is a table of ``(prefix, send, listen)`` rows.  For an
event name the longest matching prefix decides; a ``None`` scope marks the
prefix as reserved for that action (``403`` whatever the token holds, and no
scope named).  A prefix ending in ``.`` covers the names under it; any other
prefix is a whole name and covers itself and the names under it.  Names that
match no row need the fallback scopes ``events:send`` / ``events:listen``.
The default table (``default-policy.json``) follows upstream's
``bus-api-provider-events`` namespaces.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib import resources
from typing import Literal, NamedTuple

import msgspec

__all__ = ["Action", "ScopePolicy", "ScopeRule"]

Action = Literal["send", "listen"]


class ScopeRule(NamedTuple):
    """One row of the policy table; ``None`` means reserved for that action."""

    prefix: str
    send: str | None
    listen: str | None

    def scope(self, action: Action) -> str | None:
        """The scope this row requires for ``action`` (``None``: reserved)."""
        return self.send if action == "send" else self.listen


class _RuleRow(msgspec.Struct, forbid_unknown_fields=True):
    prefix: str
    send: str | None
    listen: str | None
    #: Free text for the reader of the file; ignored.
    note: str | None = None


#: The default table ships as data, in the ``--policy`` file format.
_DEFAULT_TABLE = "default-policy.json"


def _matches(prefix: str, name: str) -> bool:
    # A prefix ending in "." covers the names under it; any other entry is a
    # whole name, covering itself and the names under it (never "probe" -> "prober").
    if prefix.endswith(".") or not prefix:
        return name.startswith(prefix)
    return name == prefix or name.startswith(prefix + ".")


class ScopePolicy:
    """Which scope a token needs to publish or stream an event name.

    Build it from rows (``ScopeRule`` or plain ``(prefix, send, listen)``
    tuples), take the spec's table with :meth:`default`, or load a JSON file with
    :meth:`from_file`.  Instances are immutable and compare by value.

    >>> ScopePolicy.default().required("bus.vm.start.request", "send")
    ('vm:write',)
    """

    __slots__ = ("_by_length", "_cache", "_fallback", "_rules")

    #: Names whose row is remembered (the table is scanned once per name).
    CACHE_SIZE = 4096

    def __init__(
        self,
        rules: Iterable[ScopeRule | tuple[str, str | None, str | None]],
        *,
        fallback_send: str = "events:send",
        fallback_listen: str = "events:listen",
    ) -> None:
        parsed = tuple(ScopeRule(*row) for row in rules)
        seen: set[str] = set()
        for rule in parsed:
            if not isinstance(rule.prefix, str):
                raise ValueError(f"policy prefix must be a string, got {rule.prefix!r}")
            for scope in (rule.send, rule.listen):
                if scope is not None and (not isinstance(scope, str) or not scope.strip()):
                    raise ValueError(f"policy row {rule.prefix!r}: a scope must be text or null")
            if rule.prefix in seen:
                raise ValueError(f"policy prefix {rule.prefix!r} appears more than once")
            seen.add(rule.prefix)
        self._rules = parsed
        # Longest prefix first, so the first match is the most specific one.
        self._by_length = tuple(sorted(parsed, key=lambda r: len(r.prefix), reverse=True))
        self._fallback = ScopeRule("", fallback_send, fallback_listen)
        self._cache: dict[str, ScopeRule] = {}

    @classmethod
    def default(cls) -> ScopePolicy:
        """Upstream's namespace table (``default-policy.json`` beside this module).

        Every ``bus.*`` name not listed there is reserved; other names need
        ``events:send`` / ``events:listen``.
        """
        data = resources.files(__package__).joinpath(_DEFAULT_TABLE).read_bytes()
        return cls(_rows(data, _DEFAULT_TABLE))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ScopePolicy:
        """Load a policy from a JSON file: ``[{"prefix": …, "send": …, "listen": …}, …]``.

        The file replaces the default table; ``null`` marks a reserved action.
        Raises :class:`OSError` when the file cannot be read and
        :class:`ValueError` (with the JSON path of the problem) when it is malformed.
        """
        with open(path, "rb") as file:
            data = file.read()
        return cls(_rows(data, os.fspath(path)))

    @property
    def rules(self) -> tuple[ScopeRule, ...]:
        """The rows, in the order given."""
        return self._rules

    def rule_for(self, name: str) -> ScopeRule:
        """The row that governs ``name`` (the fallback row when none matches)."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        found = self._fallback
        for rule in self._by_length:
            if _matches(rule.prefix, name):
                found = rule
                break
        if len(self._cache) >= self.CACHE_SIZE:
            self._cache.clear()  # crude, but bounded and rare: names repeat
        self._cache[name] = found
        return found

    def required(self, name: str, action: Action) -> tuple[str, ...] | None:
        """Scopes a token needs (all of them) to ``action`` on ``name``; ``None`` if reserved."""
        scope = self.rule_for(name).scope(action)
        return None if scope is None else (scope,)

    def required_for_prefix(self, prefix: str, action: Action) -> tuple[str, ...] | None:
        """Scopes needed to ``action`` on every name that starts with ``prefix``.

        Used for wildcard streams: the union of the row governing ``prefix`` and
        every row nested under it; ``None`` when any of them is reserved.
        """
        rules = [self.rule_for(prefix)]
        rules += [r for r in self._rules if r.prefix.startswith(prefix) and r.prefix != prefix]
        scopes: list[str] = []
        for rule in rules:
            scope = rule.scope(action)
            if scope is None:
                return None
            if scope not in scopes:
                scopes.append(scope)
        return tuple(scopes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ScopePolicy):
            return NotImplemented
        return self._rules == other._rules and self._fallback == other._fallback

    def __hash__(self) -> int:
        return hash((self._rules, self._fallback))

    def __repr__(self) -> str:
        return f"ScopePolicy({list(self._rules)!r})"


def _rows(data: bytes, source: str) -> list[tuple[str, str | None, str | None]]:
    try:
        rows = msgspec.json.decode(data, type=list[_RuleRow])
    except msgspec.DecodeError as exc:
        raise ValueError(f"invalid scope policy file {source!r}: {exc}") from None
    return [(row.prefix, row.send, row.listen) for row in rows]
