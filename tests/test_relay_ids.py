"""The one bounded event-id parser (``busevents.parse_event_id``) and where it is used."""

from __future__ import annotations

import pytest

from busevents import event_id_key, parse_event_id


def test_ids_parse_as_integer_pairs_up_to_20_digits_a_part() -> None:
    assert parse_event_id("1700000000000-0") == (1700000000000, 0)
    assert parse_event_id("9" * 20 + "-" + "9" * 20) == (10**20 - 1, 10**20 - 1)
    assert parse_event_id("9-0") < parse_event_id("10-0")


@pytest.mark.parametrize(
    "text",
    [
        "9" * 21 + "-0",
        "0-" + "9" * 21,
        "9" * 5000 + "-0",
        "",
        "-",
        "1-",
        "-1",
        "1",
        "a-1",
        "+1-0",
        "1-0-0",
        "\u0661-\u0660",
        " 1-0",
        "1_0-0",
    ],
)
def test_anything_else_is_a_short_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="not an event id") as caught:
        parse_event_id(text)
    assert len(str(caught.value)) < 200
    assert event_id_key(text) is None
