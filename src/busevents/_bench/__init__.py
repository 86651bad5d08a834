"""The engine of ``bus-events bench``: load-test an Events API deployment.

A leaf over the SDK, imported only by the CLI: publishers and listeners
(:mod:`._node`), optionally spread over worker processes (:mod:`._procs`),
latency histograms (:mod:`._stats`) and the report (:mod:`._report`).
"""

from ._engine import Bench as Bench
from ._engine import BenchPlan as BenchPlan
from ._engine import BenchReport as BenchReport
from ._engine import check_plan as check_plan
from ._report import Latency as Latency

__all__ = ["Bench", "BenchPlan", "BenchReport", "Latency", "check_plan"]
