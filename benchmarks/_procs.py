"""Child processes of the harness: servers that must not outlive it, workers, timed commands.

Every child is started here and ended here: servers are stopped in ``finally``
(stdin closed, then SIGTERM, then SIGKILL), workers and timed commands run
with a timeout that kills them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

__all__ = [
    "ROOT",
    "WorkerError",
    "background",
    "bus_events",
    "child_env",
    "exit_when_stdin_closes",
    "finish_worker",
    "missing_modules",
    "progress",
    "run_worker",
    "started_worker",
    "stop",
    "timed",
    "timed_pipeline",
]

#: The repository root: ``python -m benchmarks…`` runs from here.
ROOT = Path(__file__).resolve().parents[1]


class WorkerError(RuntimeError):
    """A child failed: exit status, timeout, or output that is not the expected JSON."""


_T0 = time.perf_counter()


def progress(message: str) -> None:
    """One line on stderr: what the harness is doing, and since when."""
    sys.stderr.write(f"[bench {time.perf_counter() - _T0:6.1f} s] {message}\n")
    sys.stderr.flush()


def bus_events() -> list[str]:
    """The ``bus-events`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("bus-events")
    return [str(script)] if script.exists() else [sys.executable, "-m", "busevents"]


def missing_modules(*names: str) -> str | None:
    """Why a row cannot run (modules not installed), or None when all are there."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    return f"needs {', '.join(missing)} (pip install -e '.[bench]')" if missing else None


def exit_when_stdin_closes() -> None:
    """In a server child (run it in a daemon thread): exit when the harness's pipe closes."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of children: ours, with this repository importable, no BUS_* leaks.

    Bytecode caching is left on (as on a user's machine) even where this
    environment turns it off, so start-up rows do not measure compiling.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    env.setdefault("PYTHONHASHSEED", "0")
    if extra:
        env.update(extra)
    return env


def _readline(stream: IO[bytes], timeout: float) -> bytes:
    """One line from a child's pipe, or WorkerError after ``timeout`` seconds."""
    box: list[bytes] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box:
        raise WorkerError(f"no line from the child within {timeout:g} s")
    return box[0]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop ``proc`` for good: close its stdin, then SIGTERM, then SIGKILL."""
    if proc.stdin is not None:
        with suppress(OSError):
            proc.stdin.close()
    for signal_it, wait in ((None, 2.0), (proc.terminate, 3.0), (proc.kill, 5.0)):
        if signal_it is not None:
            signal_it()
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@contextmanager
def background(
    argv: Sequence[str],
    *,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
) -> Iterator[tuple[dict[str, Any], subprocess.Popen[bytes]]]:
    """Start a server child; yield the JSON object of its first stdout line, and the process.

    The child must exit when its stdin closes; it is killed otherwise.  ``env`` is
    added to :func:`child_env`'s (a ``PYTHONPATH`` there replaces this tree's).
    """
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=cwd,
        env=child_env(env),
    )
    try:
        line = _readline(proc.stdout, timeout)  # type: ignore[arg-type]
        if not line:
            raise WorkerError(f"{argv[2] if len(argv) > 2 else argv[0]} exited before it started")
        yield json.loads(line), proc
    finally:
        stop(proc)


def run_worker(kind: str, params: Mapping[str, Any], *, timeout: float) -> dict[str, Any]:
    """Run ``python -m benchmarks._run KIND PARAMS`` to its end; return its JSON result."""
    argv = [sys.executable, "-m", "benchmarks._run", kind]
    try:
        proc = subprocess.run(
            argv,
            input=_params_line(params),
            capture_output=True,
            cwd=ROOT,
            env=child_env(),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise WorkerError(f"{kind}: no result within {timeout:g} s (killed)") from None
    return _result(kind, proc.returncode, proc.stdout, proc.stderr)


def _params_line(params: Mapping[str, Any]) -> bytes:
    """A worker's parameters go on its stdin, never its command line (they may hold a token)."""
    return json.dumps(dict(params)).encode() + b"\n"


def _result(kind: str, status: int | None, out: bytes, err: bytes) -> dict[str, Any]:
    """A worker's JSON result (its last stdout line), or WorkerError with its stderr's tail."""
    if status != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise WorkerError(f"{kind}: exit status {status}: {' | '.join(tail)}")
    try:
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise WorkerError(f"{kind}: no JSON result on stdout") from None
    return result


@contextmanager
def started_worker(
    kind: str, params: Mapping[str, Any], *, timeout: float
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a worker that signals readiness with a first stdout line; wait for that line."""
    argv = [sys.executable, "-m", "benchmarks._run", kind]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=child_env(),
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(_params_line(params))
        proc.stdin.close()
        proc.stdin = None  # so that communicate() does not flush it again
        line = _readline(proc.stdout, timeout)  # type: ignore[arg-type]
        if line.strip() != b"ready":
            raise WorkerError(f"{kind}: did not get ready: {line[:200]!r}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def finish_worker(proc: subprocess.Popen[bytes], kind: str, *, timeout: float) -> dict[str, Any]:
    """Wait for a worker started by :func:`started_worker`; return its JSON result."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise WorkerError(f"{kind}: no result within {timeout:g} s (killed)") from None
    return _result(kind, proc.returncode, out, err)


def _children_cpu() -> float:
    """CPU seconds (user + system) of all children waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    stdout: int | IO[bytes] = subprocess.DEVNULL,
) -> tuple[float, subprocess.CompletedProcess[bytes], float]:
    """Wall time of running ``argv`` to its end (spawn to exit), its outcome, its CPU time."""
    cpu = _children_cpu()
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=child_env(env),
            cwd=ROOT,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise WorkerError(f"{argv[0]}: did not finish within {timeout:g} s (killed)") from None
    return time.perf_counter() - start, proc, _children_cpu() - cpu


def timed_pipeline(
    first: Sequence[str],
    second: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
    keep_output: bool = False,
) -> tuple[float, float, int, int, bytes, bytes]:
    """``first | second``: wall time, CPU time of both, both exit statuses, ``first``'s
    stderr and ``second``'s stdout (only with ``keep_output``, for a short one like
    ``wc -c``; else it goes to /dev/null)."""
    cpu = _children_cpu()
    start = time.perf_counter()
    producer = subprocess.Popen(
        list(first),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(env),
        cwd=ROOT,
    )
    consumer: subprocess.Popen[bytes] | None = None
    try:
        consumer = subprocess.Popen(
            list(second),
            stdin=producer.stdout,
            stdout=subprocess.PIPE if keep_output else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert producer.stdout is not None
        producer.stdout.close()  # the consumer holds the read end now
        deadline = start + timeout
        _, err = producer.communicate(timeout=max(0.1, deadline - time.perf_counter()))
        out, _ = consumer.communicate(timeout=max(0.1, deadline - time.perf_counter()))
        seconds = time.perf_counter() - start
        status = producer.returncode, consumer.returncode
        return seconds, _children_cpu() - cpu, *status, err, out or b""
    except subprocess.TimeoutExpired:
        raise WorkerError(f"{first[0]} | {second[0]}: timed out (killed)") from None
    finally:
        for proc in (producer, consumer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
