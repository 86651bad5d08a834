"""``bus-events run FILE.bus…``: run ``.bus`` scripts of ``events …`` command lines.

A ``.bus`` file (spec §5) is UTF-8 text: blank lines and ``#`` comments are
ignored, a trailing ``\\`` continues a line, words are quoted like a shell's
(``'…'``, ``"…"``, ``\\``) but nothing is expanded and ``|``, ``;`` are plain
characters.  Each command line targets this module: ``events send …``,
``events listen …`` (a leading ``bus`` is allowed).  Other lines:

* a line of global flags only (``--format json``, ``--quiet``, ``--chdir d``)
  is *sticky*: it applies to every later command of the run; ``--no-format``,
  ``--no-quiet``, ``--no-chdir``, … drop it again;
* a line that is one ``*.bus`` path includes that file (relative to the file
  that names it); include cycles are an error.

Every file is read, tokenised and checked (global flags, command options)
before anything runs: one error anywhere and nothing runs, exit 2, with the
file and line named.  Then the commands run in order; the first that fails
stops the run with its exit status.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from cyclopts import Parameter

from ._app import EXIT_OK, Globals, UsageError, app, current

MODULE = "events"

#: Global flags a sticky line may set: flag → takes a value.  Aliases map to one key.
_STICKY_FLAGS: dict[str, tuple[str, bool]] = {
    "--format": ("--format", True),
    "-f": ("--format", True),
    "--chdir": ("--chdir", True),
    "-C": ("--chdir", True),
    "--color": ("--color", True),
    "--api-url": ("--api-url", True),
    "--token-file": ("--token-file", True),
    "--timeout": ("--timeout", True),
    "--quiet": ("--quiet", False),
    "-q": ("--quiet", False),
    "--verbose": ("--verbose", False),
    "-v": ("--verbose", False),
    "--no-color": ("--color", False),
}


class ScriptError(Exception):
    """A problem found before anything ran, at ``path:line``."""

    def __init__(self, path: Path, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")


@dataclass
class Command:
    """One command to run: where it came from and its full argv (sticky flags first)."""

    path: Path
    line: int
    argv: list[str]


@dataclass
class Script:
    """The commands of a run, in order, after every file was read and checked."""

    commands: list[Command] = field(default_factory=list)
    sticky: dict[str, list[str]] = field(default_factory=dict)

    def sticky_argv(self) -> list[str]:
        return [word for words in self.sticky.values() for word in words]


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Join ``\\``-continued lines; each result keeps the number of its first line."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
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
        out.append((start, " ".join(pending)))
    return out


def _sticky(script: Script, path: Path, line: int, words: list[str]) -> None:
    index = 0
    while index < len(words):
        word = words[index]
        flag, _, inline = word.partition("=") if word.startswith("--") else (word, "", "")
        if flag.startswith("--no-") and flag != "--no-color":
            key = "--" + flag[len("--no-") :]
            if key not in {k for k, _ in _STICKY_FLAGS.values()}:
                raise ScriptError(path, line, f"unknown global flag {word!r}")
            script.sticky.pop(key, None)
            index += 1
            continue
        if flag in ("--output", "-o"):
            raise ScriptError(
                path, line, "--output is not sticky: give it to `bus-events run` or to one command"
            )
        if flag not in _STICKY_FLAGS:
            raise ScriptError(path, line, f"unknown global flag {word!r} on a flags-only line")
        key, takes_value = _STICKY_FLAGS[flag]
        if flag == "--no-color":
            script.sticky[key] = ["--no-color"]
        elif takes_value:
            value = inline or (words[index + 1] if index + 1 < len(words) else None)
            if value is None:
                raise ScriptError(path, line, f"{flag} needs a value")
            if key == "--chdir":
                value = str((path.parent / value).resolve())  # relative to the script
            script.sticky[key] = [key, value]
            index += 0 if inline else 1
        else:
            script.sticky[key] = [key]
        index += 1


def load(paths: list[Path], script: Script | None = None, stack: tuple[Path, ...] = ()) -> Script:
    """Read, tokenise and check ``paths`` (and their includes) into one :class:`Script`."""
    script = script or Script()
    for given in paths:
        path = given.resolve()
        if path in stack:
            chain = " → ".join(p.name for p in (*stack, path))
            raise ScriptError(stack[-1], 0, f"include cycle: {chain}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ScriptError(given, 1, "not UTF-8 text") from None
        except OSError as exc:
            where = stack[-1] if stack else given
            raise ScriptError(where, 0, f"cannot read {given}: {exc.strerror}") from None
        for line, source in logical_lines(text):
            try:
                words = shlex.split(source, comments=True, posix=True)
            except ValueError as exc:  # unterminated quote, trailing escape
                raise ScriptError(given, line, f"cannot split the line: {exc}") from None
            if not words:
                continue
            if len(words) == 1 and words[0].endswith(".bus"):
                load([path.parent / words[0]], script, (*stack, path))
                continue
            if words[0].startswith("-"):
                _sticky(script, given, line, words)
                continue
            if words[0] == "bus":
                words = words[1:]
            if not words or words[0] != MODULE:
                other = words[0] if words else "(nothing)"
                raise ScriptError(
                    given,
                    line,
                    f"{other!r} is not this module ({MODULE}): lines for other Bus modules "
                    "are run by the bus dispatcher (bus run FILE)",
                )
            argv = [*script.sticky_argv(), *words[1:]]
            _check(given, line, argv)
            script.commands.append(Command(given, line, argv))
    return script


def _check(path: Path, line: int, argv: list[str]) -> None:
    """Parse ``argv`` as the CLI would, without running it: usage errors surface now."""
    import cyclopts

    try:
        _, bound, _ = app.meta.parse_args(argv, exit_on_error=False, print_error=False)
        tokens = bound.arguments.get("tokens", ())
        if not tokens:
            raise ScriptError(path, line, "no command after the module name")
        if tokens[0] == "run":
            raise ScriptError(path, line, "run cannot be used inside a script: include the file")
        app.parse_args(list(tokens), exit_on_error=False, print_error=False)
    except cyclopts.CycloptsError as exc:
        raise ScriptError(path, line, " ".join(str(exc).split())) from None


@app.command
def run(
    files: Annotated[
        list[Path], Parameter(help="The .bus files to run, in order.", negative_iterable="")
    ],
) -> int:
    """Run .bus script files: `events send …` / `events listen …` lines.

    Every file is checked first (quoting, includes, options); one error anywhere
    and nothing runs (exit 2).  Commands then run in order; the first failure
    stops the run with its exit status.  A script can start with
    `#!/usr/bin/env -S bus-events run`.

    Example: bus-events run deploy-checks.bus
    """
    from ._app import run as run_argv

    g = current()
    try:
        script = load(list(files))
    except ScriptError as exc:
        raise UsageError(str(exc)) from None
    outer = _outer_globals(g)
    home = os.getcwd()
    with _results_to(g.output):
        for command in script.commands:
            g.diagnostics().info(f"{command.path}:{command.line}: events {' '.join(command.argv)}")
            try:
                status = run_argv([*outer, *command.argv])
            finally:
                os.chdir(home)
            if status != EXIT_OK:
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


def _outer_globals(g: Globals) -> list[str]:
    """The global flags given to ``bus-events run`` itself (but -o), for every command."""
    argv: list[str] = []
    if g.api_url:
        argv += ["--api-url", g.api_url]
    if g.token_file:
        argv += ["--token-file", g.token_file]
    if g.timeout_given:
        argv += ["--timeout", f"{g.timeout}s"]
    if g.verbose:
        argv += ["-" + "v" * g.verbose]
    if g.quiet:
        argv += ["--quiet"]
    if g.format:
        argv += ["--format", g.format]
    return argv


__all__ = ["ScriptError", "load", "logical_lines", "run"]
