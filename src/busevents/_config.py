"""Configuration: the events URL, the bearer token, Go-style durations.

The CLI and :meth:`EventsClient.from_env` resolve both the same way (spec §4):

* URL: ``api_url=`` (the CLI's ``--api-url``), else ``BUS_EVENTS_API_URL``;
  normalised to the events base.  A URL holding credentials is refused.
* Token: ``token_file=`` (``--token-file``), else ``BUS_API_TOKEN``, else
  ``BUS_EVENTS_TOKEN_FILE``,
  else ``auth/api-token`` under the Bus config root.  A token is never taken
  from the command line and never from a repository-local ``.bus/`` folder,
  and one that is not printable ASCII is refused (naming where it came from).
* Refresh: ``BUS_EVENTS_TOKEN_REFRESH=1`` (default 0) lets a client re-read its
  token from the file it came from (:meth:`Token.reread`) when a request gets
  ``401`` or the token is about to expire (its JWT ``exp``, read unverified).

Messages name the SDK's arguments (``api_url=``, ``token_file=``); the CLI
rewords them to its options.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from ._errors import ConfigError, TokenError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "client_from_env",
    "CA_FILE_ENV",
    "Proxies",
    "Token",
    "ca_file_from_env",
    "check_token",
    "config_root",
    "find_token",
    "token_expiry",
    "token_refresh_from_env",
    "normalize_events_url",
    "parse_duration",
    "resolve_url",
    "url_for_humans",
]

log = logging.getLogger("busevents")

URL_ENV = "BUS_EVENTS_API_URL"
TOKEN_ENV = "BUS_API_TOKEN"
TOKEN_FILE_ENV = "BUS_EVENTS_TOKEN_FILE"
TOKEN_REFRESH_ENV = "BUS_EVENTS_TOKEN_REFRESH"


def normalize_events_url(url: str) -> str:
    """Turn what the user gave into the events base URL (spec §1).

    ``…/events`` is kept, ``…/v1`` gets ``/events``, ``…/api`` gets
    ``/v1/events``, a bare origin gets ``/api/v1/events``.  Trailing slashes are
    dropped and a query string is kept.

    >>> normalize_events_url("http://127.0.0.1:8081/")
    'http://127.0.0.1:8081/api/v1/events'
    """
    raw = url.strip()
    parts = urlsplit(raw)
    if "@" in parts.netloc:
        # httpx would send them as Basic auth instead of the bearer token, and the
        # URL is printed in errors and -vv lines: refuse, and never show them.
        raise ConfigError(
            f"the Events API URL {_without_userinfo(raw)!r} holds credentials "
            "(user:password@): remove them; the bearer token comes from a token file "
            f"or {TOKEN_ENV}"
        )
    raw = _without_userinfo(raw)  # a malformed URL may still hold some: never echo them
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"invalid Events API URL {raw!r}: expected http(s)://host[:port][/path], "
            "e.g. http://127.0.0.1:8081/api/v1/events"
        )
    path = parts.path.rstrip("/")
    if path.endswith("/events"):
        pass
    elif path.endswith("/v1"):
        path += "/events"
    elif path.endswith("/api"):
        path += "/v1/events"
    elif not path:
        path = "/api/v1/events"
    else:
        raise ConfigError(
            f"Events API URL {raw!r} ends in neither /events, /v1, /api nor the origin: "
            "give the events base, e.g. https://ai.hg.fi/api/v1/events"
        )
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


# The patterns of this module are compiled where used (re's cache keeps them): the
# start-up of a one-shot ``send`` need not pay for those it does not use.
_USERINFO = r"^[^/?#]*@"


def _without_userinfo(url: str) -> str:
    """``url`` with anything like ``user:password@`` before the host replaced by ``…@``."""
    if "@" not in url:
        return url
    scheme, slashes, rest = url.partition("//")
    if not slashes:  # no "//": whatever precedes an "@" in the first segment
        return re.sub(_USERINFO, "…@", url)
    return scheme + slashes + re.sub(_USERINFO, "…@", rest)


def resolve_url(api_url: str | None, env: Mapping[str, str] | None = None) -> str:
    """``api_url``, else ``$BUS_EVENTS_API_URL``, normalised; a clear error when neither."""
    env = os.environ if env is None else env
    url = api_url or env.get(URL_ENV, "").strip()
    if not url:
        raise ConfigError(
            f"no Events API URL: pass api_url= or set {URL_ENV} "
            "(e.g. http://127.0.0.1:8081/api/v1/events)"
        )
    return normalize_events_url(url)


_DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)"
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Parse a Go duration (``300ms``, ``10s``, ``1m30s``, ``2h``) into seconds.

    Raises :class:`ConfigError` for anything else, e.g. a number without unit.
    """
    s = text.strip()
    body = s[1:] if s[:1] in "+-" else s
    if body == "0":
        return 0.0
    pos, total = 0, 0.0
    part = re.compile(_DURATION_PART)
    while pos < len(body):
        m = part.match(body, pos)
        if not m:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not body or pos != len(body):
        hint = " (missing unit?)" if body.replace(".", "", 1).isdigit() else ""
        raise ConfigError(
            f"invalid duration {text!r}{hint}: use Go syntax such as 300ms, 10s, 1m30s or 2h"
        )
    if s.startswith("-") and total:
        raise ConfigError(f"invalid duration {text!r}: must not be negative")
    return total


