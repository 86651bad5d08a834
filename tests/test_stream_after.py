"""``after=<id>``: a stream that resumes after a cursor (provider and client side)."""

from __future__ import annotations

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from busevents import BadRequest, EventsClient
from busevents.provider import RunningProvider, open_provider

from .helpers import collect

pytestmark = pytest.mark.timeout(60)


class _IgnoreAfter(httpx.AsyncBaseTransport):
    """A real HTTP transport to a provider that does not know ``after`` (it is dropped)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(str(request.url))
        if "after" in request.url.params:
            request.url = request.url.copy_remove_param("after")
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _publish(provider: RunningProvider, names: list[str]) -> list[str]:
    async with EventsClient(provider.url, provider.token()) as client:
        return [(await client.send(name, i)).id for i, name in enumerate(names)]


async def _ids(client: EventsClient, name: str, after: str | None, *, raw: bool) -> list[str]:
    import json

    async with client.listen(name, replay=True, follow=False, after=after) as stream:
        if raw:
            return [
                json.loads(line)["id"]
                async for block in stream.raw_batches()
                for line in block.splitlines()
            ]
        return [event.id async for event in stream]


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    total=st.integers(1, 40),
    data=st.data(),
    ignore=st.booleans(),
    raw=st.booleans(),
)
async def test_after_gives_exactly_the_later_events(
    total: int, data: st.DataObject, ignore: bool, raw: bool
) -> None:
    """Whether the provider honours ``after`` or the client has to skip, the stream
    holds exactly the events after the cursor, in order; other names don't count."""
    names = data.draw(st.lists(st.sampled_from(["t.a", "t.b"]), min_size=total, max_size=total))
    async with open_provider() as provider:
        ids = await _publish(provider, names)
        own = [i for i, n in zip(ids, names, strict=True) if n == "t.a"]
        cut = data.draw(st.integers(-1, len(ids) - 1))
        after = ids[cut] if cut >= 0 else None
        transport = _IgnoreAfter() if ignore else None
        async with EventsClient(provider.url, provider.token(), transport=transport) as client:
            got = await _ids(client, "t.a", after, raw=raw)
        index = ids.index(after) if after else -1
        assert got == [i for i in own if ids.index(i) > index]
        if transport is not None and after is not None:
            assert any("after=" in url for url in transport.seen)  # asked, then dropped


async def test_after_on_a_following_stream_sends_only_later_events(
    provider: RunningProvider,
) -> None:
    first, second = await _publish(provider, ["t.f", "t.f"])
    async with EventsClient(provider.url, provider.token()) as client:
        async with client.listen("t.f", after=first) as stream:
            third = (await client.send("t.f", 3)).id
            events = await collect(stream, 2)
    assert [e.id for e in events] == [second, third]


async def test_after_beyond_the_newest_event_gives_only_new_ones(
    provider: RunningProvider,
) -> None:
    (only,) = await _publish(provider, ["t.g"])
    ms, _seq = only.split("-")
    future = f"{int(ms) + 1}-0"
    async with EventsClient(provider.url, provider.token()) as client:
        assert await _ids(client, "t.g", future, raw=False) == []


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("name=t.x&replay=true&after=yesterday", "invalid after"),
        ("name=t.x&replay=true&after=12", "invalid after"),
        ("name=t.x&replay=true&after=1-0&after=2-0", "more than once"),
    ],
)
async def test_invalid_after_is_a_bad_request(
    provider: RunningProvider, http: httpx.AsyncClient, query: str, words: str
) -> None:
    response = await http.get(
        f"{provider.url}/stream?{query}",
        headers={"Authorization": f"Bearer {provider.token()}"},
    )
    assert response.status_code == 400
    assert words in response.json()["message"]


async def test_client_reports_a_refused_after(provider: RunningProvider) -> None:
    async with EventsClient(provider.url, provider.token()) as client:
        with pytest.raises(BadRequest, match="invalid after"):
            async with client.listen("t.x", after="nope"):
                await trio.lowlevel.checkpoint()
