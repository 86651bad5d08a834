"""Row ``cluster.publish``: publish rate on a 3-master Redis Cluster ÷ on a single Redis.

Both Redis setups are private and started here on loopback, with the same
settings (no persistence): one ``redis-server``, and three ``redis-server
--cluster-enabled yes`` joined by ``redis-cli --cluster create``.  For each, one
``bus-events serve --events-backend redis`` process (``redis+cluster://`` for the
cluster) takes the minimal trio publisher of ``publish.raw`` (8 keep-alive
connections); rounds alternate the two, each keeps its best.  The ratio is
measured in one run; the machine's load is in the report's meta.

One provider process is the bottleneck on a small machine (its CPU, not
Redis): the row shows what the cluster client's slot routing costs a process,
not what a cluster adds in capacity, which needs several processes.

Run alone::

    python -m benchmarks --only cluster
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from ._procs import WorkerError, progress, run_worker
from ._rows import Options, Row
from .backends import _free_port, _servers, _token, _wait_port

__all__ = ["measure_cluster"]

ROW = "cluster.publish"
_START_LIMIT = 45.0


def _redis(directory: Path, port: int, *cluster: str) -> subprocess.Popen[bytes]:
    node = directory / str(port)
    node.mkdir()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(node), *cluster]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cli(port: int, *args: str) -> str:
    argv = ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args]
    return subprocess.run(argv, capture_output=True, timeout=30, check=True).stdout.decode()


@contextmanager
def _redis_setups(directory: Path) -> Iterator[dict[str, str]]:
    """``{"single": addr, "cluster": addr}``: both running until the context ends."""
    with ExitStack() as stack:

        def start(port: int, *cluster: str) -> None:
            proc = _redis(directory, port, *cluster)
            stack.callback(proc.wait, 10)
            stack.callback(proc.kill)

        single, nodes = _free_port(), [_free_port() for _ in range(3)]
        start(single)
        for port in nodes:
            # The bus port is given: the default (port + 10000) may not exist.
            bus = str(_free_port())
            start(port, "--cluster-enabled", "yes", "--cluster-port", bus)
        for port in (single, *nodes):
            _wait_port(port)
        hosts = [f"127.0.0.1:{port}" for port in nodes]
        create = ["redis-cli", "--cluster", "create", *hosts, "--cluster-replicas", "0"]
        subprocess.run([*create, "--cluster-yes"], capture_output=True, timeout=60, check=True)
        deadline = time.monotonic() + _START_LIMIT
        while not all("cluster_state:ok" in _cli(port, "CLUSTER", "INFO") for port in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster was not ready within {_START_LIMIT:g} s")
            time.sleep(0.1)
        yield {"single": f"127.0.0.1:{single}", "cluster": "redis+cluster://" + ",".join(hosts)}


def measure_cluster(opts: Options, out: dict[str, Row]) -> None:
    """Fill row ``cluster.publish`` (skipped without redis-server / redis-cli)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        out[ROW] = Row.of(ROW, skipped="redis-server / redis-cli not installed")
        return
    count, conc = opts.provider_publish_count, opts.provider_connections
    rounds = 1 if opts.quick else opts.rounds
    samples: dict[str, list[dict[str, Any]]] = {"single": [], "cluster": []}
    token = _token()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp,
            _redis_setups(Path(tmp)) as addrs,
            ExitStack() as servers,
        ):
            urls = {}
            for setup, addr in addrs.items():
                env = {"BUS_EVENTS_REDIS_ADDR": addr}
                [(port, _pid)] = servers.enter_context(_servers("redis", 1, env))
                urls[setup] = f"http://127.0.0.1:{port}/api/v1/events"
            for index in range(rounds):
                progress(f"cluster publish round {index + 1}/{rounds} ({count:,} events each)")
                order = ("single", "cluster") if index % 2 == 0 else ("cluster", "single")
                for setup in order:
                    params = {"url": urls[setup], "token": token}
                    params |= {"count": count, "concurrency": conc}
                    samples[setup].append(
                        run_worker("publish-raw", params, timeout=opts.worker_timeout)
                    )
    except (WorkerError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        out[ROW] = Row.of(ROW, error=f"{type(exc).__name__}: {exc}"[:300])
        return
    best = {k: min(v, key=lambda s: s["seconds"]) for k, v in samples.items()}
    rate = {k: s["events"] / s["seconds"] for k, s in best.items()}
    row = out[ROW] = Row.of(ROW, value=rate["cluster"], events=count)
    row.seconds = best["cluster"]["seconds"]
    row.intact = all(s["events"] == count for v in samples.values() for s in v)
    row.ratio, row.ratio_of = rate["cluster"] / rate["single"], "/ single Redis (same run)"
    row.note = f"single Redis {rate['single']:,.0f}/s; one provider process, {conc} connections"
    row.details = {
        "single_per_s": rate["single"],
        "rounds_per_s": {
            k: [round(s["events"] / s["seconds"]) for s in v] for k, v in samples.items()
        },
    }