def config_root(env: Mapping[str, str] | None = None) -> Path:
    """The user's Bus config root: ``BUS_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/bus``,
    else ``~/.config/bus`` on Unix-like systems (the platform's user config dir elsewhere)."""
    from pathlib import Path  # here: a token from the environment needs no path

    env = os.environ if env is None else env
    if env.get("BUS_CONFIG_DIR"):
        return Path(env["BUS_CONFIG_DIR"]).expanduser()
    if os.name == "posix":
        xdg = env.get("XDG_CONFIG_HOME")
        base = Path(xdg).expanduser() if xdg else Path(env.get("HOME") or Path.home()) / ".config"
        return base / "bus"
    import platformdirs  # only off Unix: the platform knows where config lives

    return platformdirs.user_config_path("bus", appauthor=False, roaming=True)


_NOT_TOKEN_CHARS = r"[^\x21-\x7e]"


def check_token(value: str, source: str) -> str:
    """Return ``value`` if it can be sent as a bearer token: printable ASCII, no
    space.  Otherwise raise :class:`TokenError` naming ``source`` and what is
    wrong, never the value (an HTTP library would put it in its own error)."""
    if value.isascii() and value.isprintable() and " " not in value:
        return value  # all of it in \x21-\x7e (what the search below would say)
    bad = re.search(_NOT_TOKEN_CHARS, value)
    if bad is None:
        return value
    char = bad.group()
    kind = (
        "a line break"
        if char in "\r\n"
        else "whitespace"
        if char.isspace()
        else "a non-ASCII character"
        if ord(char) > 0x7F
        else "a control character"
    )
    raise TokenError(
        f"the token from {source} contains {kind} (at character {bad.start() + 1} of "
        f"{len(value)}); a bearer token is one word of printable ASCII: check how it "
        "was copied"
    )


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token and where it came from; its value is never shown.

    ``path`` is the file it was read from (``None`` for a value given directly
    or taken from ``BUS_API_TOKEN``): only a token with a path can be re-read.
    Raises :class:`TokenError` naming ``source`` for a value that cannot be a
    bearer token (see :func:`find_token`).
    """

    value: str
    source: str
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_token(self.value, self.source)

    def __repr__(self) -> str:
        return f"Token(source={self.source!r}, value=<hidden>)"

    __str__ = __repr__

    @property
    def expires(self) -> float | None:
        """The JWT ``exp`` claim (Unix seconds), read without verifying; None if absent."""
        return token_expiry(self.value)

    def reread(self) -> Token:
        """The token now in the file this one came from.

        Raises :class:`TokenError` when this token has no file (a value from
        ``BUS_API_TOKEN`` or given directly cannot change) or the file cannot
        be read.
        """
        if self.path is None:
            raise TokenError(
                f"the token from {self.source} cannot be refreshed: a value cannot change "
                f"while the program runs; put it in a file and set {TOKEN_FILE_ENV} "
                "(or pass --token-file) so that a new token can be written there"
            )
        label = self.source.removesuffix(f" {self.path}")
        return _read_token_file(self.path, label)


def token_expiry(value: str) -> float | None:
    """The ``exp`` claim of a JWT (Unix seconds), read WITHOUT verifying the signature.

    Only a hint of when to re-read a token; None when ``value`` is not a JWT
    or has no numeric ``exp``.  Never raises, never echoes the token.
    """
    parts = value.split(".")
    if len(parts) != 3:
        return None
    import base64
    import binascii
    import json

    segment = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None


def client_from_env(
    api_url: str | None,
    token_file: str | None,
    env: Mapping[str, str] | None,
    options: dict[str, Any],
) -> tuple[str, Token | None]:
    """The URL and token of a client's ``from_env`` (spec §4), and its default
    ``token_refresh`` and ``ca_file`` put in ``options``: one resolution for
    :class:`EventsClient` and :class:`SyncClient`."""
    url = resolve_url(api_url, env)
    options.setdefault("token_refresh", token_refresh_from_env(env))
    options.setdefault("ca_file", ca_file_from_env(env))
    return url, find_token(token_file, env)


def token_refresh_from_env(env: Mapping[str, str] | None = None) -> bool:
    """``BUS_EVENTS_TOKEN_REFRESH``: ``1`` on, ``0`` or unset off.

    Any other value raises :class:`ConfigError` (a usage error): a typo must
    not silently leave a long-running worker with a token that will expire.
    """
    env = os.environ if env is None else env
    text = env.get(TOKEN_REFRESH_ENV, "").strip()
    if text in ("", "0"):
        return False
    if text == "1":
        return True
    raise ConfigError(f"invalid {TOKEN_REFRESH_ENV}={text[:20]!r}: expected 1 (refresh) or 0")


#: Largest token file: a JWT is a few KiB; anything bigger is not a token file.
MAX_TOKEN_FILE = 64 * 1024


def _read_token_file(path: Path, source: str) -> Token:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise TokenError(f"token file {path} ({source}) does not exist") from None
    except IsADirectoryError:
        raise TokenError(f"token file {path} ({source}) is a directory") from None
    except OSError as exc:
        raise TokenError(f"cannot read token file {path} ({source}): {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode  # of what was opened, symlinks followed
        if stat.S_ISDIR(mode):
            raise TokenError(f"token file {path} ({source}) is a directory")
        if not stat.S_ISREG(mode):
            raise TokenError(
                f"token file {path} ({source}) is not a regular file "
                "(a FIFO, socket or device): write the token to a file"
            )
        try:
            data = fh.read(MAX_TOKEN_FILE + 1)
        except OSError as exc:
            raise TokenError(f"cannot read token file {path} ({source}): {exc.strerror}") from None
    if len(data) > MAX_TOKEN_FILE:
        raise TokenError(
            f"token file {path} ({source}) is larger than {MAX_TOKEN_FILE // 1024} KiB: "
            "not a token file"
        )
    if os.name == "posix" and stat.S_IMODE(mode) & 0o077:
        log.warning(
            "token file %s is readable by group or others (mode %o); run: chmod 600 %s",
            path,
            stat.S_IMODE(mode),
            path,
        )
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TokenError(f"token file {path} ({source}) is not UTF-8 text") from None
    if not value:
        raise TokenError(f"token file {path} ({source}) is empty")
    if any(c.isspace() for c in value):
        raise TokenError(f"token file {path} ({source}) holds more than one word; expected one JWT")
    return Token(value, f"{source} {path}", path)


def find_token(
    token_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Token:
    """Find the bearer token in the documented order (spec §4).

    Raises :class:`TokenError` naming every place looked at when none holds one.
    """
    env = os.environ if env is None else env
    if token_file is not None:
        from pathlib import Path

        return _read_token_file(Path(token_file).expanduser(), "token_file=")
    value = env.get(TOKEN_ENV, "").strip()
    if value:
        return Token(value, TOKEN_ENV)
    if env.get(TOKEN_FILE_ENV, "").strip():
        from pathlib import Path

        return _read_token_file(Path(env[TOKEN_FILE_ENV].strip()).expanduser(), TOKEN_FILE_ENV)
    default = config_root(env) / "auth" / "api-token"
    if default.exists():
        return _read_token_file(default, "Bus auth config")
    raise TokenError(
        f"no bearer token: pass token_file= or set {TOKEN_ENV} or {TOKEN_FILE_ENV}; "
        f"for a Bus deployment get one with `bus auth token` (read from {default}), "
        "for the reference provider with `bus-events dev-token --write`"
    )


# -- proxies and TLS trust (the network issue) ---------------------------------

CA_FILE_ENV = "BUS_EVENTS_CA_FILE"
_PROXY_NAMES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def _proxy_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """The proxy variables by lower-case name, in any case; lower case wins (curl)."""
    environ = os.environ if env is None else env
    found: dict[str, str] = {}
    for key, value in environ.items():
        name = key.lower()
        if name in _PROXY_NAMES and (key == name or name not in found):
            found[name] = value.strip()
    return found


def _check_proxy(url: str, source: str) -> str:
    """A proxy URL as used: ``host:port`` gets ``http://`` (curl); only http proxies."""
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError(f"{source} is not a proxy URL: {url_for_humans(url)!r}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(
            f"{source} = {url_for_humans(url)!r}: busevents speaks to http:// proxies only "
            "(CONNECT carries https through them); unset it or name an http:// proxy"
        )
    return url


