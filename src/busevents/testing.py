"""Test your workers for real: a reference provider, and helpers around it.

The pytest plugin (the ``busevents`` ``pytest11`` entry point, loaded
automatically once busevents is installed) provides two kinds of provider.
All of them need the ``provider`` extra (``pip install 'busevents[provider]'``).

**In the test's own trio loop**, for trio tests (pytest-trio: ``trio_mode =
true`` or ``@pytest.mark.trio``) that talk to it with ``await``:

``bus_provider``
    a reference provider on a free ``127.0.0.1`` port, for the test
    (:class:`busevents.provider.RunningProvider`: ``.url``, ``.token(...)``).
``bus_token_factory``
    a :class:`TokenFactory`: ``bus_token_factory(subject="alice",
    scopes="vm:read")`` mints a token that provider accepts.
``bus_client``
    an :class:`~busevents.EventsClient` connected to it with a token for
    ``events:send events:listen``.

Such a provider answers only while the loop runs: a blocking call in the test
(``subprocess.run(...)``) stops it; use ``await trio.run_process(...)`` there.

**In a thread of its own**, for plain (sync) tests and for blocking calls
such as ``subprocess.run(["bus-events", "send", ...])`` from any test:

``bus_provider_thread``
    one reference provider for the whole session, served by its own thread
    and trio loop (``.url``, ``.token(...)``, as above).  Tests share it: give
    each test its own event names (or correlation ids).
``bus_env``
    ``BUS_EVENTS_API_URL`` and ``BUS_API_TOKEN`` (``events:send
    events:listen``) of ``bus_provider_thread``, to run a worker script or the
    CLI as a subprocess: ``env={**os.environ, **bus_env}``.  In a trio test,
    ``EventsClient.from_env(env=bus_env)`` talks to that same provider.

Outside pytest, :func:`provider_thread` starts the same thing.

A trio test, provider in its loop::

    from busevents import Event, Publisher, Worker, open_requester
    from busevents.testing import open_worker

    async def echo(event: Event, publisher: Publisher) -> None:
        await publisher.reply(event, "example.echo.reply", event.payload_obj())

    async def test_echo(bus_client) -> None:
        async with open_worker(bus_client, Worker("example.echo", echo)):
            async with open_requester(bus_client, "example.echo.reply") as requester:
                response = await requester.request("example.echo", {"n": 1}, timeout=5)
        assert response.payload_obj() == {"n": 1}

A plain test of a command line, provider in its thread::

    import os, subprocess

    def test_send_then_replay(bus_env) -> None:
        env = {**os.environ, **bus_env}
        send = ["bus-events", "send", "--name", "my.test.sent", "--payload", '{"n": 1}']
        subprocess.run(send, env=env, check=True)
        listen = ["bus-events", "--timeout", "10s", "listen", "--name", "my.test.sent",
                  "--replay", "--count", "1"]
        out = subprocess.run(listen, env=env, check=True, capture_output=True)
        assert b'"n":1' in out.stdout
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from busevents import EventsClient, Readiness, Worker

    from .provider import RunningProvider

__all__ = ["DEFAULT_SCOPES", "TokenFactory", "open_worker", "provider_thread"]

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


@contextmanager
def provider_thread(*, ready_within: float = 30.0) -> Iterator[RunningProvider]:
    """A reference provider served by a thread of its own (its own trio loop).

    For sync code and blocking calls: the provider answers whatever the
    calling thread does.  Yields the :class:`RunningProvider` once it listens
    (use its ``url`` and ``token(...)``; its backend belongs to the other
    thread's loop).  Leaving the block stops it and joins the thread.  Raises
    what starting it raised, and ``TimeoutError`` when it is not up within
    ``ready_within`` seconds.
    """
    started: queue.Queue[tuple[RunningProvider, trio.lowlevel.TrioToken] | BaseException]
    started = queue.Queue()
    stop = trio.Event()

    async def serve() -> None:
        from .provider import open_provider

        async with open_provider() as provider:
            started.put((provider, trio.lowlevel.current_trio_token()))
            await stop.wait()

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:  # handed to the caller, which raises it
            started.put(exc)

    thread = threading.Thread(target=run, name="busevents provider", daemon=True)
    thread.start()
    try:
        got = started.get(timeout=ready_within)
    except queue.Empty:
        raise TimeoutError(f"the provider thread did not start within {ready_within}s") from None
    if isinstance(got, BaseException):
        thread.join()
        raise got
    provider, loop = got
    try:
        yield provider
    finally:
        with contextlib.suppress(trio.RunFinishedError):  # its loop already ended
            trio.from_thread.run_sync(stop.set, trio_token=loop)
        thread.join(timeout=ready_within)
