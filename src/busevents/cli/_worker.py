"""``worker``: run the ``Worker`` declarations of Python modules in one worker host."""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import sys
import traceback
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Literal

from cyclopts import Parameter

from ._base import Duration, UsageError, app, current

if TYPE_CHECKING:
    from busevents import Worker

_WHAT = "a Worker, a list of Workers, or a function returning them"
_EXAMPLE = "e.g. bus-events worker echo_worker:worker"


@app.command(usage="Usage: bus-events worker [OPTIONS] MODULE:ATTR [MODULE:ATTR ...]")
def worker(
    *targets: Annotated[
        str,
        Parameter(
            name="MODULE:ATTR",
            help=f"Where the workers are: {_WHAT} (repeatable, one host runs them all).",
        ),
    ],
    health_addr: Annotated[
        str | None,
        Parameter(
            help="Serve /healthz, /readyz and /metrics on HOST:PORT (the health extra). "
            "[env: BUS_EVENTS_HEALTH_ADDR; default: off]"
        ),
    ] = None,
    log_format: Annotated[
        Literal["text", "json"] | None,
        Parameter(help="Log lines on stderr. [env: BUS_EVENTS_LOG_FORMAT; default: text]"),
    ] = None,
    concurrency: Annotated[
        int | None,
        Parameter(help="Handlers in flight at most, per worker. [default: each Worker's own]"),
    ] = None,
    grace_period: Annotated[
        Duration | None,
        Parameter(
            help="How long in-flight handlers may finish after SIGTERM. "
            "[default: each Worker's own]"
        ),
    ] = None,
    retry: Annotated[
        bool | None,
        Parameter(
            show_default=False,
            help="Reconnect a stream that ended or failed, with backoff. "
            "[env: BUS_EVENTS_LISTENER_RETRY; default: on]",
        ),
    ] = None,
    retry_min: Annotated[
        Duration | None,
        Parameter(help="Shortest reconnect delay. [env: BUS_EVENTS_LISTENER_RETRY_MIN; 1s]"),
    ] = None,
    retry_max: Annotated[
        Duration | None,
        Parameter(help="Longest reconnect delay. [env: BUS_EVENTS_LISTENER_RETRY_MAX; 30s]"),
    ] = None,
    required: Annotated[
        bool | None,
        Parameter(
            show_default=False,
            help="With --no-retry: exit 1 when a stream cannot connect or ends; with "
            "retrying: wait for the API, not ready meanwhile. "
            "[env: BUS_EVENTS_LISTENER_REQUIRED; default: off]",
        ),
    ] = None,
) -> int:
    """Run workers from Python modules in one host until SIGTERM.

    Each MODULE:ATTR names a Worker, a list of Workers or a function that
    returns them (imported from the current directory or the Python path);
    all run in one host sharing one client.  SIGINT/SIGTERM stop it: /readyz
    turns 503, in-flight handlers get their grace period, then exit 0; 1 when a
    worker failed, 2 for configuration errors.  Logs go to stderr at INFO
    (the global -v and -q do not apply).  See docs/operations-workers.md.

    Example: bus-events worker echo_worker:worker --health-addr 127.0.0.1:9464
    """
    from busevents import ConfigError, run_host

    if not targets:
        raise UsageError(f"worker needs at least one MODULE:ATTR, {_EXAMPLE}")
    g = current()
    if concurrency is not None and concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, not {concurrency}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a module beside you, as `python -m` finds it
    workers: list[Worker] = []
    for target in targets:
        for found in _resolve(target):
            if not any(found is w for w in workers):  # named twice: run once
                workers.append(found)
    try:
        if concurrency is not None:
            workers = [replace(w, concurrency=concurrency) for w in workers]
        if grace_period is not None:
            workers = [replace(w, grace_period=float(grace_period)) for w in workers]
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    env = dict(os.environ)
    for variable, value in (
        ("BUS_EVENTS_LISTENER_RETRY", None if retry is None else str(int(retry))),
        ("BUS_EVENTS_LISTENER_REQUIRED", None if required is None else str(int(required))),
        ("BUS_EVENTS_LISTENER_RETRY_MIN", None if retry_min is None else str(retry_min)),
        ("BUS_EVENTS_LISTENER_RETRY_MAX", None if retry_max is None else str(retry_max)),
    ):
        if value is not None:
            env[variable] = value
    # The host logs in its own format (text or JSON lines), not the CLI's.
    logging.getLogger().handlers.clear()
    return run_host(
        *workers,
        api_url=g.api_url,
        token_file=g.token_file,
        env=env,
        health_addr=health_addr,
        log_format=log_format,
    )


