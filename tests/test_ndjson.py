"""Framing and batch decoding of NDJSON streams, cut at any byte boundary."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from busevents import (
    Event,
    InvalidEvent,
    InvalidPayload,
    LineTooLong,
    NDJSONDecoder,
    StreamTruncated,
)

LINES = [
    b'{"id":"%d","name":"example.ping","correlationId":"c%d","payload":{"n":%d}}' % (i, i, i)
    for i in range(40)
]


def _feed_all(data: bytes, cuts: list[int], **options: int) -> list[Event]:
    decoder: NDJSONDecoder[Event] = NDJSONDecoder(Event, **options)
    events: list[Event] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        events += decoder.feed(data[start:cut])
        decoder.check()
        start = cut
    decoder.close()
    return events


@given(
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=60),
    crlf=st.booleans(),
    blanks=st.booleans(),
)
def test_any_framing_gives_the_same_events(cuts: list[int], crlf: bool, blanks: bool) -> None:
    end = b"\r\n" if crlf else b"\n"
    data = b"".join(
        line + end + (b"\n" if blanks and i % 7 == 0 else b"") for i, line in enumerate(LINES)
    )
    events = _feed_all(data, [c for c in cuts if c < len(data)])
    assert [e.id for e in events] == [str(i) for i in range(40)]
    assert events[3].correlation_id == "c3"
    assert events[3].payload_obj() == {"n": 3}


def test_one_byte_at_a_time() -> None:
    data = b"\n".join(LINES) + b"\n"
    assert len(_feed_all(data, list(range(len(data))))) == 40


def test_raw_passthrough_keeps_bytes_and_drops_blank_lines() -> None:
    decoder: NDJSONDecoder[Event] = NDJSONDecoder(Event)
    data = b"\n" + LINES[0] + b"\r\n\r\n" + LINES[1] + b"\n\n"
    out = b"".join(decoder.feed_raw(data))
    assert out == LINES[0] + b"\r\n" + LINES[1] + b"\n"


def test_good_events_before_a_bad_line_are_delivered() -> None:
    decoder: NDJSONDecoder[Event] = NDJSONDecoder(Event)
    data = LINES[0] + b"\n" + LINES[1] + b"\n{not json\n" + LINES[2] + b"\n"
    events = decoder.feed(data)
    assert [e.id for e in events] == ["0", "1"]
    with pytest.raises(InvalidEvent) as info:
        decoder.check()
    assert info.value.event_number == 3
    assert info.value.offset == len(LINES[0]) + len(LINES[1]) + 2
    assert "byte offset" in str(info.value) and "malformed" in str(info.value)


def test_a_json_line_that_is_not_an_envelope() -> None:
    decoder: NDJSONDecoder[Event] = NDJSONDecoder(Event)
    assert decoder.feed(b"[1, 2]\n") == []
    with pytest.raises(InvalidEvent, match=r"event 1\).*Expected `object`, got `array`"):
        decoder.check()
    decoder = NDJSONDecoder(Event)
    decoder.feed(b'{"id": 5, "name": "x"}\n')
    with pytest.raises(InvalidEvent, match="Expected `str`, got `int` - at `id`"):
        decoder.check()


def test_partial_line_at_the_end_is_reported_not_decoded() -> None:
    decoder: NDJSONDecoder[Event] = NDJSONDecoder(Event)
    events = decoder.feed(LINES[0] + b"\n" + LINES[1][:20])
    assert len(events) == 1
    with pytest.raises(StreamTruncated, match="middle of a line: 20 bytes"):
        decoder.close()


def test_line_longer_than_the_limit() -> None:
    decoder: NDJSONDecoder[Event] = NDJSONDecoder(Event, max_line=100)
    events = decoder.feed(
        LINES[0] + b"\n" + b'{"id":"x","name":"' + b"a" * 200 + b'"}\n' + LINES[1] + b"\n"
    )
    assert [e.id for e in events] == ["0"]
    with pytest.raises(LineTooLong, match="100-byte limit") as info:
        decoder.check()
    assert info.value.offset == len(LINES[0]) + 1


def test_never_ending_line_keeps_memory_bounded() -> None:
    decoder: NDJSONDecoder[Event] = NDJSONDecoder(Event, max_line=1000)
    with pytest.raises(LineTooLong):
        for _ in range(10_000):
            assert decoder.feed(b"x" * 64) == []
            decoder.check()
    assert len(decoder._partial) == 0


def test_payload_decodes_into_user_types() -> None:
    class Ping(msgspec.Struct):
        n: int

    (event,) = NDJSONDecoder(Event).feed(LINES[5] + b"\n")
    assert event.payload_as(Ping) == Ping(n=5)
    with pytest.raises(InvalidPayload, match=r"event 5 is not list\[int\]") as info:
        event.payload_as(list[int])
    assert isinstance(info.value.__cause__, msgspec.ValidationError)


@given(
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=40),
    blanks=st.lists(st.sampled_from([b"\n", b"\r\n", b" \n"]), max_size=40),
)
def test_raw_passthrough_is_exact_under_any_framing(cuts: list[int], blanks: list[bytes]) -> None:
    parts: list[bytes] = []
    for i, line in enumerate(LINES):
        parts.append(line + b"\n")
        if i < len(blanks):
            parts.append(blanks[i])
    data = b"".join(parts)
    decoder: NDJSONDecoder[Event] = NDJSONDecoder(Event)
    out: list[bytes] = []
    start = 0
    for cut in [*sorted({c for c in cuts if c < len(data)}), len(data)]:
        out += decoder.feed_raw(data[start:cut])
        decoder.check()
        start = cut
    decoder.close()
    assert all(out)  # no empty blocks
    assert b"".join(out) == b"".join(line + b"\n" for line in LINES)


# -- max_line below the read size (issue 11, defect 1) -------------------------

MAX_FRAMING_LIMIT = 16 * 1024 * 1024


@st.composite
def framed_streams(draw: st.DrawFn) -> tuple[list[bytes], bytes, int, list[int]]:
    """Lines of drawn sizes, their stream (CRLF or LF, blank keep-alives), a
    ``max_line`` from the longest line up to 16 MiB and chunk sizes."""
    sizes = draw(st.lists(st.integers(min_value=0, max_value=700), min_size=1, max_size=30))
    lines = [
        b'{"id":"%d","name":"example.ping","payload":"%s"}' % (i, b"x" * size)
        for i, size in enumerate(sizes)
    ]
    ends = draw(
        st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=len(lines), max_size=len(lines))
    )
    blanks = draw(
        st.lists(
            st.sampled_from([b"", b"\n", b"\r\n", b"  \n"]),
            min_size=len(lines),
            max_size=len(lines),
        )
    )
    data = b"".join(
        line + end + blank for line, end, blank in zip(lines, ends, blanks, strict=True)
    )
    # A line's length is every byte before its "\n" (a CR included).
    longest = max(len(piece) for piece in data.split(b"\n"))
    max_line = draw(
        st.one_of(
            st.integers(min_value=longest, max_value=longest + 64),  # below the read size
            st.integers(min_value=max(longest, 500), max_value=2048),  # both ways of looking
            st.integers(min_value=longest, max_value=MAX_FRAMING_LIMIT),
        )
    )
    chunk_sizes = draw(
        st.lists(st.integers(min_value=1, max_value=len(data)), min_size=1, max_size=20)
    )
    raw_lines = [line + end for line, end in zip(lines, ends, strict=True)]
    return raw_lines, data, max_line, chunk_sizes


def _chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        out.append(data[pos : pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    return out


@given(framed_streams())
def test_any_max_line_above_the_longest_line_loses_nothing(
    stream: tuple[list[bytes], bytes, int, list[int]],
) -> None:
    lines, data, max_line, sizes = stream
    decoder: NDJSONDecoder[Event] = NDJSONDecoder(Event, max_line=max_line)
    events: list[Event] = []
    for piece in _chunks(data, sizes):
        events += decoder.feed(piece)
        decoder.check()
    decoder.close()
    assert [e.id for e in events] == [str(i) for i in range(len(lines))]
    assert decoder.offset == len(data) and decoder.events == len(lines)


@given(framed_streams())
def test_any_max_line_above_the_longest_line_passes_every_byte_through(
    stream: tuple[list[bytes], bytes, int, list[int]],
) -> None:
    lines, data, max_line, sizes = stream
    decoder: NDJSONDecoder[Event] = NDJSONDecoder(Event, max_line=max_line)
    out: list[bytes] = []
    for piece in _chunks(data, sizes):
        out += decoder.feed_raw(piece)
        decoder.check()
    decoder.close()
    assert all(out)
    assert b"".join(out) == b"".join(lines)


def test_a_chunk_cut_mid_line_with_a_small_limit_keeps_its_tail() -> None:
    """The reported case: max_line=40, several lines per read, the read ends mid-line."""
    lines = [b'{"id":"%d","name":"a.b"}\n' % i for i in range(6)]
    data = b"".join(lines)
    cut = len(lines[0]) * 3 + 10  # three lines and the start of the fourth
    for feed in ("feed", "feed_raw"):
        decoder: NDJSONDecoder[Event] = NDJSONDecoder(Event, max_line=40)
        out = getattr(decoder, feed)(data[:cut]) + getattr(decoder, feed)(data[cut:])
        decoder.close()
        if feed == "feed":
            assert [e.id for e in out] == [str(i) for i in range(6)]
        else:
            assert b"".join(out) == data


@given(
    before=st.integers(min_value=0, max_value=12),
    excess=st.integers(min_value=1, max_value=500),
    max_line=st.integers(min_value=60, max_value=1500),
    sizes=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=10),
    raw=st.booleans(),
)
def test_an_over_long_line_is_found_at_its_offset_under_any_framing(
    before: int, excess: int, max_line: int, sizes: list[int], raw: bool
) -> None:
    good = [b'{"id":"%d","name":"a.b"}\n' % i for i in range(before)]
    prefix = b"".join(good)
    long = b'{"id":"x","name":"' + b"y" * (max_line + 500) + b'"}'
    long = long[: max_line + excess]  # longer than max_line by excess bytes
    data = prefix + long + b"\n" + b"".join(good)
    decoder: NDJSONDecoder[Event] = NDJSONDecoder(Event, max_line=max_line)
    delivered: list[object] = []
    with pytest.raises(LineTooLong) as info:
        for piece in _chunks(data, sizes):
            delivered += decoder.feed_raw(piece) if raw else decoder.feed(piece)
            decoder.check()
        decoder.close()
    if raw:
        assert b"".join(delivered) == prefix  # type: ignore[arg-type]
    else:
        assert len(delivered) == before
    assert info.value.offset == len(prefix) and info.value.event_number == before + 1


@pytest.mark.parametrize(
    ("deep", "text"),
    [
        (
            b'{"id":"x","name":"a.b","payload":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
            "nested too deeply",
        ),
        (
            b'{"id":"x","name":"a.b","extra":' + b'{"a":' * 10_000 + b"1" + b"}" * 10_001,
            "nested too deeply",
        ),
        (b"[" * 10_000 + b"]" * 10_000, "Expected `object`, got `array`"),
    ],
)
@pytest.mark.parametrize("raw", [False, True])
def test_a_line_nested_10000_deep_is_an_invalid_event(deep: bytes, text: str, raw: bool) -> None:
    decoder: NDJSONDecoder[Event] = NDJSONDecoder(Event)
    data = LINES[0] + b"\n" + deep + b"\n" + LINES[1] + b"\n"
    out = decoder.feed_raw(data) if raw else decoder.feed(data)
    assert len(out) == 1
    with pytest.raises(InvalidEvent, match=text) as info:
        decoder.check()
    assert info.value.offset == len(LINES[0]) + 1 and info.value.event_number == 2
    assert f"byte offset {len(LINES[0]) + 1}" in str(info.value)
