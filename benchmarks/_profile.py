"""Where the listen path spends its time: ``python -m benchmarks._profile TARGET``.

Starts the source server, runs one client under ``py-spy record`` (sampling,
in its own process, no change to the code measured) and sums the samples by
where they land: msgspec decoding, our framing, h11/httpcore/httpx/trio
transfer, the socket syscalls, per-event iteration, output writes, imports.

Targets: ``sdk-iter`` (``async for event in stream``), ``sdk-batches``,
``sdk-raw`` (``raw_batches()``), ``cli`` (``bus-events listen -o /dev/null``),
``cli-pipe`` (``bus-events listen | wc -c``); against the reference provider:
``publish-sdk`` and ``publish-raw`` (the publish rows' workers, 8 concurrent),
``bench`` (``bus-events bench --publishers 8 --listeners 0``) and
``provider-wrk`` (the provider process itself, sampled while the minimal trio
publisher POSTs to it over 8 connections).
Besides the categories, the functions most often on the stack (inclusive) are
listed.  Needs ``py-spy`` (``pip install py-spy``; not a dependency of the project).

``imports-help`` and ``imports-send`` instead sum ``python -X importtime`` of
``bus-events --help`` / ``bus-events send`` by top-level package (no py-spy).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import _workload
from ._procs import ROOT, background, bus_events, child_env, run_worker
from ._source import events_url, prime

__all__ = ["categorize", "main"]

TARGETS = (
    "sdk-iter",
    "sdk-batches",
    "sdk-raw",
    "cli",
    "cli-pipe",
    "publish-sdk",
    "publish-raw",
    "bench",
    "provider-wrk",
    "imports-help",
    "imports-send",
)
_SETUP_CATEGORY = "set-up (imports, SSL context, process start)"

# (category, test on one "function (file:line)" frame); the leaf frame decides,
# except that anything under an import or client construction counts as set-up.
_SETUP = ("<frozen importlib", "create_default_context", "load_verify_locations")
_LEAF_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("msgspec decode_lines (C)", ("NDJSONDecoder._decode ", "NDJSONDecoder._validate ")),
    ("socket syscalls (recv/send/epoll)", ("_nonblocking_helper", "get_events")),
    ("NDJSON framing (busevents/_ndjson.py)", ("busevents/_ndjson.py",)),
    (
        "busevents SDK: iteration, publish (_stream.py, _client.py)",
        ("busevents/_stream.py", "busevents/_client.py"),
    ),
    ("CLI output (busevents/cli)", ("busevents/cli/",)),
    ("h11 (HTTP/1.1 parsing, receive buffer)", ("h11/",)),
    ("httpcore", ("httpcore/",)),
    ("httpx", ("httpx/",)),
    ("trio (scheduler, checkpoints, cancel scopes)", ("trio/",)),
    ("contextlib / async generator glue", ("contextlib.py",)),
    ("caller loop (benchmarks/_run*.py)", ("benchmarks/_run",)),
    ("provider HTTP layer (provider/_h11server.py)", ("busevents/provider/_h11server",)),
    ("provider (busevents/provider)", ("busevents/provider/",)),
    ("hypercorn", ("hypercorn/",)),
    ("PyJWT", ("jwt/",)),
    ("other busevents code (client, responses, retry)", ("busevents/",)),
    ("file writes", ("write", "flush")),
)


_LINE_NUMBER = re.compile(r":\d+\)$")


def categorize(
    folded: Path,
) -> tuple[int, collections.Counter[str], collections.Counter[str], collections.Counter[str]]:
    """Total samples, samples per category, the top leaf frames, and the functions on the
    stack (inclusive: a function counts once per sample it is anywhere in), from py-spy's
    raw output."""
    total = 0
    categories: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaf = frames[-1]
        leaves[leaf] += count
        for function in {_LINE_NUMBER.sub(")", frame) for frame in frames}:
            inclusive[function] += count
        if any(marker in frame for frame in frames for marker in _SETUP):
            categories[_SETUP_CATEGORY] += count
            continue
        for category, markers in _LEAF_RULES:
            if any(marker in leaf for marker in markers):
                categories[category] += count
                break
        else:
            categories["other"] += count
    return total, categories, leaves, inclusive


def imports(args: list[str]) -> tuple[float, collections.Counter[str]]:
    """Total import time of ``bus-events ARGS`` and its self time per top-level package."""
    env = child_env({"BUS_EVENTS_API_URL": "http://127.0.0.1:9", "BUS_API_TOKEN": "x"})
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "busevents", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    per_package: collections.Counter[str] = collections.Counter()
    for line in proc.stderr.decode(errors="replace").splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = (part.strip() for part in line[12:].split("|"))
        per_package[name.split(".")[0]] += int(self_us)
    return sum(per_package.values()) / 1e6, per_package


def _print_imports(target: str, top: int) -> None:
    args = ["--help"] if target == "imports-help" else ["send", "--name", "bench.send"]
    best: tuple[float, collections.Counter[str]] | None = None
    for _ in range(3):  # best of three: the first may read files from disk
        result = imports(args)
        if best is None or result[0] < best[0]:
            best = result
    assert best is not None
    total, per_package = best
    print(f"bus-events {' '.join(args)}: {total * 1000:.0f} ms of imports (best of 3)")
    for name, micros in per_package.most_common(top):
        print(f"  {micros / 1000:7.1f} ms  {micros / 1e6 / total:6.1%}  {name}")


def _command(target: str, port: int, events: int) -> tuple[list[str], dict[str, str]]:
    base = events_url(port, events)
    if target in ("cli", "cli-pipe"):
        argv = [*bus_events(), "listen", "--name", _workload.EVENT_NAME, "--replay", "--no-follow"]
        argv += ["-o", "/dev/null"] if target == "cli" else []
        return argv, {"BUS_EVENTS_API_URL": base, "BUS_API_TOKEN": "bench"}
    mode = target.removeprefix("sdk-")
    params = json.dumps({"url": base, "repeats": 1, "mode": mode})
    return [sys.executable, "-m", "benchmarks._run", "sdk", params], {}


def _provider_command(
    target: str, url: str, token: str, events: int
) -> tuple[list[str], dict[str, str], bytes | None]:
    """The command, its environment, and its stdin (a worker's parameters: a token is
    never put on a command line)."""
    if target == "bench":
        argv = [*bus_events(), "-f", "json", "bench", "--name", "bench.profile"]
        argv += ["--publishers", "8", "--listeners", "0", "--events", str(events)]
        return argv, {"BUS_EVENTS_API_URL": url, "BUS_API_TOKEN": token}, None
    params = {"url": url, "token": token, "count": events, "concurrency": 8, "mode": "reuse"}
    kind = "publish-raw" if target == "publish-raw" else "publish"
    argv = [sys.executable, "-m", "benchmarks._run", kind]
    return argv, {}, json.dumps(params).encode() + b"\n"


def _record(py_spy: str, rate: int, out: Path, target: str, events: int) -> str:
    """Run the target under py-spy, samples into ``out``; return the run's own output."""
    record = [py_spy, "record", "--nonblocking", "-r", str(rate), "-f", "raw", "-o", str(out)]
    if target in ("publish-sdk", "publish-raw", "bench", "provider-wrk"):
        with background([sys.executable, "-m", "benchmarks._provider"]) as (hello, provider):
            url, token = hello["url"], hello["token"]
            if target == "provider-wrk":  # sample the provider while it is loaded
                record += ["--pid", str(provider.pid), "--duration", "10"]
                sampler = subprocess.Popen(record, stdout=subprocess.DEVNULL)
                params = {"url": url, "token": token, "count": events, "concurrency": 8}
                result = run_worker("publish-raw", params, timeout=120)
                sampler.wait(60)
                return json.dumps(result)
            command, env, stdin = _provider_command(target, url, token, events)
            return _run_recorded([*record, "--", *command], env, stdin)
    source = [sys.executable, "-m", "benchmarks._source", "--events", str(events)]
    with background(source) as (hello, _):
        port = int(hello["port"])
        prime(port, events)
        command, env = _command(target, port, events)
        if target == "cli-pipe":  # the CLI's stdout is a pipe into wc -c
            proc = subprocess.Popen(
                [*record, "--", *command], cwd=ROOT, env=child_env(env), stdout=subprocess.PIPE
            )
            counted = subprocess.run(["wc", "-c"], stdin=proc.stdout, capture_output=True)
            proc.wait(600)
            return counted.stdout.decode().strip() + " bytes through the pipe"
        return _run_recorded([*record, "--", *command], env)


