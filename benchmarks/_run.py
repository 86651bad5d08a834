"""The measured clients: ``python -m benchmarks._run KIND JSON-PARAMS``, one per process.

Each kind runs in a fresh interpreter started by the harness, so imports,
allocator state and the GIL are its own; it prints one JSON object (its
result) as the last line of stdout.  Timed sections exclude imports and
process start; each repetition opens a new stream; the best time is kept.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from . import _run_nats, _run_publish, _workload
from ._timer import Timer

__all__ = ["KINDS", "main"]

Params = dict[str, Any]
Result = dict[str, Any]

_TOKEN = "bench-token"  # the source server accepts any token
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    """Resident set size of this process now (``/proc/self/statm``)."""
    with open("/proc/self/statm", "rb") as file:
        return int(file.read().split()[1]) * _PAGE


def _max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _last_id_of(tail: bytes) -> str | None:
    """The ``id`` of the last complete line in ``tail``."""
    import msgspec

    lines = tail.rstrip(b"\n").rsplit(b"\n", 1)
    if not lines[-1]:
        return None
    value: dict[str, Any] = msgspec.json.decode(lines[-1])
    return str(value["id"])


def _stream_url(base: str) -> str:
    return f"{base}/stream?name={_workload.EVENT_NAME}&replay=true&follow=false"


def _repeat_trio(
    params: Params,
    open_client: Callable[[], Any],
    once: Callable[[Any], Awaitable[tuple[int, str | None, dict[str, Any]]]],
) -> Result:
    """Under trio: build a client (untimed), then time ``once(client)`` ``repeats`` times.

    Building an httpx client costs tens of milliseconds (an SSL context); that is
    a constant, not a rate, so it stays out of the timed section.
    """
    import trio

    async def main() -> Result:
        timer = Timer()
        count, last, extra = 0, None, {}
        async with open_client() as client:
            for _ in range(params["repeats"]):
                with timer:
                    count, last, extra = await once(client)
        return {**timer.best(), "events": count, "last_id": last, **extra}

    result: Result = trio.run(main)
    return result


def _httpx_client() -> Any:
    import httpx

    return httpx.AsyncClient(timeout=None)


# -- transfer and decode ceilings ---------------------------------------------


async def _transfer_once(http: Any, url: str) -> tuple[int, str | None, dict[str, Any]]:
    """T: what httpx delivers through ``aiter_raw()``, nothing decoded."""
    size = 0
    prev = last = b""
    async with http.stream("GET", _stream_url(url)) as response:
        async for chunk in response.aiter_raw():
            size += len(chunk)
            prev, last = last, chunk
    return size // _workload.LINE_SIZE, _last_id_of(prev + last), {"bytes": size}


@asynccontextmanager
async def _lean_transport() -> AsyncIterator[Any]:
    import ssl

    from busevents._config import Proxies
    from busevents._publish import LeanTransport
    from busevents.cli._listen import _keep_heap_slack

    _keep_heap_slack()  # the CLI's allocator setting: this row is the CLI path's ceiling
    lean = LeanTransport(proxies=Proxies(), ssl_context=ssl.create_default_context)
    try:
        yield lean
    finally:
        await lean.aclose()


async def _transfer_lean_once(lean: Any, url: str) -> tuple[int, str | None, dict[str, Any]]:
    """T.lean: what the SDK's own stream transport (h11 over trio, 1 MiB reads) delivers
    through ``aiter_raw()``, nothing decoded: the listener's transfer ceiling."""
    from busevents._http import RequestHeaders

    size = 0
    prev = last = b""
    base, _, query = _stream_url(url).partition("?")
    response = await lean.open_stream(base, RequestHeaders().stream(None), query)
    try:
        async for chunk in response.aiter_raw():
            size += len(chunk)
            prev, last = last, chunk
    finally:
        await response.aclose()
    return size // _workload.LINE_SIZE, _last_id_of(prev + last), {"bytes": size}


def _decode(params: Params) -> Result:
    """D: msgspec ``decode_lines`` over the body from memory, line-aligned 64 KiB blocks.

    ``type``: ``event`` (the full :class:`busevents.Event`, the decode ceiling)
    or ``check`` (only what pass-through validates).  ``framing``: instead feed
    unaligned 64 KiB chunks through the SDK's own ``NDJSONDecoder.feed``.
    """
    import msgspec

    from busevents import Event

    n, chunk = params["events"], params.get("chunk", 64 * 1024)
    data = _workload.body(n)
    decode_type: Any = Event if params.get("type", "event") == "event" else _check_type()
    timer = Timer()
    count, last = 0, None
    if params.get("framing"):
        from busevents._ndjson import NDJSONDecoder

        chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        for _ in range(params["repeats"]):
            framer: NDJSONDecoder[Any] = NDJSONDecoder(decode_type)
            feed = framer.feed
            count = 0
            with timer:
                for piece in chunks:
                    values = feed(piece)
                    if values:
                        count += len(values)
                        last = values[-1]
                framer.close()
    else:
        step = chunk - chunk % _workload.LINE_SIZE
        view = memoryview(data)
        blocks = [view[i : i + step] for i in range(0, len(data), step)]
        decoder = msgspec.json.Decoder(decode_type)
        decode_lines = decoder.decode_lines
        for _ in range(params["repeats"]):
            count = 0
            with timer:
                for block in blocks:
                    values = decode_lines(block)
                    count += len(values)
                    last = values[-1]
    return {**timer.best(), "events": count, "last_id": getattr(last, "id", None)}


