"""WorkerHost: several workers, one client, clean cancellation, signals, exit statuses."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from busevents import (
    ConfigError,
    Event,
    EventsClient,
    Forbidden,
    Publisher,
    RetryPolicy,
    Worker,
    WorkerHost,
    run_host,
)
from busevents.provider import RunningProvider

FAST = RetryPolicy(min_delay=0.05, max_delay=0.2)


#: The in-process reference provider's own tasks (its server keeps connections open).
PROVIDER_TASKS = ("hypercorn.", "trio._highlevel_serve_listeners.", "busevents.provider.")


def all_tasks() -> set[trio.lowlevel.Task]:
    """Every task of this trio run but the provider's, walking the tree from the root."""
    found: set[trio.lowlevel.Task] = set()
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is not None and task not in found:
            found.add(task)
            for nursery in task.child_nurseries:
                todo.extend(nursery.child_tasks)
    return {task for task in found if not task.name.startswith(PROVIDER_TASKS)}


async def test_a_host_runs_several_workers_on_one_client_and_leaves_nothing_running(
    provider: RunningProvider,
) -> None:
    seen: dict[str, list[object]] = {"a": [], "b": []}
    stuck_started = trio.Event()

    async def record_a(event: Event, publisher: Publisher) -> None:
        seen["a"].append(event.payload_obj())

    async def record_b(event: Event, publisher: Publisher) -> None:
        seen["b"].append(event.payload_obj())
        if event.payload_obj() == "stuck":
            stuck_started.set()
            await trio.sleep_forever()  # cancelled after the grace period

    workers = [
        Worker("example.a", record_a, retry=FAST),
        Worker(["example.b", "example.c"], record_b, grace_period=0.2, retry=FAST),
    ]
    async with EventsClient(provider.url, provider.token()) as client:
        before = all_tasks()
        host = WorkerHost(client, workers, handle_signals=False)
        async with trio.open_nursery() as nursery:
            readiness = await nursery.start(host.run)
            assert readiness is host.readiness and readiness.is_ready
            assert len(all_tasks() - before) > 3  # the host, 2 workers, 3 streams…
            await client.send("example.a", 1)
            await client.send("example.c", 2)
            await client.send("example.b", "stuck")
            with trio.fail_after(5):
                await stuck_started.wait()
            started = trio.current_time()
            nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - started
        assert all_tasks() == before  # no task left running
        assert not host.readiness.is_ready
    assert elapsed < 20, elapsed  # the grace period, not the stuck handler (asleep for ever)
    assert seen == {"a": [1], "b": [2, "stuck"]}


async def test_sigterm_stops_the_host_cleanly(provider: RunningProvider) -> None:
    async def nothing(event: Event, publisher: Publisher) -> None:
        pass

    async with EventsClient(provider.url, provider.token()) as client:
        host = WorkerHost(client, [Worker("example.a", nothing, retry=FAST)])
        before = all_tasks()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                os.kill(os.getpid(), signal.SIGTERM)
        assert all_tasks() == before
    assert host.stop_signal == signal.SIGTERM


async def test_one_failing_worker_stops_the_host_with_its_error(provider: RunningProvider) -> None:
    async def nothing(event: Event, publisher: Publisher) -> None:
        pass

    async with EventsClient(provider.url, provider.token()) as client:
        before = all_tasks()
        host = WorkerHost(
            client,
            [Worker("example.fine", nothing, retry=FAST), Worker("bus.vm.x", nothing, retry=FAST)],
            handle_signals=False,
        )
        with trio.fail_after(5), pytest.raises(Forbidden):
            await host.run()  # one error, not an ExceptionGroup
        assert all_tasks() == before


async def test_a_host_needs_workers_and_runs_once(provider: RunningProvider) -> None:
    async def nothing(event: Event, publisher: Publisher) -> None:
        pass

    async with EventsClient(provider.url, provider.token()) as client:
        with pytest.raises(ConfigError, match="no workers"):
            await WorkerHost(client, handle_signals=False).run()
        host = WorkerHost(client, handle_signals=False)
        host.add(Worker("example.a", nothing, retry=RetryPolicy(enabled=False)))
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            with pytest.raises(RuntimeError):
                host.add(Worker("example.b", nothing))
            nursery.cancel_scope.cancel()


async def test_run_host_exit_statuses(unused_url: str) -> None:
    """run_host is for a script's main(): run it in a thread, as its own trio.run."""

    async def nothing(event: Event, publisher: Publisher) -> None:
        pass

    worker = Worker("example.a", nothing)
    base = {"BUS_EVENTS_API_URL": unused_url, "BUS_API_TOKEN": "t"}

    def status(env: dict[str, str]) -> int:
        return run_host(worker, env=env, handle_signals=False, configure_logging=False)

    # Required with retrying on waits for the API; with it off, fails fast.
    required = {**base, "BUS_EVENTS_LISTENER_REQUIRED": "1", "BUS_EVENTS_LISTENER_RETRY": "0"}
    with trio.fail_after(10):
        assert await trio.to_thread.run_sync(status, required) == 1  # cannot connect
        assert await trio.to_thread.run_sync(status, {"BUS_API_TOKEN": "t"}) == 2  # no URL
        bad_min = {**base, "BUS_EVENTS_LISTENER_RETRY_MIN": "soon"}
        assert await trio.to_thread.run_sync(status, bad_min) == 2
        retry_off = {**base, "BUS_EVENTS_LISTENER_RETRY": "0"}
        assert await trio.to_thread.run_sync(status, retry_off) == 0  # nothing left to run
