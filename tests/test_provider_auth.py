"""Reference provider: bearer tokens (401), the scope policy (403), token helpers."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from busevents.provider import (
    API_AUDIENCE,
    INTERNAL_AUDIENCE,
    ProviderConfig,
    RunningProvider,
    ScopePolicy,
    mint_token,
    open_provider,
    secret_from_env,
)
from busevents.provider._auth import AuthError, TokenVerifier

SECRET = b"auth-tests-secret-".ljust(64, b"0")  # long enough for HS512 too


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "sub": "alice",
        "aud": API_AUDIENCE,
        "scope": "events:send events:listen",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def signed(secret: bytes = SECRET, algorithm: str = "HS256", **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm=algorithm)


@pytest.fixture
async def prov() -> AsyncIterator[RunningProvider]:
    async with open_provider(ProviderConfig(secret=SECRET)) as running:
        yield running


def bad_tokens() -> dict[str, str | None]:
    """Tokens the provider must refuse, minted now (a suite can run longer than a ttl)."""
    return {
        "missing header": None,
        "alg none": b64({"alg": "none", "typ": "JWT"}) + "." + b64(claims()) + ".",
        "alg RS256": b64({"alg": "RS256", "typ": "JWT"}) + "." + b64(claims()) + ".c2ln",
        "alg HS512": signed(algorithm="HS512"),
        "wrong secret": signed(secret=b"another-secret-".ljust(64, b"1")),
        "expired": signed(exp=int(time.time()) - 120, iat=int(time.time()) - 200),
        "nbf in future": signed(nbf=int(time.time()) + 600),
        "wrong audience": signed(aud="example.com/api"),
        "no audience": signed(aud=None),
        "no exp": signed(exp=None),
        "no sub": signed(sub=None),
        "empty sub": signed(sub=""),
        "malformed": "not.a.jwt",
        "garbage": "%%%",
    }


def _expect_401(response: httpx.Response, token: str | None) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == "invalid_auth"
    assert body["message"]
    text = response.text
    assert "Traceback" not in text and SECRET.decode() not in text
    if token:
        assert token not in text
        assert all(part not in text for part in token.split(".") if len(part) > 8)


@pytest.mark.parametrize("case", list(bad_tokens()))
async def test_bad_tokens_get_401_on_publish_and_stream(
    prov: RunningProvider, http: httpx.AsyncClient, case: str
) -> None:
    token = bad_tokens()[case]
    headers = auth(token) if token is not None else {}
    published = await http.post(prov.url, json={"name": "example.ping"}, headers=headers)
    _expect_401(published, token)
    streamed = await http.get(
        prov.url + "/stream", params={"name": "example.ping"}, headers=headers
    )
    _expect_401(streamed, token)


async def test_other_auth_schemes_get_401(prov: RunningProvider, http: httpx.AsyncClient) -> None:
    response = await http.post(
        prov.url, json={"name": "example.ping"}, headers={"Authorization": "Basic YTpi"}
    )
    _expect_401(response, None)


async def test_reasons_say_what_is_wrong(prov: RunningProvider, http: httpx.AsyncClient) -> None:
    async def reason(token: str) -> str:
        response = await http.post(prov.url, json={"name": "example.ping"}, headers=auth(token))
        return str(response.json()["message"])

    bad = bad_tokens()
    assert "expired" in await reason(str(bad["expired"]))
    assert "audience" in await reason(str(bad["wrong audience"]))
    assert "HS256" in await reason(str(bad["alg none"]))
    assert "signature" in await reason(str(bad["wrong secret"]))
    assert "sub" in await reason(str(bad["no sub"]))


async def test_leeway_accepts_a_few_seconds_of_clock_skew(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = signed(nbf=int(time.time()) + 2, iat=int(time.time()) + 2)
    response = await http.post(prov.url, json={"name": "example.ping"}, headers=auth(token))
    assert response.status_code == 202


async def test_internal_audience_is_accepted(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = signed(aud=INTERNAL_AUDIENCE)
    response = await http.post(prov.url, json={"name": "example.ping"}, headers=auth(token))
    assert response.status_code == 202


# -- 403: the scope policy -----------------------------------------------------


async def test_protected_namespace_needs_its_scope(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    plain = prov.token("alice")
    response = await http.post(prov.url, json={"name": "bus.vm.start.request"}, headers=auth(plain))
    assert response.status_code == 403
    assert response.json() == {
        "error": "forbidden",
        "message": "token lacks scope vm:write required to publish bus.vm.start.request",
        "required_scopes": ["vm:write"],
    }
    stream = await http.get(
        prov.url + "/stream", params={"name": "bus.vm.status.response"}, headers=auth(plain)
    )
    assert (stream.status_code, stream.json()["required_scopes"]) == (403, ["vm:read"])
    allowed = prov.token("alice", scopes="vm:write")
    ok = await http.post(prov.url, json={"name": "bus.vm.start.request"}, headers=auth(allowed))
    assert ok.status_code == 202


# What upstream's bus-api-provider-events page says, written out by hand: the
# default table must give these (send, listen) scopes for these names.
UPSTREAM = [
    ("bus.vm.start.request", "vm:write", "vm:write"),
    ("bus.vm.status.request", "vm:read", "vm:read"),
    ("bus.llm.chat.completions.request", "llm:proxy", "llm:proxy"),
    ("bus.containers.run.request", "container:run", "container:run"),
    ("bus.containers.status.response", "container:read", "container:read"),
    ("bus.containers.delete.request", "container:delete", "container:delete"),
    ("bus.containers.runner.start.request", "container:admin", "container:admin"),
    ("bus.usage.record.request", "usage:write", "usage:write"),
    ("bus.usage.list.request", "usage:read", "usage:read"),
    ("bus.usage.delete.request", "usage:delete", "usage:delete"),
    ("bus.ssh.script.run.request", "ssh:run", "ssh:run"),
    ("bus.billing.status.request", "billing:read", "billing:read"),
    ("bus.billing.checkout_session.request", "billing:setup", "billing:setup"),
    (
        "bus.billing.entitlement.check.request",
        "billing:entitlement:check",
        "billing:entitlement:check",
    ),
    ("bus.billing.subscription.update", "billing:subscription:write", "billing:subscription:write"),
    ("bus.billing.usage.export.request", "billing:usage:export", "billing:usage:export"),
    ("bus.stripe.meter_event.record.request", "billing:provider", "billing:provider"),
    ("bus.cloud.plan.request", "cloud:read", "cloud:read"),
    ("bus.cloud.apply.request", "cloud:write", "cloud:write"),
    ("bus.cloud.destroy.request", "cloud:destroy", "cloud:destroy"),
    ("bus.database.status.request", "database:read", "database:read"),
    ("bus.database.apply.request", "database:admin", "database:admin"),
    ("bus.node.verify.request", "node:read", "node:read"),
    ("bus.node.bootstrap.request", "node:admin", "node:admin"),
    ("bus.inference.status.request", "inference:read", "inference:read"),
    ("bus.inference.install.request", "inference:admin", "inference:admin"),
    ("bus.task.create.request", "task:send", "task:read"),
    ("bus.task.message", "task:reply", "task:read"),
    ("bus.task.worker.start.request", "task:claim", "task:read"),
    ("bus.task.assign.request", "task:admin", "task:read"),
    ("bus.workers.list.request", "workers:read", "workers:read"),
    ("bus.workers.create.request", "workers:write", "workers:read"),
    ("bus.workers.pause.request", "workers:control", "workers:read"),
    ("bus.workers.unknown.request", "workers:admin", "workers:read"),
    ("bus.work.item", "work:send", "work:read"),
    ("bus.dev.task.created", "dev:task:send", "dev:task:read"),
    ("bus.readiness.probe", None, "events:listen"),
    ("example.ping", "events:send", "events:listen"),
    ("busy.signal", "events:send", "events:listen"),
]


@pytest.mark.parametrize(("name", "send", "listen"), UPSTREAM)
def test_default_table_says_what_upstream_says(
    name: str, send: str | None, listen: str | None
) -> None:
    policy = ScopePolicy.default()
    assert policy.required(name, "send") == (None if send is None else (send,))
    assert policy.required(name, "listen") == (None if listen is None else (listen,))


def _example_name(prefix: str) -> str:
    return prefix + "x.request" if prefix.endswith(".") else prefix


_ALL_SCOPES = sorted(
    {s for rule in ScopePolicy.default().rules for s in (rule.send, rule.listen) if s}
    | {"events:send", "events:listen"}
)


@pytest.mark.parametrize(
    "rule", ScopePolicy.default().rules, ids=[r.prefix for r in ScopePolicy.default().rules]
)
async def test_every_row_of_the_default_table_is_enforced(
    prov: RunningProvider, http: httpx.AsyncClient, rule: Any
) -> None:
    name = _example_name(rule.prefix)
    for action, needed in (("send", rule.send), ("listen", rule.listen)):

        async def attempt(token: str, action: str = action) -> httpx.Response:
            if action == "send":
                return await http.post(prov.url, json={"name": name}, headers=auth(token))
            params = {"name": name, "replay": "true", "follow": "false"}
            return await http.get(prov.url + "/stream", params=params, headers=auth(token))

        if needed is None:
            refused = await attempt(prov.token("root", scopes=_ALL_SCOPES))
            assert refused.status_code == 403
            body = refused.json()
            assert "reserved" in body["message"] and "required_scopes" not in body
            continue
        wrong = await attempt(prov.token("alice", scopes=[s for s in _ALL_SCOPES if s != needed]))
        assert wrong.status_code == 403, (action, name)
        assert wrong.json()["required_scopes"] == [needed]
        assert needed in wrong.json()["message"]
        right = await attempt(prov.token("alice", scopes=[needed]))
        assert right.status_code == (202 if action == "send" else 200), (action, name)


async def test_readiness_probe_is_an_empty_listen_for_events_listen(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    token = prov.token("alice", scopes="events:listen")
    params = {"name": "bus.readiness.probe", "replay": "true", "follow": "false"}
    probe = await http.get(prov.url + "/stream", params=params, headers=auth(token))
    assert (probe.status_code, probe.content) == (200, b"")
    near = await http.get(
        prov.url + "/stream", params={**params, "name": "bus.readiness.prober"}, headers=auth(token)
    )
    assert near.status_code == 403 and "required_scopes" not in near.json()


async def test_reserved_bus_names_are_refused_whatever_the_scopes(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    everything = prov.token("root", scopes="events:send events:listen vm:write bus:admin")
    for response in (
        await http.post(prov.url, json={"name": "bus.other"}, headers=auth(everything)),
        await http.get(
            prov.url + "/stream", params={"name": "bus.other"}, headers=auth(everything)
        ),
        await http.post(prov.url, json={"name": "bus.vm"}, headers=auth(everything)),
    ):
        assert response.status_code == 403
        body = response.json()
        assert body["error"] == "forbidden" and "reserved" in body["message"]
        assert "required_scopes" not in body


async def test_check_order_is_auth_then_validation_then_scope(
    prov: RunningProvider, http: httpx.AsyncClient
) -> None:
    no_scopes = prov.token("alice", scopes=[])
    bad_name = {"name": "Bus VM"}
    assert (await http.get(prov.url + "/stream", params=bad_name)).status_code == 401
    invalid = await http.get(prov.url + "/stream", params=bad_name, headers=auth(no_scopes))
    assert invalid.status_code == 400
    valid = await http.get(prov.url + "/stream", params={"name": "x"}, headers=auth(no_scopes))
    assert valid.status_code == 403
    assert (await http.post(prov.url, content=b"[", headers=auth(no_scopes))).status_code == 400


async def test_policy_file_replaces_the_table(tmp_path: Path, http: httpx.AsyncClient) -> None:
    path = tmp_path / "policy.json"
    path.write_text(
        json.dumps(
            [
                {"prefix": "acme.", "send": "acme:write", "listen": "acme:read"},
                {"prefix": "acme.secret.", "send": None, "listen": "acme:admin"},
            ]
        )
    )
    policy = ScopePolicy.from_file(path)
    assert policy.required("acme.x", "send") == ("acme:write",)
    assert policy.required("acme.secret.x", "send") is None
    assert policy.required("acme.secret.x", "listen") == ("acme:admin",)
    assert policy.required("bus.vm.x", "send") == ("events:send",)  # default table replaced
    async with open_provider(ProviderConfig(secret=SECRET, policy=policy)) as provider:
        token = provider.token("a", scopes="events:send acme:read")
        denied = await http.post(provider.url, json={"name": "acme.thing"}, headers=auth(token))
        assert denied.json()["required_scopes"] == ["acme:write"]
        reserved = await http.post(
            provider.url, json={"name": "acme.secret.x"}, headers=auth(token)
        )
        assert reserved.status_code == 403 and "reserved" in reserved.json()["message"]


def test_policy_longest_prefix_wins_and_defaults() -> None:
    policy = ScopePolicy.default()
    assert policy.required("bus.containers.runner.start.request", "send") == ("container:admin",)
    assert policy.required("bus.containers.run.request", "send") == ("container:run",)
    assert policy.required("bus.anything", "send") is None
    assert policy.required("bus.container.run", "send") is None  # singular: not upstream's name
    assert policy.required("busy.signal", "send") == ("events:send",)
    assert policy == ScopePolicy.default()
    assert policy.required_for_prefix("bus.containers.status.", "listen") == ("container:read",)
    assert policy.required_for_prefix("bus.task.", "listen") == ("task:read",)
    assert policy.required_for_prefix("bus.containers.", "listen") == (
        "container:admin",
        "container:run",
        "container:read",
        "container:delete",
    )
    assert policy.required_for_prefix("", "listen") is None


def test_whole_name_rows_cover_the_name_and_names_under_it(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps([{"prefix": "acme.job", "send": "job:run", "listen": None}]))
    policy = ScopePolicy.from_file(path)
    assert policy.required("acme.job", "send") == ("job:run",)
    assert policy.required("acme.job.start", "send") == ("job:run",)
    assert policy.required("acme.jobs", "send") == ("events:send",)


@pytest.mark.parametrize(
    "content",
    [
        "{}",
        '[{"prefix": "a."}]',
        '[{"prefix": "a.", "send": 1, "listen": null}]',
        '[{"prefix": "a.", "send": "x", "listen": "y", "extra": 1}]',
        '[{"prefix": "a.", "send": "x", "listen": "y"}, {"prefix": "a.", "send": "x", "listen": "y"}]',
        "not json",
    ],
)
def test_bad_policy_files_are_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "policy.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"policy"):
        ScopePolicy.from_file(path)


# -- token helpers -------------------------------------------------------------


def test_mint_token_claims() -> None:
    before = int(time.time())
    token = mint_token(SECRET, subject="alice", scopes=["vm:read", "events:listen"], ttl=60)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    decoded = jwt.decode(token, SECRET, algorithms=["HS256"], audience=API_AUDIENCE)
    assert decoded["sub"] == "alice"
    assert decoded["aud"] == API_AUDIENCE
    assert decoded["scope"] == "vm:read events:listen"
    assert before <= decoded["iat"] == decoded["nbf"] <= int(time.time())
    assert decoded["exp"] == decoded["iat"] + 60
    internal = mint_token(SECRET, subject="svc", audience=INTERNAL_AUDIENCE)
    assert jwt.decode(internal, SECRET, algorithms=["HS256"], audience=INTERNAL_AUDIENCE)[
        "scope"
    ] == ("events:send events:listen")


def test_mint_token_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        mint_token(SECRET, subject="")
    with pytest.raises(ValueError):
        mint_token(b"", subject="a")
    with pytest.raises(ValueError):
        mint_token(SECRET, subject="a", scopes=["two words"])


async def test_short_secrets_work_without_warnings(http: httpx.AsyncClient) -> None:
    async with open_provider(ProviderConfig(secret=b"dev")) as provider:
        response = await http.post(
            provider.url, json={"name": "example.ping"}, headers=auth(provider.token())
        )
    assert response.status_code == 202


def test_secret_from_env() -> None:
    assert secret_from_env("plain text") == b"plain text"
    assert secret_from_env("päivää") == "päivää".encode()
    assert secret_from_env("base64:c2VjcmV0") == b"secret"
    assert secret_from_env("base64:c2VjcmV0LQ") == b"secret-"  # padding optional
    assert secret_from_env("base64:_-8") == b"\xff\xef"  # URL-safe alphabet
    for bad in ("", "base64:", "base64:!!!", "base64:a"):
        with pytest.raises(ValueError) as info:
            secret_from_env(bad)
        assert "secret" in str(info.value)
        assert "!!!" not in str(info.value)


def test_a_remembered_token_still_expires() -> None:
    """Verified tokens are cached, but each use is checked against the clock again."""
    now = [time.time()]
    verifier = TokenVerifier(SECRET, clock=lambda: now[0])
    token = mint_token(SECRET, subject="alice", ttl=60)
    header = f"Bearer {token}".encode()
    assert verifier.verify_header(header).subject == "alice"
    now[0] += 60 + 4  # past exp, inside the 5 s leeway: still accepted, from the cache
    assert verifier.verify_header(header).subject == "alice"
    now[0] += 2  # beyond exp + leeway
    with pytest.raises(AuthError, match="expired"):
        verifier.verify_header(header)


async def test_the_cli_names_the_scope_an_upstream_namespace_needs(run_cli, provider) -> None:
    env = {
        "BUS_EVENTS_API_URL": provider.url,
        "BUS_API_TOKEN": provider.token(scopes="events:send"),
    }
    reserved = await run_cli("send", "--name", "bus.nothing.here", "--payload", "{}", env=env)
    assert reserved.status == 1 and "reserved" in reserved.stderr
    protected = await run_cli("send", "--name", "bus.llm.chat.completions.request", env=env)
    assert protected.status == 1 and '--scope "llm:proxy"' in protected.stderr
