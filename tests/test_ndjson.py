"""Framing and batch decoding of NDJSON streams, cut at any byte boundary."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from busevents import Event, InvalidEvent, LineTooLong, NDJSONDecoder, StreamTruncated

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
    with pytest.raises(msgspec.ValidationError):
        event.payload_as(list[int])


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
