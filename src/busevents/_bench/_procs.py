"""Worker processes of ``bus-events bench --processes K``: for when one core is the limit.

The parent (:class:`Workers`) starts K children running
``python -m busevents._bench._procs`` and talks to each over its stdin and
stdout, one JSON message per line (the token travels there, never in argv)::

    parent → child   setup (plan, part, url, token) · go (wall-clock start) · stop
    child → parent   ready (streams open) · progress (every 0.2 s) · published
                     · result (its PartResult) | failure (the error that ended it)

Every child opens its listeners and says ``ready``; only when all are ready
does the parent send ``go`` with a start time a moment ahead, so publishing
starts together everywhere.  The parent decides when delivery is complete and
sends ``stop``; it also sends ``stop`` when it is cancelled (Ctrl-C) and
collects the partial results.  Children ignore SIGINT (the terminal sends it
to the whole process group; the parent's ``stop`` is what ends them), stop
when their stdin closes (the parent died), and are killed if they do not end
within a few seconds of ``stop``.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import msgspec
import trio

from .._client import EventsClient
from .._config import Token
from .._contracts import Delivery
from .._errors import (
    APIError,
    BusEventsError,
    ConfigError,
    Forbidden,
    ServerError,
    TransportError,
    bounded_text,
)
from .._groups import first_error
from ._engine import drain
from ._node import Node, Progress
from ._report import BenchPlan, PartResult

if TYPE_CHECKING:
    from ._engine import Bench

__all__ = ["Workers", "main"]

#: How long after ``stop`` a child may take to hand back its result.
_STOP_GRACE: Final = 10.0
#: How far ahead of ``go`` publishing starts (every child must have the message by then).
_GO_AHEAD: Final = 0.2


class _Setup(msgspec.Struct, tag="setup", kw_only=True):
    plan: BenchPlan
    run_id: str
    part: int
    parts: int
    url: str
    token: str | None
    timeout: float


class _Go(msgspec.Struct, tag="go"):
    start_ns: int


class _Stop(msgspec.Struct, tag="stop"):
    pass


class _Ready(msgspec.Struct, tag="ready"):
    pass


class _Progress(msgspec.Struct, tag="progress"):
    progress: Progress


class _Published(msgspec.Struct, tag="published"):
    accepted: int


class _Result(msgspec.Struct, tag="result"):
    result: PartResult


class _Failure(msgspec.Struct, tag="failure", kw_only=True):
    """An error that ended a child, enough to raise the same kind in the parent."""

    kind: str
    message: str
    status: int | None = None
    code: str | None = None
    url: str = ""
    required_scopes: list[str] = msgspec.field(default_factory=list)

    @classmethod
    def of(cls, error: BusEventsError) -> _Failure:
        if isinstance(error, APIError):
            return cls(
                kind="api",
                message=error.message,
                status=error.status,
                code=error.code,
                url=error.url,
                required_scopes=list(getattr(error, "required_scopes", ())),
            )
        kind = "config" if isinstance(error, ConfigError) else "transport"
        return cls(kind=kind, message=str(error), url=getattr(error, "url", ""))

    def error(self, part: int) -> BusEventsError:
        if self.status is not None:
            from .._responses import STATUS_ERRORS

            if self.status == 403:
                return Forbidden(
                    403,
                    self.code,
                    self.message,
                    url=self.url,
                    required_scopes=tuple(self.required_scopes),
                )
            cls = STATUS_ERRORS.get(self.status) or (
                ServerError if self.status >= 500 else APIError
            )
            return cls(self.status, self.code, self.message, url=self.url)
        if self.kind == "config":
            return ConfigError(self.message)
        return TransportError(f"bench worker {part}: {self.message}", url=self.url)


_ToChild = _Setup | _Go | _Stop
_ToParent = _Ready | _Progress | _Published | _Result | _Failure
_encode = msgspec.json.Encoder().encode


class _Child:
    """One worker process as the parent sees it."""

    def __init__(self, part: int, process: trio.Process) -> None:
        self.part = part
        self.process = process
        self.ready = False
        self.published: int | None = None
        self.progress = Progress()
        self.result: PartResult | None = None
        self._buffer = bytearray()
        self._decode = msgspec.json.Decoder(_ToParent).decode

    async def send(self, message: _ToChild) -> None:
        assert self.process.stdin is not None
        # A child that has ended cannot be told; its exit status or missing result says why.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.process.stdin.send_all(_encode(message) + b"\n")

    async def receive(self) -> _ToParent | None:
        """The next message, or None at the end of its output."""
        stdout = self.process.stdout
        assert stdout is not None
        while (end := self._buffer.find(b"\n")) < 0:
            chunk = await stdout.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        try:
            return self._decode(line)
        except msgspec.MsgspecError:
            raise BusEventsError(
                f"bench worker {self.part} wrote something that is not a bench message: "
                + bounded_text(line, 120)
            ) from None


class Workers:
    """The worker processes of one :class:`~busevents._bench.Bench` run."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.plan = bench.plan
        self._children: list[_Child] = []
        self._phase = "opening"
        self._changed = trio.Event()

    def progress(self) -> Progress:
        """The children's latest progress, added up."""
        reports = [child.progress for child in self._children]
        unicast = self.plan.delivery is Delivery.UNICAST
        receivers = [n for p in reports for n in p.receivers]
        ended = sum(p.ended for p in reports)
        if unicast:
            receivers = [sum(receivers)] if self.plan.listeners else []
            ended = int(bool(reports) and all(p.ended for p in reports if p.receivers))
        return Progress(
            phase=self._phase,
            sent=sum(p.sent for p in reports),
            errors=sum(p.errors for p in reports),
            received=sum(p.received for p in reports),
            receivers=receivers,
            ended=ended,
            in_doubt=sum(p.in_doubt for p in reports),
            last_receive_ns=max((p.last_receive_ns for p in reports), default=0),
        )

    def results(self) -> list[PartResult]:
        """The results handed back so far (all of them after a complete run)."""
        return [child.result for child in self._children if child.result is not None]

    async def run(self) -> list[PartResult]:
        """Start the children, run the bench on them, return their results."""
        try:
            async with trio.open_nursery() as nursery:
                await self._start(nursery)
                await self._until(lambda c: c.ready)
                start_ns = time.time_ns() + int(_GO_AHEAD * 1e9)
                for child in self._children:
                    await child.send(_Go(start_ns))
                self._phase = "warmup" if self.plan.warmup else "measuring"
                await self._until(lambda c: c.published is not None)
                self._phase = "draining"
                expected = sum(child.published or 0 for child in self._children)
                await drain(self.progress, expected)
                for child in self._children:
                    await child.send(_Stop())
                # The readers end with each child's result; a child that hangs must not.
                nursery.cancel_scope.deadline = trio.current_time() + _STOP_GRACE
        finally:
            with trio.CancelScope(shield=True):
                await self._shut_down()
        late = [child.part for child in self._children if child.result is None]
        if late:
            raise BusEventsError(
                f"bench worker(s) {', '.join(map(str, late))} did not hand back their "
                f"results within {_STOP_GRACE:g} s of being stopped"
            )
        self._phase = "done"
        return self.results()

    async def _start(self, nursery: trio.Nursery) -> None:
        bench = self.bench
        token = bench.token.value if isinstance(bench.token, Token) else bench.token
        for part in range(self.plan.processes):
            try:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "busevents._bench._procs"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            except OSError as exc:
                raise BusEventsError(f"cannot start a bench worker process: {exc}") from exc
            child = _Child(part, process)
            self._children.append(child)
            await child.send(
                _Setup(
                    plan=self.plan,
                    run_id=bench.run_id,
                    part=part,
                    parts=self.plan.processes,
                    url=bench.url,
                    token=token,
                    timeout=bench.timeout,
                )
            )
            nursery.start_soon(self._follow, child)

    async def _until(self, done: Callable[[_Child], bool]) -> None:
        while not all(done(child) for child in self._children):
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _follow(self, child: _Child) -> None:
        """Read one child's messages until its result; raise its failure."""
        while child.result is None:
            message = await child.receive()
            if message is None:
                status = await child.process.wait()
                raise BusEventsError(
                    f"bench worker {child.part} ended (exit status {status}) before "
                    "handing back its result; see its error above"
                )
            if isinstance(message, _Progress):
                child.progress = message.progress
            elif isinstance(message, _Ready):
                child.ready = True
            elif isinstance(message, _Published):
                child.published = message.accepted
            elif isinstance(message, _Result):
                child.result = message.result
            elif isinstance(message, _Failure):
                raise message.error(child.part)
            self._notify()

    async def _shut_down(self) -> None:
        """Stop every child still running, collect what results come, then reap them."""
        running = [c for c in self._children if c.result is None and c.process.returncode is None]
        with trio.move_on_after(_STOP_GRACE):
            for child in running:
                await child.send(_Stop())

            async def collect(child: _Child) -> None:
                # The error that ended the run, if any, is already on its way up.
                with contextlib.suppress(BusEventsError):
                    await self._follow(child)

            async with trio.open_nursery() as nursery:
                for child in running:
                    nursery.start_soon(collect, child)
            for child in self._children:
                await child.process.wait()
        for child in self._children:
            if child.process.returncode is None:
                child.process.kill()
                await child.process.wait()


