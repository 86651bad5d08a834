"""The namespace → scope policy (spec §3), as data.

A :class:`ScopePolicy` is a table of ``(prefix, send, listen)`` rows.  For an
event name the longest matching prefix decides; a ``None`` scope marks the
prefix as reserved for that action (``403`` whatever the token holds).  Names
that match no row need the fallback scopes ``events:send`` / ``events:listen``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
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


_DEFAULT_RULES: tuple[tuple[str, str | None, str | None], ...] = (
    ("bus.vm.", "vm:write", "vm:read"),
    ("bus.container.admin.", "container:admin", "container:admin"),
    ("bus.container.delete.", "container:delete", "container:read"),
    ("bus.container.", "container:run", "container:read"),
    ("bus.usage.", "usage:write", "usage:read"),
    ("bus.ssh.", "ssh:run", "ssh:run"),
    ("bus.billing.", "billing:setup", "billing:read"),
    ("bus.task.", "task:send", "task:read"),
    ("bus.workers.", "workers:write", "workers:read"),
    ("bus.work.", "work:send", "work:read"),
    ("bus.dev.task.", "dev:task:send", "dev:task:read"),
    ("bus.", None, None),
)


class ScopePolicy:
    """Which scope a token needs to publish or stream an event name.

    Build it from rows (``ScopeRule`` or plain ``(prefix, send, listen)``
    tuples), take the spec's table with :meth:`default`, or load a JSON file with
    :meth:`from_file`.  Instances are immutable and compare by value.

    >>> ScopePolicy.default().required("bus.vm.start.request", "send")
    ('vm:write',)
    """

    __slots__ = ("_by_length", "_fallback", "_rules")

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

    @classmethod
    def default(cls) -> ScopePolicy:
        """The table of spec §3."""
        return cls(_DEFAULT_RULES)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ScopePolicy:
        """Load a policy from a JSON file: ``[{"prefix": …, "send": …, "listen": …}, …]``.

        The file replaces the default table; ``null`` marks a reserved action.
        Raises :class:`OSError` when the file cannot be read and
        :class:`ValueError` (with the JSON path of the problem) when it is malformed.
        """
        with open(path, "rb") as file:
            data = file.read()
        try:
            rows = msgspec.json.decode(data, type=list[_RuleRow])
        except msgspec.DecodeError as exc:
            raise ValueError(f"invalid scope policy file {os.fspath(path)!r}: {exc}") from None
        return cls((row.prefix, row.send, row.listen) for row in rows)

    @property
    def rules(self) -> tuple[ScopeRule, ...]:
        """The rows, in the order given."""
        return self._rules

    def rule_for(self, name: str) -> ScopeRule:
        """The row that governs ``name`` (the fallback row when none matches)."""
        for rule in self._by_length:
            if name.startswith(rule.prefix):
                return rule
        return self._fallback

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
