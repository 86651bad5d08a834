"""``bus-events run FILE.bus…``: run ``.bus`` scripts of ``events …`` command lines.

A ``.bus`` file (upstream's ``bus-script-files`` page) is UTF-8 text: blank
lines and ``#`` comments are ignored, a trailing ``\\`` continues a line, words
are quoted like a shell's (``'…'``, ``"…"``, ``\\``) but nothing is expanded and
``|``, ``;`` are plain characters.  Each command line targets this module:
``events send …``, ``events listen …`` (a leading ``bus`` is allowed).  Other
lines:

* a line of global flags only (``--format json``, ``--quiet``, ``--chdir d``,
  ``--perf``) is *sticky*: it applies to every later command of the run.  It
  is parsed by the same cyclopts meta-app as the real command line; a later
  value replaces an earlier one, and ``--no-format``, ``--no-quiet``,
  ``--no-verbose``, ``--no-chdir``, ``--no-output``, ``--no-perf``, … drop one;
* a line that is one ``*.bus`` path includes that file (relative to the file
  that names it).

Every file is read, tokenised and checked before anything runs: each command
is run in check mode (options, payload JSON, durations, option combinations,
the URL and token), so one error anywhere means nothing runs.  A tokenisation
error exits 65 (``FILE:LINE: syntax error: …``), any other 2.  Then the
commands run in order; the first that fails stops the run with its exit
status and ``FILE:LINE: command failed (exit N): COMMAND``.

Local input is bounded: a file's size, the include depth, the number of files
read through includes and the number of commands.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from cyclopts import CycloptsError, Parameter

from ._app import (
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    app,
    apply_globals,
    check_mode,
    current,
    meta_options,
    run_parsed,
    run_with,
    suggest,
    usage_message,
)

MODULE = "events"
EXIT_SYNTAX = 65  # upstream: a busfile syntax or tokenisation error

MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_INCLUDE_DEPTH = 64
MAX_FILES_READ = 10_000  # includes counted each time they are expanded
MAX_COMMANDS = 100_000

#: ``--no-X`` on a flags-only line drops a sticky flag (the meta-app parameter's name).
_RESETS = {
    "--no-perf": "perf",
    "--no-quiet": "quiet",
    "--no-verbose": "verbose",
    "--no-chdir": "chdir",
    "--no-output": "output",
    "--no-format": "format",
    "--no-api-url": "api_url",
    "--no-token-file": "token_file",
    "--no-timeout": "timeout",
}
#: Flags that exclude each other: a later layer's one drops an earlier layer's other.
_EXCLUSIVE = {"quiet": "verbose", "verbose": "quiet"}


class ScriptError(Exception):
    """A problem found before anything ran, at ``path:line`` (exit ``status``)."""

    def __init__(
        self, path: Path | str, line: int | None, message: str, status: int = EXIT_USAGE
    ) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.status = status


class ScriptSyntaxError(ScriptError):
    """A line that cannot be tokenised: exit 65, ``FILE:LINE: syntax error: …``."""

    def __init__(self, path: Path | str, line: int, message: str) -> None:
        super().__init__(path, line, f"syntax error: {message}", EXIT_SYNTAX)


class _Unterminated(ValueError):
    """A dangling ``\\`` at the end of the text (carries its line number)."""

    def __init__(self, line: int) -> None:
        super().__init__(f"line {line}: dangling \\ at the end of the file")
        self.line = line


@dataclass
class Command:
    """One command to run: where it came from, as written, and its parsed global flags."""

    path: Path
    line: int
    words: list[str]  # the line as written, for messages
    flags: dict[str, Any]  # sticky flags, then the line's own
    tokens: list[str]  # the command and its options

    def text(self) -> str:
        return shlex.join(self.words)


@dataclass
class Script:
    """The commands of a run, in order, after every file was read and checked."""

    commands: list[Command] = field(default_factory=list)
    sticky: dict[str, Any] = field(default_factory=dict)
    files_read: int = 0


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Join ``\\``-continued lines; each result keeps the number of its first line.

    A ``\\`` continuing the last line of the text is a dangling escape: raises
    :class:`ValueError` (upstream: a syntax error, exit 65).
    """
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    number = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        stripped = raw.rstrip()
        trailing = len(stripped) - len(stripped.rstrip("\\"))
        if trailing % 2 == 1:  # an odd run of backslashes escapes the line end
            pending.append(stripped[:-1])
            continue
        pending.append(raw)
        out.append((start, " ".join(pending)))
        pending = []
    if pending:
        raise _Unterminated(number)
    return out


def _tokenise(path: Path | str, line: int, source: str) -> list[str]:
    try:
        return shlex.split(source, comments=True, posix=True)
    except ValueError as exc:
        reason = "unterminated quote" if "quotation" in str(exc) else str(exc).lower()
        raise ScriptSyntaxError(path, line, reason) from None


