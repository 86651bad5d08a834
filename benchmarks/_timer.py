"""Timing inside a worker process: wall and CPU time of a section, and a cross-process clock."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["Timer", "now_ns"]


def now_ns() -> int:
    """A clock shared by all processes of this machine (latency across processes)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class Timer:
    """Wall and CPU time (this process, all threads) of each timed section."""

    def __init__(self) -> None:
        self.walls: list[float] = []
        self.cpus: list[float] = []

    def __enter__(self) -> Timer:
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.walls.append(time.perf_counter() - self._wall)
        self.cpus.append(time.process_time() - self._cpu)

    def best(self) -> dict[str, Any]:
        """The best wall time and the best CPU time (of possibly different repetitions)."""
        return {
            "seconds": min(self.walls),
            "cpu": min(self.cpus),
            "times": [round(t, 6) for t in self.walls],
        }
