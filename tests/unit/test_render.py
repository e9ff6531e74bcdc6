"""Tests for cli.render: values of any size and type print without raising."""

from __future__ import annotations

import json

from cli.render import format_value, to_json


def test_int_beyond_decimal_digit_limit_prints() -> None:
    huge = 1 << 20_000  # about 6,000 decimal digits, over Python's 4,300 default
    assert format_value(huge) == "<int too long to show>"
    assert json.loads(to_json({"n": huge}))["n"].startswith("0x")


def test_small_int_stays_a_json_number() -> None:
    assert json.loads(to_json([1, -(2**63)])) == [1, -(2**63)]


def test_long_value_is_shortened() -> None:
    text = format_value("a" * 1000, limit=50)
    assert len(text) == 50
    assert text.endswith("...")
