"""A small TCP fault proxy on 127.0.0.1 for the soak harness: cuts and stalls connections.

Every client connection is relayed to the upstream port byte for byte.  The
chaos driver (:meth:`FaultProxy.chaos`) picks live connections at random and

* **cuts** one (both sockets closed at once: what a load balancer restart or
  a dropped NAT entry does to a client), or
* **stalls** one (nothing relayed in either direction for a while, then
  everything goes on: a frozen proxy or a congested path).

Each connection is labelled from its latest request line (``publish``,
``stream-broadcast``, ``stream-unicast``) so that the report can say which
kind of connection was cut, and when.  No gzip: the clients ask for
``identity`` on streams, and the soak measures delivery, not encodings.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import trio

__all__ = ["Cut", "FaultProxy"]

_REQUEST = re.compile(rb"^(GET|POST) (\S+)")


@dataclass
class Cut:
    """One connection the chaos driver cut."""

    at: float  # trio.current_time()
    kind: str
    wall: float  # time.time(), to compare with event times


@dataclass
class _Conn:
    kind: str = "unknown"
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    resumed: trio.Event | None = None  # set while stalled; set() resumes


class FaultProxy:
    """Relay ``127.0.0.1:<port>`` to ``127.0.0.1:<upstream>``, cutting and stalling on demand."""

    def __init__(self, upstream: int, *, rng: random.Random | None = None) -> None:
        self.upstream = upstream
        self.rng = rng or random.Random()
        self.port = 0
        self.live: list[_Conn] = []
        self.cuts: list[Cut] = []
        self.stalls = 0
        self.connections = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and relay until cancelled; ``nursery.start`` returns the port."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._relay, listeners, handler_nursery=nursery)

    async def _relay(self, client: trio.SocketStream) -> None:
        conn = _Conn()
        self.connections += 1
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream)
        except OSError:
            await client.aclose()
            return
        self.live.append(conn)
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, conn, True, nursery)
                    nursery.start_soon(self._pump, upstream, client, conn, False, nursery)
        finally:
            self.live.remove(conn)
            with trio.CancelScope(shield=True):
                for stream in (client, upstream):
                    await trio.aclose_forcefully(stream)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        conn: _Conn,
        from_client: bool,
        nursery: trio.Nursery,
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                # A pooled connection may carry a publish, then a stream: label it by
                # its latest request (a request line starts a client write).
                if from_client and _REQUEST.match(data):
                    conn.kind = _label(data)
                while conn.resumed is not None:
                    await conn.resumed.wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        # One side ended: end the other too (a half-closed HTTP/1.1 relay is not needed).
        nursery.cancel_scope.cancel()

    def cut(self, kinds: tuple[str, ...] = ()) -> Cut | None:
        """Cut one live connection (of one of ``kinds``, if given) at random."""
        candidates = [c for c in self.live if not kinds or c.kind in kinds]
        if not candidates:
            return None
        # A kind first, then one of its connections: pooled publish connections
        # outnumber streams, and every kind deserves its share of cuts.
        kind = self.rng.choice(sorted({c.kind for c in candidates}))
        candidates = [c for c in candidates if c.kind == kind]
        import time

        conn = self.rng.choice(candidates)
        conn.scope.cancel()
        cut = Cut(trio.current_time(), conn.kind, time.time())
        self.cuts.append(cut)
        return cut

    async def stall(self, seconds: float, kinds: tuple[str, ...] = ()) -> None:
        """Relay nothing on one live connection for ``seconds``."""
        candidates = [c for c in self.live if c.resumed is None and (not kinds or c.kind in kinds)]
        if not candidates:
            return
        conn = self.rng.choice(candidates)
        conn.resumed = resumed = trio.Event()
        self.stalls += 1
        try:
            await trio.sleep(seconds)
        finally:
            conn.resumed = None
            resumed.set()

    async def chaos(
        self,
        *,
        cut_every: float,
        stall_every: float,
        stall_max: float,
        kinds: tuple[str, ...] = ("stream-broadcast", "stream-unicast", "publish"),
    ) -> None:
        """Until cancelled: cut a connection every ``cut_every`` s and stall one every
        ``stall_every`` s on average (exponential gaps), stalls lasting up to ``stall_max`` s."""
        async with trio.open_nursery() as nursery:

            async def stalls() -> None:
                while True:
                    await trio.sleep(self.rng.expovariate(1 / stall_every))
                    nursery.start_soon(self.stall, self.rng.uniform(0.2, stall_max), kinds)

            nursery.start_soon(stalls)
            while True:
                await trio.sleep(self.rng.expovariate(1 / cut_every))
                self.cut(kinds)

    def cut_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for cut in self.cuts:
            counts[cut.kind] = counts.get(cut.kind, 0) + 1
        return counts


def _label(data: bytes) -> str:
    match = _REQUEST.match(data)
    if match is None:
        return "unknown"
    method, target = match.groups()
    if method == b"POST":
        return "publish"
    if b"/stream" in target:
        return "stream-unicast" if b"delivery=unicast" in target else "stream-broadcast"
    return "other"