def _run_recorded(argv: list[str], env: dict[str, str], stdin: bytes | None = None) -> str:
    proc = subprocess.run(
        argv,
        input=stdin,
        cwd=ROOT,
        env=child_env(env),
        capture_output=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.decode(errors="replace")[-2000:])
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    return lines[-1][:400] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._profile")
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument(
        "--events", type=int, help="events streamed (3,000,000) or published (5,000)"
    )
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=12, help="leaf frames to list")
    args = parser.parse_args(argv)
    if args.target.startswith("imports-"):
        _print_imports(args.target, args.top)
        return 0
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        sys.stderr.write("py-spy is needed: pip install py-spy\n")
        return 2
    publishing = args.target in ("publish-sdk", "publish-raw", "bench", "provider-wrk")
    events = args.events or (5_000 if publishing else 3_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.txt"
        result = _record(py_spy, args.rate, out, args.target, events)
        if not out.exists():
            sys.stderr.write("py-spy wrote no samples\n")
            return 1
        total, categories, leaves, inclusive = categorize(out)
    print(f"{args.target}: {events:,} events, {total} samples at {args.rate}/s")
    if result:
        print(f"result: {result}")
    work = total - categories[_SETUP_CATEGORY]
    print("  of all samples / of the work (set-up excluded):")
    for category, count in categories.most_common():
        share = "" if category == _SETUP_CATEGORY else f"{count / work:6.1%}"
        print(f"  {count / total:6.1%}  {share:>6}  {category}")
    print("top leaf frames:")
    for leaf, count in leaves.most_common(args.top):
        print(f"  {count / total:6.1%}  {leaf}")
    print("functions most often on the stack (inclusive):")
    for function, count in inclusive.most_common(args.top * 2):
        print(f"  {count / total:6.1%}  {function}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
