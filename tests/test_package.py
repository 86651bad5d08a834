"""The package as a whole: public surface, import hygiene, lint and types."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import busevents

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = {
    "Worker",
    "HandlerError",
    "ListenerUnavailable",
    "RequestTimeout",
    "ResponseError",
    "WorkerError",
    "Readiness",
    "RetryPolicy",
    "ClientPublisher",
    "run_worker",
    "Requester",
    "open_requester",
    "WorkerHost",
    "run_host",
    "APIError",
    "Accepted",
    "BadRequest",
    "BusEventsError",
    "ConfigError",
    "ConnectError",
    "Delivery",
    "Event",
    "EventStream",
    "EventsClient",
    "Forbidden",
    "Handler",
    "InvalidEvent",
    "LineTooLong",
    "NDJSONDecoder",
    "NotFound",
    "PayloadTooLarge",
    "PublishRequest",
    "Publisher",
    "RateLimited",
    "ServerError",
    "StreamError",
    "StreamInterrupted",
    "StreamStalled",
    "StreamSpec",
    "StreamTruncated",
    "Timeout",
    "Token",
    "TokenError",
    "TransportError",
    "Unauthorized",
    "__version__",
    "config_root",
    "find_token",
    "normalize_events_url",
    "parse_duration",
}


def test_public_names_are_exactly_the_api() -> None:
    assert set(busevents.__all__) == PUBLIC
    for name in busevents.__all__:
        assert getattr(busevents, name) is not None
    with pytest.raises(AttributeError):
        busevents.NoSuchThing  # noqa: B018


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
    proc = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stored_top_level_help_matches_cyclopts() -> None:
    """`bus-events --help` prints pre-rendered text; it must be what cyclopts renders."""
    from busevents.cli._helptext import render, stored

    assert stored() == render(), "run: python -m busevents.cli._helptext --write"


def test_readme_reference_is_the_real_help() -> None:
    from busevents.cli._helptext import readme_with_reference

    readme = (ROOT / "README.md").read_text()
    assert readme == readme_with_reference(readme), "run: python -m busevents.cli._helptext --write"


def test_every_command_has_a_summary_and_an_example() -> None:
    from busevents.cli._helptext import commands, render

    for command in commands():
        text = render(command)
        assert "Example:" in text, command
        assert text.splitlines()[2].strip(), command  # the one-line summary under the usage