def _check_type() -> Any:
    """The struct the CLI pass-through validates each line with (``id`` and ``name``)."""
    import importlib

    for module in ("busevents._stream", "busevents._client"):  # where it lived, in turn
        try:
            check = getattr(importlib.import_module(module), "_EnvelopeCheck", None)
        except ImportError:
            continue
        if check is not None:
            return check
    import msgspec

    class _Check(msgspec.Struct, gc=False):  # renamed in src: measure the same shape
        id: str
        name: str

    return _Check


# -- the SDK -------------------------------------------------------------------


async def _sdk_once(client: Any, mode: str) -> tuple[int, str | None, dict[str, Any]]:
    """SDK ``listen``: ``async for event in stream`` (iter), ``stream.batches()`` or
    ``stream.raw_batches()`` (raw, what the CLI pass-through reads)."""
    count = 0
    last: Any = None
    async with client.listen(_workload.EVENT_NAME, replay=True, follow=False) as stream:
        if mode == "batches":
            async for batch in stream.batches():
                count += len(batch)
                last = batch[-1]
        elif mode == "raw":
            size = 0
            async for block in stream.raw_batches():
                size += len(block)
                last = block
            count = size // _workload.LINE_SIZE
            return count, _last_id_of(last or b""), {}
        else:
            event: Any = None
            async for event in stream:  # noqa: B007 - the last one is checked
                count += 1
            last = event
    return count, getattr(last, "id", None), {}


def _sdk_client(url: str) -> Any:
    from busevents import EventsClient

    return EventsClient(url, _TOKEN)


# -- the peers -----------------------------------------------------------------


async def _httpx_lines_once(http: Any, url: str) -> tuple[int, str | None, dict[str, Any]]:
    """httpx ``aiter_lines()`` + ``json.loads``: the obvious hand-written client."""
    count = 0
    value: Any = None
    async with http.stream("GET", _stream_url(url)) as response:
        async for line in response.aiter_lines():
            if line:
                value = json.loads(line)
                count += 1
    return count, value and value["id"], {}


def _aiohttp_lines(params: Params) -> Result:
    """aiohttp line iteration + orjson: the strongest common Python peer (asyncio)."""
    import asyncio

    import aiohttp
    import orjson

    async def once(session: aiohttp.ClientSession) -> tuple[int, str | None]:
        count = 0
        value: Any = None
        async with session.get(_stream_url(params["url"])) as response:
            async for line in response.content:
                if line.strip():
                    value = orjson.loads(line)
                    count += 1
        return count, value and value["id"]

    async def main() -> Result:
        timer = Timer()
        count, last = 0, None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            for _ in range(params["repeats"]):
                with timer:
                    count, last = await once(session)
        return {**timer.best(), "events": count, "last_id": last}

    return asyncio.run(main())


# -- memory --------------------------------------------------------------------


def _rss(params: Params) -> Result:
    """Resident memory of an SDK listener after ``early`` events and after all of them."""
    import trio

    from busevents import EventsClient

    early = params["early"]

    async def main() -> Result:
        count = 0
        event: Any = None
        rss_early = max_early = 0
        start = time.perf_counter()
        async with (
            EventsClient(params["url"], _TOKEN) as client,
            client.listen(_workload.EVENT_NAME, replay=True, follow=False) as stream,
        ):
            async for event in stream:  # noqa: B007 - the last one is checked
                count += 1
                if count == early:
                    rss_early, max_early = _rss_bytes(), _max_rss_bytes()
            rss_end, max_end = _rss_bytes(), _max_rss_bytes()
        return {
            "seconds": time.perf_counter() - start,
            "events": count,
            "last_id": getattr(event, "id", None),
            "early": early,
            "rss_early": rss_early,
            "rss_end": rss_end,
            "maxrss_early": max_early,
            "maxrss_end": max_end,
        }

    result: Result = trio.run(main)
    return result


def _multi(params: Params) -> Result:
    """Several runs in this one process, in order (``--quick`` saves process starts)."""
    return {"results": [KINDS[kind](run) for kind, run in params["runs"]]}


KINDS: dict[str, Callable[[Params], Result]] = {
    "transfer": lambda p: _repeat_trio(
        p, _httpx_client, lambda http: _transfer_once(http, p["url"])
    ),
    "transfer-lean": lambda p: _repeat_trio(
        p, _lean_transport, lambda lean: _transfer_lean_once(lean, p["url"])
    ),
    "decode": _decode,
    "sdk": lambda p: _repeat_trio(
        p, lambda: _sdk_client(p["url"]), lambda client: _sdk_once(client, p["mode"])
    ),
    "httpx-lines": lambda p: _repeat_trio(
        p, _httpx_client, lambda http: _httpx_lines_once(http, p["url"])
    ),
    "aiohttp-lines": _aiohttp_lines,
    "rss": _rss,
    **_run_publish.KINDS,
    **_run_nats.KINDS,
    "multi": _multi,
}


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks._run KIND [JSON]``: the parameters as an argument, or on
    stdin (the harness's way: a token in them must never be on a command line)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or args[0] not in KINDS:
        sys.stderr.write(f"usage: python -m benchmarks._run {{{','.join(KINDS)}}} [JSON]\n")
        return 2
    params = json.loads(args[1] if len(args) == 2 else sys.stdin.readline())
    result = KINDS[args[0]](params)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
