"""Test your workers for real: a reference provider in-process, and helpers around it.

The pytest plugin (the ``busevents`` ``pytest11`` entry point, loaded
automatically once busevents is installed) provides these fixtures, for trio
tests (pytest-trio: ``trio_mode = true`` or ``@pytest.mark.trio``):

``bus_provider``
    a reference provider on a free ``127.0.0.1`` port, for the test
    (:class:`busevents.provider.RunningProvider`: ``.url``, ``.token(...)``);
    needs the ``provider`` extra (``pip install 'busevents[provider]'``).
``bus_token_factory``
    a :class:`TokenFactory`: ``bus_token_factory(subject="alice",
    scopes="vm:read")`` mints a token that provider accepts.
``bus_client``
    an :class:`~busevents.EventsClient` connected to it with a token for
    ``events:send events:listen``.
``bus_env``
    ``BUS_EVENTS_API_URL`` and ``BUS_API_TOKEN`` for it, to run a worker
    script or the CLI as a subprocess.

Example::

    from busevents import Event, Publisher, Worker, open_requester
    from busevents.testing import open_worker

    async def echo(event: Event, publisher: Publisher) -> None:
        await publisher.reply(event, "example.echo.reply", event.payload_obj())

    async def test_echo(bus_client) -> None:
        async with open_worker(bus_client, Worker("example.echo", echo)):
            async with open_requester(bus_client, "example.echo.reply") as requester:
                response = await requester.request("example.echo", {"n": 1}, timeout=5)
        assert response.payload_obj() == {"n": 1}
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from busevents import EventsClient, Readiness, Worker

    from .provider import RunningProvider

__all__ = ["DEFAULT_SCOPES", "TokenFactory", "open_worker"]

#: The scopes of ``bus_client``'s token: publish and stream unprotected names.
DEFAULT_SCOPES = "events:send events:listen"


class TokenFactory:
    """Mint tokens that one running reference provider accepts.

    ``audience="ai.hg.fi/internal"`` makes a service token (sees every
    identity's events, may reply on behalf of one).
    """

    def __init__(self, provider: RunningProvider) -> None:
        self.provider = provider

    def __call__(
        self,
        subject: str = "test",
        scopes: str | Iterable[str] = DEFAULT_SCOPES,
        *,
        audience: str = "ai.hg.fi/api",
        ttl: float = 3600,
    ) -> str:
        """A signed JWT for ``subject`` with ``scopes``, valid ``ttl`` seconds."""
        return self.provider.token(subject=subject, scopes=scopes, audience=audience, ttl=ttl)


@asynccontextmanager
async def open_worker(
    client: EventsClient, *workers: Worker, ready_within: float = 10.0
) -> AsyncIterator[Readiness]:
    """Run ``workers`` in the background for the block; every stream is up on entry.

    Yields the host's :class:`Readiness`.  Leaving the block stops the workers
    (in-flight handlers get their grace period).  Raises what a worker raised
    (e.g. ``Forbidden``), and ``TooSlowError`` when the streams are not all up
    within ``ready_within`` seconds.
    """
    from busevents import WorkerHost, single_error

    host = WorkerHost(client, workers, handle_signals=False)
    with single_error():
        async with trio.open_nursery() as nursery:
            with trio.fail_after(ready_within):
                readiness: Readiness = await nursery.start(host.run)
            try:
                yield readiness
            finally:
                nursery.cancel_scope.cancel()
