"""URL normalisation (spec §1 table), Go durations, token discovery order (spec §4)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from busevents import ConfigError, TokenError, find_token, normalize_events_url, parse_duration
from busevents._config import config_root, resolve_url


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://ai.hg.fi/api/v1/events", "https://ai.hg.fi/api/v1/events"),
        ("https://ai.hg.fi/api/v1/events/", "https://ai.hg.fi/api/v1/events"),
        ("http://127.0.0.1:8081/local/v1", "http://127.0.0.1:8081/local/v1/events"),
        ("http://127.0.0.1:8081/local/v1/", "http://127.0.0.1:8081/local/v1/events"),
        ("http://127.0.0.1:8081/api", "http://127.0.0.1:8081/api/v1/events"),
        ("http://127.0.0.1:8081", "http://127.0.0.1:8081/api/v1/events"),
        ("http://127.0.0.1:8081/", "http://127.0.0.1:8081/api/v1/events"),
        ("http://h:1/api/v1/events?tenant=a", "http://h:1/api/v1/events?tenant=a"),
        ("http://h:1/?tenant=a", "http://h:1/api/v1/events?tenant=a"),
        ("  http://h:1/v1  ", "http://h:1/v1/events"),
    ],
)
def test_url_normalisation(given: str, expected: str) -> None:
    assert normalize_events_url(given) == expected


@pytest.mark.parametrize("bad", ["127.0.0.1:8081", "ftp://h/api", "http://h/other/path", "x"])
def test_bad_urls_are_named(bad: str) -> None:
    with pytest.raises(ConfigError, match="URL"):
        normalize_events_url(bad)


def test_url_from_flag_then_env() -> None:
    env = {"BUS_EVENTS_API_URL": "http://env:1"}
    assert resolve_url("http://flag:1", env) == "http://flag:1/api/v1/events"
    assert resolve_url(None, env) == "http://env:1/api/v1/events"
    with pytest.raises(ConfigError, match=r"pass api_url= or set BUS_EVENTS_API_URL"):
        resolve_url(None, {})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("300ms", 0.3),
        ("10s", 10),
        ("1m30s", 90),
        ("2h", 7200),
        ("1.5s", 1.5),
        ("0", 0),
        ("250us", 0.00025),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["30", "", "s", "10x", "-1s", "1s2"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(bad)


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_token_discovery_order(tmp_path: Path) -> None:
    flag = _write(tmp_path / "flag-token", "from-flag\n")
    env_file = _write(tmp_path / "env-file-token", "  from-env-file  \n")
    _write(tmp_path / "cfg" / "auth" / "api-token", "from-config")
    env = {
        "BUS_API_TOKEN": "from-env",
        "BUS_EVENTS_TOKEN_FILE": str(env_file),
        "BUS_CONFIG_DIR": str(tmp_path / "cfg"),
    }
    assert find_token(flag, env).value == "from-flag"
    assert find_token(None, env).value == "from-env"
    del env["BUS_API_TOKEN"]
    assert find_token(None, env).value == "from-env-file"
    del env["BUS_EVENTS_TOKEN_FILE"]
    assert find_token(None, env).value == "from-config"


def test_config_root_order(tmp_path: Path) -> None:
    assert config_root({"BUS_CONFIG_DIR": "/b", "XDG_CONFIG_HOME": "/x"}) == Path("/b")
    assert config_root({"XDG_CONFIG_HOME": "/x", "HOME": "/h"}) == Path("/x/bus")
    assert config_root({"HOME": "/h"}) == Path("/h/.config/bus")


def test_xdg_config_home_token(tmp_path: Path) -> None:
    _write(tmp_path / "xdg" / "bus" / "auth" / "api-token", "from-xdg")
    assert find_token(None, {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}).value == "from-xdg"


def test_repository_local_bus_folder_is_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    _write(repo / ".bus" / "auth" / "api-token", "repo-local-token")
    _write(repo / ".bus" / "api-token", "repo-local-token")
    monkeypatch.chdir(repo)
    with pytest.raises(TokenError) as info:
        find_token(None, {"HOME": str(tmp_path / "home")})
    assert "repo-local-token" not in str(info.value)


def test_token_file_problems_are_clear(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="is empty"):
        find_token(_write(tmp_path / "empty", " \n"), {})
    with pytest.raises(TokenError, match="does not exist"):
        find_token(tmp_path / "missing", {})
    with pytest.raises(TokenError, match="more than one word"):
        find_token(_write(tmp_path / "two", "a b"), {})


def test_token_never_shown(tmp_path: Path) -> None:
    token = find_token(_write(tmp_path / "t", "canary-token-value"), {})
    assert "canary-token-value" not in repr(token)
    assert "canary-token-value" not in str(token)


def test_world_readable_token_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path / "t", "tok", mode=0o644)
    assert find_token(path, {}).value == "tok"
    assert "chmod 600" in caplog.text
