"""The redis backend on a Redis Cluster: a private 3-master cluster on loopback.

Two `serve` processes, one given ``redis+cluster://`` with every node, one given
one node and ``--redis-cluster``, act as one provider: publish, follow, replay,
a unicast group shared by both, idempotent retries; each name's stream sits on
its own slot, so the names spread over the masters.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from busevents.provider import INTERNAL_AUDIENCE

from .helpers import serve_subprocess
from .redis_cluster import private_cluster
from .services import free_port
from .test_provider_multi import WAIT, Reader, auth, base_env, publish, replay, wait_for


async def test_two_processes_on_a_redis_cluster_act_as_one_provider(tmp_path: Path) -> None:
    async with private_cluster(tmp_path) as cluster:
        with_scheme, with_flag = base_env(), base_env()
        with_scheme["BUS_EVENTS_REDIS_ADDR"] = cluster.addr
        with_flag["BUS_EVENTS_REDIS_ADDR"] = f"127.0.0.1:{cluster.ports[1]}"
        async with (
            serve_subprocess(with_scheme, "--events-backend", "redis") as (a, _pa),
            serve_subprocess(with_flag, "--events-backend", "redis", "--redis-cluster") as (b, _pb),
            httpx.AsyncClient(timeout=WAIT) as http,
        ):
            follower, c1, c2 = Reader(), Reader(), Reader()
            unicast = {"name": "example.jobs", "delivery": "unicast", "group": "g"}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: follower.run(
                        http, b, auth("svc", INTERNAL_AUDIENCE), name="example.live"
                    )
                )
                nursery.start_soon(lambda: c1.run(http, a, auth("alice"), consumer="c1", **unicast))
                nursery.start_soon(lambda: c2.run(http, b, auth("alice"), consumer="c2", **unicast))
                for reader in (follower, c1, c2):
                    await reader.ready.wait()
                await trio.sleep(0.5)  # every stream is reading before the first event
                for n in range(10):
                    await publish(http, (a, b)[n % 2], "alice", "example.live", n)
                sent = 0
                # On until both consumers had one (which one wins is up to scheduling).
                while sent < 20 or not (c1.payloads and c2.payloads):
                    assert sent < 400, "one consumer of the group never got an event"
                    await publish(http, (a, b)[sent % 2], "alice", "example.jobs", sent)
                    sent += 1
                await wait_for(lambda: len(follower.payloads) == 10)
                await wait_for(lambda: len(c1.payloads) + len(c2.payloads) >= sent)
                nursery.cancel_scope.cancel()
            assert follower.payloads == list(range(10))
            assert sorted(c1.payloads + c2.payloads) == list(range(sent))

            names = [f"example.n{i}" for i in range(12)]
            for i, name in enumerate(names):
                await publish(http, a, "alice", name, i)
            for i, name in enumerate(names):
                assert await replay(http, b, name) == [i]
            assert await replay(http, a, "example.live") == list(range(10))
            # One stream per name, each on the slot of its name: spread over the masters.
            streams = await cluster.keys("bus-events:s:*")
            assert sum(len(keys) for keys in streams.values()) == len(names) + 2
            assert sum(1 for keys in streams.values() if keys) >= 2, streams

            headers = {**auth("alice"), "Idempotency-Key": "cluster-1"}
            body = {"name": "example.once", "payload": 1}
            first = await http.post(a, json=body, headers=headers)
            again = await http.post(b, json=body, headers=headers)
            assert first.status_code == again.status_code == 202
            assert again.headers["idempotent-replayed"] == "true"
            assert again.content == first.content
            assert await replay(http, a, "example.once") == [1]


async def test_a_bad_or_unreachable_cluster_is_one_line_without_the_password(run_cli) -> None:
    env = {"BUS_API_JWT_SECRET": "cluster-secret-0123456789"}
    serve = ("serve", "--events-backend", "redis", "--addr", "127.0.0.1:0")
    bad = {**env, "BUS_EVENTS_REDIS_ADDR": "redis+cluster://:hunter2@127.0.0.1:7000,127.0.0.1:x"}
    result = await run_cli(*serve, env=bad)
    assert result.status == 2, result.stderr
    assert "'127.0.0.1:x': expected HOST:PORT" in result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr
    closed = f"127.0.0.1:{free_port()}"
    gone = {**env, "BUS_EVENTS_REDIS_ADDR": closed, "BUS_EVENTS_REDIS_PASSWORD": "hunter2"}
    result = await run_cli(*serve, "--redis-cluster", env=gone)
    assert result.status == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"Redis at cluster {closed} is unavailable" in result.stderr
    assert "hunter2" not in result.stderr