def url_for_humans(url: str) -> str:
    """``url`` without its user name and password (for messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<an unparsable URL>"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


@dataclass(frozen=True)
class Proxies:
    """Which proxy carries a request, decided per request URL.

    From the environment as curl and httpx read it: ``http_proxy`` for http://
    URLs, ``https_proxy`` for https:// URLs, else ``all_proxy``; any case, the
    lower-case name winning.  ``no_proxy`` is a comma-separated list of hosts
    that go direct: ``*`` (all), a name (``example.com`` also matches
    ``api.example.com``; a leading ``.`` or ``*.`` is the same), an IP address
    or network (``10.0.0.0/8``, ``::1``), optionally with ``:port``.
    """

    http: str | None = None
    https: str | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Proxies:
        found = _proxy_env(env)
        every = found.get("all_proxy") or None
        every = _check_proxy(every, "ALL_PROXY") if every else None
        http = found.get("http_proxy")
        https = found.get("https_proxy")
        return cls(
            http=_check_proxy(http, "HTTP_PROXY") if http else every,
            https=_check_proxy(https, "HTTPS_PROXY") if https else every,
            no_proxy=tuple(
                entry.strip().lower()
                for entry in found.get("no_proxy", "").split(",")
                if entry.strip()
            ),
        )

    @classmethod
    def explicit(cls, proxy: str) -> Proxies:
        """Every request through ``proxy`` (the SDK's ``proxy=``)."""
        url = _check_proxy(proxy, "proxy=")
        return cls(http=url, https=url)

    def for_url(self, scheme: str, host: str, port: int) -> str | None:
        """The proxy URL for a request to ``scheme://host:port``; None to go direct."""
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or self._bypass(host.lower().rstrip("."), port):
            return None
        return proxy

    def _bypass(self, host: str, port: int) -> bool:
        for entry in self.no_proxy:
            if entry == "*":
                return True
            name, wanted = _split_port(entry)
            if wanted is not None and wanted != port:
                continue
            if _host_matches(host, name):
                return True
        return False


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [::1]:8080
        name, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        name, _, port = entry.partition(":")
    else:
        name, port = entry, ""
    return name, int(port) if port.isdigit() and len(port) <= 5 else None


def _host_matches(host: str, entry: str) -> bool:
    import ipaddress

    if "/" in entry:
        try:
            return ipaddress.ip_address(host.strip("[]")) in ipaddress.ip_network(
                entry, strict=False
            )
        except ValueError:
            return False
    entry = entry.removeprefix("*").removeprefix(".").rstrip(".")
    if not entry:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")) == ipaddress.ip_address(entry)
    except ValueError:
        return host == entry or host.endswith("." + entry)


def ca_file_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """``BUS_EVENTS_CA_FILE``: a PEM file of the CAs to trust (None when unset)."""
    value = (os.environ if env is None else env).get(CA_FILE_ENV, "").strip()
    return value or None
