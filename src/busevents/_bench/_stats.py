"""Counting primitives of ``bus-events bench``: latency recorders and delivery tallies.

Latencies are microseconds, in HdrHistograms (the ``hdrhistogram`` package,
an optional extra: ``pip install 'busevents[loadtest]'``), 3 significant
figures, up to one hour.
"""

from __future__ import annotations

import importlib
import zlib
from collections import Counter
from typing import Any, Final

from .._errors import ConfigError

__all__ = [
    "HIGHEST_US",
    "SIGNIFICANT_FIGURES",
    "Recorder",
    "Tally",
    "hdr_histogram_class",
    "new_histogram",
]

#: Highest latency a histogram tracks, in microseconds (larger values are clamped).
HIGHEST_US: Final = 3_600_000_000
SIGNIFICANT_FIGURES: Final = 3
#: Samples buffered before they are folded into the histogram (see Recorder).
_FLUSH_AT: Final = 16_384
#: With 3 significant figures HdrHistogram keeps 2048 sub-buckets: a value of
#: more than 11 bits shares its bucket with values that differ only in the low
#: ``bit_length - 11`` bits.
_EXACT_BITS: Final = 11
_MISSING_EXTRA = (
    "bus-events bench needs the hdrhistogram package: pip install 'busevents[loadtest]'"
)


def hdr_histogram_class() -> Any:
    """The ``HdrHistogram`` class; :class:`ConfigError` naming the extra when it is missing."""
    try:
        module = importlib.import_module("hdrh.histogram")
    except ImportError:
        raise ConfigError(_MISSING_EXTRA) from None
    return module.HdrHistogram


def new_histogram() -> Any:
    """An empty histogram of latencies in microseconds (1 µs to 1 h, 3 significant figures)."""
    return hdr_histogram_class()(1, HIGHEST_US, SIGNIFICANT_FIGURES)


class Recorder:
    """Latency samples (µs) into an HdrHistogram, cheap enough for the hot path.

    ``HdrHistogram.record_value`` is pure Python (about 2.5 µs a call); a
    listener at 100 000 events/s would spend a quarter of a core in it and
    steal that from the deployment under test when both share a machine.  So
    samples are appended to a list and folded in batches: each is rounded down
    to the lowest value of its histogram bucket (which changes nothing the
    histogram can tell apart), equal values are counted with ``Counter`` (C
    code), and each distinct value is recorded once with its count.

    ``total`` is the exact sum of the samples folded in, for the mean:
    ``HdrHistogram.get_mean_value`` walks every bucket in Python (0.15 s a
    histogram here), which a report with 50 listeners cannot afford.
    """

    __slots__ = ("_histogram", "_pending", "append", "total")

    def __init__(self) -> None:
        self._histogram = new_histogram()
        self._pending: list[int] = []
        self.total = 0
        #: Record one sample, in microseconds (negative: clamped to 0).
        self.append = self._pending.append

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        record = self._histogram.record_value
        counts = Counter(
            value >> shift << shift if (shift := value.bit_length() - _EXACT_BITS) > 0 else value
            for value in pending
        )
        for value, count in counts.items():
            record(min(max(value, 0), HIGHEST_US), count)
        self.total += sum(pending)
        pending.clear()

    def maybe_flush(self) -> None:
        """Fold the buffered samples in when there are many (call once per batch)."""
        if len(self._pending) >= _FLUSH_AT:
            self._flush()

    def encode(self) -> bytes:
        """The histogram in HdrHistogram's compressed, base64 transport format."""
        self._flush()
        encoded: bytes = self._histogram.encode()
        return encoded


class Tally:
    """How many times a receiver got each sequence number of each publisher.

    One byte per event and publisher (saturating at 255), so that a broadcast
    listener, or a unicast group whose consumers share the tally, can tell
    loss from duplication after the run, and parts merge by adding counts.
    """

    __slots__ = ("counts", "unique")

    def __init__(self) -> None:
        self.counts: dict[int, bytearray] = {}
        #: Distinct (publisher, sequence) pairs received.
        self.unique = 0

    def note(self, publisher: int, seq: int) -> int:
        """Count one arrival; return how many times it had arrived before."""
        counts = self.counts.get(publisher)
        if counts is None:
            counts = self.counts[publisher] = bytearray()
        if seq >= len(counts):
            counts.extend(bytes(max(seq + 1 - len(counts), 4096)))
        seen = counts[seq]
        if not seen:
            self.unique += 1
        if seen < 255:
            counts[seq] = seen + 1
        return seen

    def packed(self) -> dict[int, bytes]:
        """The counts, zlib-compressed (mostly ones: they compress to almost nothing)."""
        return {pub: zlib.compress(bytes(counts), 1) for pub, counts in self.counts.items()}

    @classmethod
    def merge(cls, packed: list[dict[int, bytes]]) -> Tally:
        """Add up packed tallies (the parts of one unicast group, say)."""
        tally = cls()
        for part in packed:
            for pub, blob in part.items():
                counts = zlib.decompress(blob)
                mine = tally.counts.get(pub)
                if mine is None:
                    tally.counts[pub] = bytearray(counts)
                    continue
                if len(counts) > len(mine):
                    mine.extend(bytes(len(counts) - len(mine)))
                for seq, seen in enumerate(counts):
                    if seen:
                        mine[seq] = min(255, mine[seq] + seen)
        tally.unique = sum(len(c) - c.count(0) for c in tally.counts.values())
        return tally
