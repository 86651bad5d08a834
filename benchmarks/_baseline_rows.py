"""The first provider as a baseline (issue 24): commit 1c4b831, before the backends and
the hardening, against today's provider, both under the same wrk, in alternating rounds.

The old provider runs from a temporary ``git worktree`` of that commit (its own
``benchmarks._provider`` with its own ``src`` first on ``PYTHONPATH``), removed
afterwards; nothing of its code is kept elsewhere.  Rows:

* ``provider.base``: its publishes/s (best round), CPU per publish in the note;
* ``provider.vs_base``: today's provider ÷ it, by rate (target ≥ 2) and, in the
  note, by provider CPU per publish (less sensitive to a busy machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._procs import ROOT, background, progress
from ._provider_rows import run_wrk, wrk_or_reason
from ._rows import Options, Row, register

__all__ = ["BASE_COMMIT", "TABLE", "measure"]

BASE_COMMIT = "1c4b831"
TABLE = (
    ("provider.base", "baseline", f"first provider ({BASE_COMMIT}) under wrk, 8 connections"),
    ("provider.vs_base", "baseline", "provider publishes/s / the first provider's"),
)
register(TABLE, {"provider.vs_base": ("provider.base",)})


@contextmanager
def _checkout(commit: str) -> Iterator[Path]:
    """A temporary worktree of ``commit``, removed on exit."""
    with tempfile.TemporaryDirectory(prefix="busevents-base-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(path), commit],
            check=True,
            capture_output=True,
            timeout=120,
        )
        try:
            yield path
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                check=False,
                capture_output=True,
                timeout=120,
            )


def _commit_missing() -> str | None:
    found = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{BASE_COMMIT}^{{commit}}"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if found.returncode != 0:
        return f"commit {BASE_COMMIT} is not in this clone (fetch the full history)"
    return None


def _env(tree: Path) -> Mapping[str, str]:
    """The old tree's packages first, whatever this environment's PYTHONPATH says."""
    return {"PYTHONPATH": f"{tree / 'src'}{os.pathsep}{tree}"}


def _imports_from(tree: Path) -> bool:
    probe = "import busevents.provider, sys; sys.stdout.write(busevents.__file__)"
    env = {**os.environ, **_env(tree)}
    found = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, cwd=tree, timeout=60
    )
    return found.returncode == 0 and found.stdout.decode().startswith(str(tree))


def _sample(figures: dict[str, Any]) -> tuple[float, float] | None:
    if "error" in figures or figures["non_2xx"] or figures["socket_errors"]:
        return None
    requests = max(1, int(figures.get("requests", 0)))
    return float(figures["rate"]), figures["server_cpu_seconds"] / requests * 1e6


def measure(opts: Options, rows: list[str], out: dict[str, Row]) -> None:
    base, ratio = Row.of("provider.base"), Row.of("provider.vs_base", unit="x", target=">= 2")
    out["provider.base"], out["provider.vs_base"] = base, ratio
    reason = wrk_or_reason(opts) or _commit_missing()
    if reason is not None:
        base.skipped = ratio.skipped = reason
        return
    conns, seconds = opts.provider_connections, opts.wrk_seconds
    rounds = 1 if opts.quick else opts.rounds
    samples: dict[str, list[tuple[float, float]]] = {"base": [], "now": []}
    failures: list[str] = []
    with _checkout(BASE_COMMIT) as tree:
        if not _imports_from(tree):
            base.error = ratio.error = f"the provider of {BASE_COMMIT} does not import from {tree}"
            return
        argv = [sys.executable, "-m", "benchmarks._provider"]
        with (
            background(argv, env=_env(tree), cwd=tree) as (old, old_proc),
            background(argv) as (new, new_proc),
        ):
            for index in range(rounds):
                progress(f"provider.base round {index + 1}/{rounds} ({conns} connections)")
                for key, hello, proc in (("base", old, old_proc), ("now", new, new_proc)):
                    figures = run_wrk(hello["url"], hello["token"], [proc.pid], seconds, conns)
                    sample = _sample(figures)
                    if sample is None:
                        failures.append(f"{key}: {figures.get('error') or figures}")
                    else:
                        samples[key].append(sample)
    if not samples["base"] or not samples["now"]:
        base.error = ratio.error = "; ".join(failures)[:300] or "no round ran"
        return
    best_base = max(samples["base"])
    best_now = max(samples["now"])
    base_cpu = min(cpu for _, cpu in samples["base"])
    now_cpu = min(cpu for _, cpu in samples["now"])
    base.value, base.intact = best_base[0], not failures
    base.note = f"provider CPU {base_cpu:,.0f} µs/publish; {conns} connections, 1 wrk thread"
    base.details = {"rounds": samples["base"], "commit": BASE_COMMIT}
    ratio.value = ratio.ratio = best_now[0] / best_base[0]
    ratio.ratio_of = "provider (this tree) / provider.base"
    ratio.intact = not failures
    ratio.details = {"rounds_now": samples["now"], "cpu_ratio": base_cpu / now_cpu}
    ratio.note = (
        f"now {best_now[0]:,.0f}/s vs {best_base[0]:,.0f}/s; CPU per publish "
        f"{now_cpu:,.0f} vs {base_cpu:,.0f} µs = {base_cpu / now_cpu:.2f}x less"
    )
