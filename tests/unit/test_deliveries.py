"""Reading the delivery count of a task message (agent/deliveries.py)."""

from __future__ import annotations

from typing import Any

import pytest

from agent.deliveries import DELIVERIES_HEADER, failed_deliveries


@pytest.mark.parametrize(
    ("headers", "redelivered", "expected"),
    [
        (None, False, 0),
        ({}, None, 0),
        (None, True, 1),
        ({DELIVERIES_HEADER: 2}, False, 2),
        ({DELIVERIES_HEADER: 2}, True, 3),
        ({"other": "x", DELIVERIES_HEADER: 0}, True, 1),
    ],
)
def test_count_from_header_and_flag(
    headers: dict[str, Any] | None, redelivered: bool | None, expected: int
) -> None:
    assert failed_deliveries(headers, redelivered) == expected


@pytest.mark.parametrize("value", ["2", -1, True, 1.5, None, b"3"])
def test_invalid_count_reads_as_zero(value: object) -> None:
    assert failed_deliveries({DELIVERIES_HEADER: value}, False) == 0
    assert failed_deliveries({DELIVERIES_HEADER: value}, True) == 1
