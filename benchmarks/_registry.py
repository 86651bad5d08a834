"""Row modules beyond the core table (issues 20 and 24, and other helpers' rows).

Each module listed in :data:`MODULES` registers its rows on import with
:func:`benchmarks._rows.register` and defines ``measure(opts, rows, out)``,
which the harness calls (after the core phases) when one of its rows is
selected.  Adding a module is this one line.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MODULES", "load"]

MODULES: tuple[str, ...] = (
    "benchmarks._baseline_rows",
    "benchmarks._workers_rows",
)


def load() -> list[ModuleType]:
    """Import every row module (registering its rows); return them in order."""
    return [importlib.import_module(name) for name in MODULES]