def _layer(flags: Mapping[str, Any]) -> dict[str, Any]:
    """One line's global flags, normalised: ``--no-color`` is ``--color never``."""
    out = dict(flags)
    if out.pop("no_color", False):
        out["color"] = "never"
    return out


def _merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers win, flag by flag (``-q`` after ``-v`` replaces it)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key in layer:
            if key in _EXCLUSIVE:
                merged.pop(_EXCLUSIVE[key], None)
        merged.update(layer)
    return merged


def _parse_globals(path: Path, line: int, words: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The global flags of ``words`` (by meta-app parameter name) and the other words."""
    try:
        flags, tokens = _parse_meta(tuple(words))
    except CycloptsError as exc:
        raise ScriptError(path, line, usage_message(exc)) from None
    return dict(flags), list(tokens)


@functools.lru_cache(maxsize=1024)
def _parse_meta(words: tuple[str, ...]) -> tuple[dict[str, Any], tuple[str, ...]]:
    # Cached: cyclopts takes a good fraction of a second per parse, and includes repeat lines.
    _, bound, _ = app.meta.parse_args(list(words), exit_on_error=False, print_error=False)
    arguments = dict(bound.arguments)
    tokens = tuple(arguments.pop("tokens", ()))
    if not arguments.get("verbose"):
        arguments.pop("verbose", None)  # a count: 0 when not given
    return _layer(arguments), tokens


def _sticky(script: Script, path: Path, line: int, words: list[str]) -> None:
    resets = [w for w in words if w in _RESETS]
    flags, rest = _parse_globals(path, line, [w for w in words if w not in _RESETS])
    if rest:
        what = rest[0]
        if what.startswith("-"):
            raise ScriptError(path, line, f"unknown global flag {_unknown_flag(what)}")
        raise ScriptError(
            path, line, f"a line of global flags holds {what!r}: put a command after {MODULE}"
        )
    if "output" in flags:
        raise ScriptError(
            path, line, "--output is not sticky: give it to `bus-events run` or to one command"
        )
    if "chdir" in flags:  # relative to the script, wherever it is run from
        flags["chdir"] = str((path.parent / flags["chdir"]).resolve())
    for word in resets:
        script.sticky.pop(_RESETS[word], None)
    script.sticky = _merge(script.sticky, flags)


def _unknown_flag(flag: str) -> str:
    """``'--colour'; did you mean '--color'?`` for an unknown global flag."""
    name = flag.split("=", 1)[0]  # never echo a value
    return f"{name!r}{suggest(name, meta_options())}"


def _read(given: Path, where: tuple[Path, int] | None) -> str:
    """The text of ``given``, bounded; errors name the including line (``where``)."""
    at: tuple[Path | str, int | None] = where if where else (given, None)
    try:
        with given.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ScriptError(*at, f"cannot read {given}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ScriptError(
            *at, f"{given} is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB: not a script"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ScriptSyntaxError(given, line, "not UTF-8 text") from None


def load(paths: list[Path]) -> Script:
    """Read, tokenise and check ``paths`` (and their includes) into one :class:`Script`.

    First every file is read and tokenised (syntax errors, includes and the
    bounds, cheap), then each line is parsed as global flags or a command.
    """
    reader = _Reader()
    for given in paths:
        reader.read(given, ())
    script = Script(files_read=reader.files_read)
    for path, line, words in reader.lines:
        _line(script, path, line, words)
    return script


class _Reader:
    """Reads files and expands includes into one list of tokenised lines, bounded."""

    def __init__(self) -> None:
        self.lines: list[tuple[Path, int, list[str]]] = []
        self.files_read = 0
        self._tokenised: dict[Path, list[tuple[int, list[str]]]] = {}  # an include read once

    def read(self, given: Path, stack: tuple[tuple[Path, Path, int], ...]) -> None:
        """``stack``: the including files (resolved path, path as given, line)."""
        path = given.resolve()
        where = (stack[-1][1], stack[-1][2]) if stack else None
        if where is not None and any(path == p for p, _, _ in stack):
            chain = " → ".join(p.name for p in (*(p for p, _, _ in stack), path))
            raise ScriptError(*where, f"include cycle: {chain}")
        if where is not None and len(stack) > MAX_INCLUDE_DEPTH:
            raise ScriptError(*where, f"includes nested more than {MAX_INCLUDE_DEPTH} deep")
        self.files_read += 1
        if self.files_read > MAX_FILES_READ:
            at: tuple[Path, int | None] = where or (given, None)
            raise ScriptError(
                *at,
                f"more than {MAX_FILES_READ:,} files read through includes "
                "(does an include graph repeat files?)",
            )
        if path not in self._tokenised:
            self._tokenised[path] = self._tokenise(given, where)
        for line, words in self._tokenised[path]:
            if len(words) == 1 and words[0].endswith(".bus"):
                self.read(path.parent / words[0], (*stack, (path, given, line)))
                continue
            if len(self.lines) >= MAX_COMMANDS:
                raise ScriptError(given, line, f"more than {MAX_COMMANDS:,} lines to run")
            self.lines.append((given, line, words))

    @staticmethod
    def _tokenise(given: Path, where: tuple[Path, int] | None) -> list[tuple[int, list[str]]]:
        text = _read(given, where)
        try:
            lines = logical_lines(text)
        except _Unterminated as exc:
            raise ScriptSyntaxError(given, exc.line, "dangling \\ at the end of the file") from None
        out = []
        for line, source in lines:
            words = _tokenise(given, line, source)
            if words:
                out.append((line, words))
        return out


def _line(script: Script, path: Path, line: int, words: list[str]) -> None:
    if words[0].startswith("-") and any(w in _RESETS for w in words):
        _sticky(script, path, line, words)
        return
    flags, rest = _parse_globals(path, line, words)
    if not rest:
        _sticky(script, path, line, words)
        return
    if rest[0] == "bus":
        rest = rest[1:]
    if not rest or rest[0] != MODULE:
        other = rest[0] if rest else "(nothing)"
        if other.startswith("-"):
            raise ScriptError(path, line, f"unknown global flag {_unknown_flag(other)}")
        raise ScriptError(
            path,
            line,
            f"{other!r} is not this module ({MODULE}){suggest(other, [MODULE])}: lines for "
            "other Bus modules are run by the bus dispatcher (bus run FILE)",
        )
    if len(rest) == 1:
        raise ScriptError(path, line, "no command after the module name")
    if len(script.commands) >= MAX_COMMANDS:
        raise ScriptError(path, line, f"more than {MAX_COMMANDS:,} commands in one run")
    script.commands.append(Command(path, line, words, _merge(script.sticky, flags), rest[1:]))


def preflight(script: Script, outer: Mapping[str, Any]) -> None:
    """Check every command as it would run (in check mode): raise the first problem."""
    from busevents import ConfigError

    home = os.getcwd()
    checked: set[str] = set()  # a command repeated as is (an included file) is checked once
    try:
        for command in script.commands:
            flags = _merge(outer, command.flags)
            key = repr((sorted(flags.items()), command.tokens))
            if key in checked:
                continue
            checked.add(key)
            try:
                with check_mode():
                    run_with(flags, command.tokens)
            except (CycloptsError, UsageError, ConfigError) as exc:
                raise ScriptError(command.path, command.line, usage_message(exc)) from None
            finally:
                os.chdir(home)
    finally:
        apply_globals(outer)  # the run's own flags again, for its own messages


@app.command
def run(
    files: Annotated[
        list[Path], Parameter(help="The .bus files to run, in order.", negative_iterable="")
    ],
    /,
) -> int:
    """Run .bus script files: `events send …` / `events listen …` lines.

    Every file is checked first (quoting, includes, options, payloads, the
    token); one error anywhere and nothing runs: exit 65 for a syntax error
    (FILE:LINE: syntax error: …), 2 for any other.  Commands then run in order;
    the first failure stops the run with its exit status.  A script made
    executable runs by itself when its first line is `#!/usr/bin/env -S bus-events run`

    Example: bus-events run deploy-checks.bus
    """
    g = current()
    diag = g.diagnostics()
    output = g.output
    # The flags given to `bus-events run` itself hold for every command, but -o
    # (every command's results go to that one file) and -C (already applied).
    outer = {k: v for k, v in g.given.items() if k not in ("output", "chdir")}
    try:
        script = load(list(files))
        preflight(script, outer)
    except ScriptError as exc:
        diag.error(str(exc))
        return exc.status
    home = os.getcwd()
    with _results_to(output):
        for command in script.commands:
            diag.info(f"{command.path}:{command.line}: {command.text()}")
            try:
                status = run_parsed(_merge(outer, command.flags), command.tokens)
            finally:
                os.chdir(home)
            if status != EXIT_OK:
                diag.error(
                    f"{command.path}:{command.line}: command failed (exit {status}): "
                    f"{command.text()}"
                )
                return status
    return EXIT_OK


@contextlib.contextmanager
def _results_to(path: str | None) -> Iterator[None]:
    """``bus-events -o FILE run …``: every command's results go to one FILE."""
    if path is None:
        yield
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    except OSError as exc:
        raise UsageError(f"cannot write results to {path}: {exc.strerror}") from None
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(fd, 1)
    os.close(fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


__all__ = ["ScriptError", "ScriptSyntaxError", "load", "logical_lines", "run"]
