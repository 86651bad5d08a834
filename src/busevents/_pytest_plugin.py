"""The pytest fixtures of :mod:`busevents.testing` (the ``busevents`` pytest11 entry point).

``bus_provider``, ``bus_token_factory`` and ``bus_client`` run in the test's
own trio loop (trio tests); ``bus_provider_thread`` and ``bus_env`` in a
thread of their own (sync tests, ``subprocess.run``).  See
:mod:`busevents.testing` for an example of each.

Loaded by pytest in every project where busevents is installed, so this
module imports nothing heavy: the provider (and its optional dependencies)
is imported only when a test asks for a fixture.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from busevents import EventsClient

    from .provider import RunningProvider
    from .testing import TokenFactory


@pytest.fixture
async def bus_provider() -> AsyncIterator[RunningProvider]:
    """A reference provider on a free 127.0.0.1 port, stopped after the test."""
    from .provider import open_provider

    async with open_provider() as provider:
        yield provider


@pytest.fixture
def bus_token_factory(bus_provider: RunningProvider) -> TokenFactory:
    """Mint tokens for ``bus_provider``: ``bus_token_factory(subject=..., scopes=...)``."""
    from .testing import TokenFactory

    return TokenFactory(bus_provider)


@pytest.fixture
async def bus_client(
    bus_provider: RunningProvider, bus_token_factory: TokenFactory
) -> AsyncIterator[EventsClient]:
    """An ``EventsClient`` on ``bus_provider`` with an ``events:send events:listen`` token."""
    from busevents import EventsClient

    async with EventsClient(bus_provider.url, bus_token_factory(), timeout=10) as client:
        yield client


@pytest.fixture(scope="session")
def bus_provider_thread() -> Iterator[RunningProvider]:
    """One reference provider for the session, served by its own thread and trio loop.

    For sync tests and blocking calls (``subprocess.run``): it answers whatever
    the test's thread does.  Tests share it, so give each its own event names.
    """
    from .testing import provider_thread

    with provider_thread() as provider:
        yield provider


@pytest.fixture
def bus_env(bus_provider_thread: RunningProvider) -> dict[str, str]:
    """``BUS_EVENTS_API_URL`` and ``BUS_API_TOKEN`` of ``bus_provider_thread``, for subprocesses.

    Works in sync and trio tests alike, with ``subprocess.run`` too:
    ``subprocess.run(["bus-events", "send", ...], env={**os.environ, **bus_env})``.
    """
    return {
        "BUS_EVENTS_API_URL": bus_provider_thread.url,
        "BUS_API_TOKEN": bus_provider_thread.token(),
    }
