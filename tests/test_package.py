"""The package as a whole: public surface, import hygiene, lint and types."""

from __future__ import annotations

import ast
import importlib
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

import busevents

ROOT = Path(__file__).resolve().parents[1]

SRC = ROOT / "src" / "busevents"
CORE = [
    "_errors",
    "_depth",
    "_ids",
    "_contracts",
    "_config",
    "_retry",
    "_groups",
    "_ndjson",
    "_responses",
    "_stream",
    "_tokens",
    "_client",
    "_version",
]


def _imported_modules(path: Path, package: str) -> set[str]:
    """The busevents modules ``path`` imports at run time (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and id(node) not in skip:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("busevents"):
                found.add(module)
    return found


def test_public_names_have_one_source() -> None:
    """The TYPE_CHECKING imports of ``__init__.py`` are the one declaration: every
    ``from .x import N as N`` there is public, loads lazily as that very object, and
    ``__all__`` is exactly those names."""
    tree = ast.parse((SRC / "__init__.py").read_text())
    declared = {
        alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module != "_version"
        for alias in node.names
        if alias.asname == alias.name
    }
    assert len(declared) > 50
    assert set(busevents.__all__) == {*declared, "__version__"}
    assert busevents.__all__ == sorted(busevents.__all__) == dir(busevents)
    for name, module in declared.items():
        assert getattr(busevents, name) is getattr(
            importlib.import_module(f"busevents.{module}"), name
        )
    with pytest.raises(AttributeError):
        busevents.NoSuchThing  # noqa: B018


def test_every_exception_is_public_and_in_the_drawn_tree() -> None:
    from busevents import _errors

    classes = {
        name
        for name, value in vars(_errors).items()
        if isinstance(value, type) and issubclass(value, busevents.BusEventsError)
    }
    assert classes <= set(busevents.__all__)
    drawn = set(re.findall(r"([A-Z][A-Za-z]+)\s", _errors.__doc__ or ""))
    assert classes <= drawn, classes - drawn


def _every_exception() -> list[BaseException]:
    url = "http://127.0.0.1:1/api/v1/events"
    event = busevents.Event(id="1-0", name="x")
    return [
        busevents.BusEventsError("root"),
        busevents.ConfigError("no URL"),
        busevents.TokenError("no token"),
        busevents.TransportError("failed", url=url),
        busevents.ConnectError("refused", url=url),
        busevents.Timeout("late", url=url, timeout=1.5),
        busevents.ReplyTimeout.waiting_for("a", "a.r", timeout=2, correlation_id="c", url=url),
        busevents.ListenerUnavailable("down", url=url, name="x"),
        busevents.APIError(418, "teapot", "short", url=url),
        busevents.BadRequest(400, "bad", "no", url=url),
        busevents.Unauthorized(401, None, "expired", url=url),
        busevents.Forbidden(403, "f", "scope", url=url, required_scopes=("vm:read",)),
        busevents.NotFound(404, None, "gone", url=url),
        busevents.PayloadTooLarge(413, None, "big", url=url),
        busevents.RateLimited(429, None, "slow", url=url, retry_after=3.0),
        busevents.ServerError(503, "backend_unavailable", "down", url=url, retry_after=1.0),
        busevents.StreamError("framing", offset=3, event_number=2),
        busevents.InvalidEvent("bad line", offset=3, event_number=2),
        busevents.LineTooLong("long", offset=3, event_number=2),
        busevents.StreamTruncated("cut", offset=3, event_number=2),
        busevents.StreamInterrupted("reset", url=url, offset=3, event_number=2),
        busevents.StreamStalled("quiet", url=url, offset=3, event_number=2),
        busevents.InvalidPayload("no match", event_id="1-0", event_name="x", path="$.n"),
        busevents.ResponseError("not_found", "no such", response=event, correlation_id="c"),
        busevents.WorkerError("runtime"),
        busevents.HandlerError("failed", worker="w", event_id="1-0", event_name="x"),
    ]


def test_every_public_exception_round_trips_through_pickle() -> None:
    errors = _every_exception()
    public = {
        getattr(busevents, n)
        for n in busevents.__all__
        if isinstance(getattr(busevents, n), type)
        and issubclass(getattr(busevents, n), busevents.BusEventsError)
    }
    assert {type(e) for e in errors} == public
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert copy.__dict__ == error.__dict__


def test_stream_interrupted_is_a_network_failure_too() -> None:
    error = busevents.StreamInterrupted("reset", url="u", offset=0, event_number=1)
    assert isinstance(error, busevents.TransportError)
    assert isinstance(error, busevents.StreamError)


def test_sdk_core_has_no_import_cycle() -> None:
    graph = {
        m: {
            i.removeprefix("busevents.")
            for i in _imported_modules(SRC / f"{m}.py", f"busevents.{m}")
        }
        & set(CORE)
        for m in CORE
    }
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, " -> ".join([*path, module])
        if module in done:
            return
        for target in graph[module]:
            visit(target, [*path, module])
        done.add(module)

    for module in CORE:
        visit(module, [])


@pytest.mark.parametrize("leaf", ["cli", "provider", "testing.py", "_pytest_plugin.py"])
def test_leaves_use_only_the_public_sdk(leaf: str) -> None:
    """The CLI, the provider and the test helpers import ``busevents`` names only
    (the CLI also the bench engine and the provider package)."""
    root = SRC / leaf
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
    allowed = {
        "busevents",
        "busevents._version",
        "busevents._bench",
        "busevents.provider",
        "busevents.testing",
    }
    for path in files:
        package = "busevents." + ".".join(path.relative_to(SRC).with_suffix("").parts[:-1])
        for module in _imported_modules(path, package.rstrip(".")):
            own = module.startswith(f"busevents.{leaf.removesuffix('.py')}")
            assert own or module in allowed, f"{path.relative_to(ROOT)} imports {module}"


def test_sdk_core_never_imports_workers_or_leaves() -> None:
    assert "relay" not in str([_imported_modules(SRC / f"{m}.py", f"busevents.{m}") for m in CORE])
    for module in CORE:
        for imported in _imported_modules(SRC / f"{module}.py", f"busevents.{module}"):
            assert not imported.startswith(
                ("busevents.workers", "busevents.cli", "busevents.provider", "busevents._bench")
            ), f"{module} imports {imported}"


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def test_client_never_imports_the_provider() -> None:
    loaded = _modules_after(
        "import busevents; busevents.EventsClient; import busevents.cli._commands"
    )
    assert "busevents._client" in loaded
    assert not {"hypercorn", "jwt", "busevents.provider"} & loaded


def test_version_and_import_stay_light() -> None:
    loaded = _modules_after("from busevents.cli import main; main(['--version'])")
    assert not {"trio", "httpx", "msgspec", "cyclopts"} & loaded
    loaded = _modules_after("import busevents")
    assert not {"trio", "httpx", "msgspec"} & loaded


def test_help_does_not_import_the_network_stack() -> None:
    loaded = _modules_after(
        "from busevents.cli import main\n"
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])"
    )
    assert not {"trio", "httpx", "hypercorn"} & loaded


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "src", "tests"],
        ["ruff", "format", "--check", "src", "tests"],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_lint_and_types(command: list[str]) -> None:
    # Not busevents code: no coverage measurement in these children (it slows mypy).
    env = {k: v for k, v in os.environ.items() if k != "COVERAGE_PROCESS_CONFIG"}
    proc = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stored_top_level_help_matches_cyclopts() -> None:
    """`bus-events --help` prints pre-rendered text; it must be what cyclopts renders."""
    from busevents.cli._helptext import render, stored

    assert stored() == render(), "run: python -m busevents.cli._helptext --write"


def test_cli_reference_is_the_real_help() -> None:
    from busevents.cli._helptext import reference

    stored = (ROOT / "docs" / "cli.md").read_text()
    assert stored == reference(), "run: python -m busevents.cli._helptext --write"


def test_every_command_has_a_summary_and_an_example() -> None:
    from busevents.cli._helptext import commands, render

    for command in commands():
        text = render(command)
        assert "Example:" in text, command
        assert text.splitlines()[2].strip(), command  # the one-line summary under the usage