def _resolve(target: str) -> list[Worker]:
    """The workers ``MODULE:ATTR`` names; :class:`UsageError` saying what is wrong."""
    module_name, sep, attr = target.partition(":")
    if not sep or not _dotted(module_name) or not _dotted(attr):
        raise UsageError(f"{target!r} is not MODULE:ATTR ({_WHAT}), {_EXAMPLE}")
    module = _import(target, module_name)
    value: object = module
    for depth, part in enumerate(attr.split(".")):
        try:
            value = getattr(value, part)
        except AttributeError:
            where = ".".join([module_name, *attr.split(".")[:depth]])
            hint = _near(value, part)
            raise UsageError(f"{target}: {where!r} has no attribute {part!r}{hint}") from None
        except Exception as exc:
            raise UsageError(f"{target}: reading {part!r} failed: {_describe(exc)}") from None
    return _workers_of(target, value, call=True)


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _import(target: str, module_name: str) -> object:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise UsageError(
                f"{target}: no module named {missing!r} in {os.getcwd()} or on the Python "
                "path; run from the directory that holds it, pass -C DIR, or set PYTHONPATH"
            ) from None
        raise UsageError(
            f"{target}: importing {module_name!r} failed: it imports {missing!r}, "
            "which is not installed"
        ) from None
    except SyntaxError as exc:
        raise UsageError(
            f"{target}: {exc.filename}:{exc.lineno}: syntax error: {exc.msg}"
        ) from None
    except SystemExit as exc:
        raise UsageError(
            f"{target}: importing {module_name!r} exited (status {exc.code}); keep what "
            "runs the module as a script under `if __name__ == '__main__':`"
        ) from None
    except Exception as exc:
        raise UsageError(
            f"{target}: importing {module_name!r} failed{_where(exc)}: {_describe(exc)}"
        ) from None


def _workers_of(target: str, value: object, *, call: bool) -> list[Worker]:
    from busevents import Worker

    if isinstance(value, Worker):
        return [value]
    if isinstance(value, list | tuple):
        strays = [type(v).__name__ for v in value if not isinstance(v, Worker)]
        if strays:
            raise UsageError(f"{target}: holds a {strays[0]}, not only Workers")
        if not value:
            raise UsageError(f"{target}: the list is empty; it needs at least one Worker")
        return list(value)
    if call and callable(value) and not isinstance(value, type):
        if inspect.iscoroutinefunction(value):
            raise UsageError(f"{target}: an async function; a factory must be a plain function")
        try:
            inspect.signature(value).bind()
        except TypeError:
            raise UsageError(
                f"{target}: a factory is called without arguments; it needs some"
            ) from None
        except ValueError:
            pass  # no signature to check (a builtin): let the call say
        try:
            produced = value()
        except Exception as exc:
            raise UsageError(f"{target}(): failed{_where(exc)}: {_describe(exc)}") from None
        return _workers_of(f"{target}()", produced, call=False)
    kind = "None" if value is None else f"a {type(value).__name__}"
    raise UsageError(f"{target}: is {kind}, not {_WHAT}")


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _where(exc: BaseException) -> str:
    """`` at FILE:LINE``: the innermost frame of the user's code that raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "importlib" not in f.filename]
    return f" at {own[-1].filename}:{own[-1].lineno}" if own else ""


def _near(value: object, name: str) -> str:
    """A hint: a close attribute name, else the Workers that are there."""
    from busevents import Worker

    names = [n for n in dir(value) if not n.startswith("_")]
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    found = [n for n in names if isinstance(getattr(value, n, None), Worker)]
    return f" (Workers there: {', '.join(found)})" if found else ""
