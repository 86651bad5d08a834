"""One meaningful exception out of a nursery's exception group.

Structured concurrency wraps what tasks raise in (nested) exception groups;
callers of busevents should see one error they can act on, never a group and
never trio's internals.  Both helpers here use ``BaseExceptionGroup.split``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio

__all__ = ["first_error", "single_error"]


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The error that matters in ``group``, or None when it holds only cancellations.

    A ``KeyboardInterrupt`` or ``SystemExit`` wins; otherwise the first error.
    """
    _, rest = group.split(trio.Cancelled)
    if rest is None:
        return None
    leaves = list(_leaves(rest))
    return next((e for e in leaves if not isinstance(e, Exception)), leaves[0])


@contextmanager
def single_error() -> Iterator[None]:
    """Let one meaningful exception out of nested nurseries, not an ExceptionGroup.

    Cancellations are left to trio (a group of only ``trio.Cancelled`` is
    re-raised as it is); of the other exceptions, a ``KeyboardInterrupt`` or
    ``SystemExit`` wins, else the first one.  Structured concurrency cancels the
    siblings of a failing task, so there is nearly always exactly one::

        with single_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_worker, client, worker)
    """
    try:
        yield
    except BaseExceptionGroup as group:
        chosen = first_error(group)
        if chosen is None:
            raise
        raise chosen from chosen.__cause__