# -- the child side --------------------------------------------------------------


class _Inbox:
    """Messages from the parent on stdin, read in a thread (portable, cancellable)."""

    def __init__(self) -> None:
        self._decode = msgspec.json.Decoder(_ToChild).decode

    async def next(self) -> _ToChild | None:
        line: bytes = await trio.to_thread.run_sync(
            sys.stdin.buffer.readline, abandon_on_cancel=True
        )
        return self._decode(line) if line.strip() else None


def _emit(message: _ToParent) -> None:
    sys.stdout.buffer.write(_encode(message) + b"\n")
    sys.stdout.buffer.flush()


async def _child() -> int:
    inbox = _Inbox()
    setup = await inbox.next()
    if not isinstance(setup, _Setup):
        return 2
    node = Node(setup.plan, setup.run_id, setup.part, setup.parts)
    go: list[int] = []
    go_event = trio.Event()
    run_scope = trio.CancelScope()

    async def control() -> None:
        while True:
            message = await inbox.next()
            if isinstance(message, _Go):
                go.append(message.start_ns)
                go_event.set()
            elif message is None or isinstance(message, _Stop):
                run_scope.cancel()
                return

    async def report_progress() -> None:
        while True:
            _emit(_Progress(node.progress()))
            await trio.sleep(0.2)

    try:
        async with (
            EventsClient(
                setup.url,
                setup.token,
                timeout=setup.timeout,
                max_connections=len(node.publishers) + len(node.listeners) + 1,
            ) as client,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(control)
            with run_scope:
                await nursery.start(node.run_listeners, client)
                _emit(_Ready())
                await go_event.wait()
                nursery.start_soon(report_progress)
                start = trio.current_time() + (go[0] - time.time_ns()) / 1e9
                await node.publish(client, start, go[0])
                _emit(_Progress(node.progress()))
                _emit(_Published(node.accepted))
                await trio.sleep_forever()  # receiving, until the parent says stop
            node.stop_listeners()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        error = first_error(group)
        if not isinstance(error, BusEventsError):
            raise
        _emit(_Failure.of(error))
        return 1
    except BusEventsError as error:
        _emit(_Failure.of(error))
        return 1
    _emit(_Result(node.result()))
    return 0


def main() -> None:
    """Run one worker: the parent talks to it over stdin/stdout (see the module docs)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's stop ends us, not Ctrl-C
    sys.exit(trio.run(_child))


if __name__ == "__main__":
    main()
