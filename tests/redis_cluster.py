"""A private 3-master Redis Cluster on loopback, for tests (tests/services.py style).

Three ``redis-server --cluster-enabled yes`` on free ports in the test's
directory, joined with ``redis-cli --cluster create … --cluster-replicas 0``;
ready when every node reports ``cluster_state:ok``.  Stopped when the test ends.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from .services import _unavailable, free_port, wait_port

#: Starting and joining three nodes takes about a second; never more than this.
START_LIMIT = 45.0


class PrivateCluster:
    """The nodes' ports and the ``redis+cluster://`` address naming all of them."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.addr = "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports)

    async def cli(self, port: int, *args: str) -> str:
        """``redis-cli -p port args…`` on one node; its output."""
        done = await trio.run_process(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_stdout=True
        )
        return bytes(done.stdout).decode()

    async def keys(self, pattern: str) -> dict[int, list[str]]:
        """The keys matching ``pattern`` on each node (by port)."""
        found = {}
        for port in self.ports:
            found[port] = (await self.cli(port, "--scan", "--pattern", pattern)).split()
        return found


async def _node(directory: Path, port: int) -> trio.Process:
    node_dir = directory / f"node-{port}"
    node_dir.mkdir()
    process = await trio.lowlevel.open_process(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{port}.conf",
            # The bus port is given: the default (port + 10000) may not exist.
            "--cluster-port",
            str(free_port()),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(node_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process


@asynccontextmanager
async def private_cluster(directory: Path) -> AsyncIterator[PrivateCluster]:
    """A running 3-master cluster; skipped (failed under CI) without ``redis-server``."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        _unavailable("redis-server / redis-cli are not installed")
    ports = [free_port() for _ in range(3)]
    async with AsyncExitStack() as stack:
        for port in ports:
            process = await _node(directory, port)
            stack.push_async_callback(_stop, process)
        cluster = PrivateCluster(ports)
        with trio.fail_after(START_LIMIT):
            for port in ports:
                await wait_port(port)
            await trio.run_process(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{port}" for port in ports),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                capture_stdout=True,
                capture_stderr=True,
            )
            for port in ports:
                # Waiting on the cluster's own state (gossip settles within a second).
                while "cluster_state:ok" not in await cluster.cli(port, "CLUSTER", "INFO"):  # noqa: ASYNC110
                    await trio.sleep(0.1)
        yield cluster


async def _stop(process: trio.Process) -> None:
    process.kill()
    await process.wait()
