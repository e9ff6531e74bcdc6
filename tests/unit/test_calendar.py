"""Tests for zenflow.calendar: parsing, zone lookup and next fire instants across DST changes.

Expected instants are written out in UTC. The 2026 changes they rely on, as zoneinfo reports
them: America/New_York moves from -05:00 to -04:00 at 2026-03-08 07:00Z and back at
2026-11-01 06:00Z. Europe/Paris moves from +01:00 to +02:00 at 2026-03-29 01:00Z and back at
2026-10-25 01:00Z. Australia/Sydney moves from +11:00 to +10:00 at 2026-04-04 16:00Z and back
to +11:00 at 2026-10-03 16:00Z. Asia/Kolkata stays at +05:30. Pacific/Apia skipped the local
day 2011-12-30 by moving from -10:00 to +14:00 at 2011-12-30 10:00Z.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zenflow import calendar
from zenflow.calendar import (
    next_day_of_month,
    next_time_of_day,
    next_weekday,
    parse_time_of_day,
    parse_weekday,
    zone,
)
from zenflow.errors import DefinitionError

PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

MONDAY = 0
SATURDAY = 5
SUNDAY = 6


def utc(
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    second: int = 0,
    microsecond: int = 0,
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, microsecond, tzinfo=dt.UTC)


def local(
    name: str, year: int, month: int, day: int, hour: int, minute: int, fold: int = 0
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(name), fold=fold)


# --- parse_time_of_day -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("00:00", dt.time(0, 0)),
        ("09:05", dt.time(9, 5)),
        ("23:59", dt.time(23, 59)),
        ("17:30:15", dt.time(17, 30, 15)),
        ("23:59:59", dt.time(23, 59, 59)),
    ],
)
def test_parse_time_of_day_text(text: str, expected: dt.time) -> None:
    assert parse_time_of_day(text) == expected


def test_parse_time_of_day_keeps_microseconds() -> None:
    assert parse_time_of_day(dt.time(9, 0, 0, 250)) == dt.time(9, 0, 0, 250)


def test_parse_time_of_day_clears_fold() -> None:
    assert parse_time_of_day(dt.time(2, 30, fold=1)).fold == 0


@pytest.mark.parametrize(
    "value",
    [
        "9:00",
        "24:00",
        "12:60",
        "12:00:60",
        "12",
        "1200",
        "12:00:00.5",
        "12:00+01:00",
        " 12:00",
        "12:00\n",
        "\u0661\u0662:\u0660\u0660",  # Arabic-Indic digits, which the regex class \d would match
        "",
        900,
        None,
        dt.datetime(2026, 1, 1, 9, 0),
    ],
)
def test_parse_time_of_day_rejects_invalid(value: Any) -> None:
    with pytest.raises(DefinitionError, match='"HH:MM" or "HH:MM:SS"') as caught:
        parse_time_of_day(value)
    assert repr(value) in str(caught.value)


def test_parse_time_of_day_rejects_aware_time() -> None:
    with pytest.raises(DefinitionError, match="naive time") as caught:
        parse_time_of_day(dt.time(9, 0, tzinfo=dt.UTC))
    assert "tzinfo" in str(caught.value)


# --- parse_weekday ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (6, 6),
        ("Monday", 0),
        ("mon", 0),
        ("MON", 0),
        ("tuesday", 1),
        ("Wed", 2),
        ("THURSDAY", 3),
        ("fri", 4),
        ("Saturday", 5),
        ("sUnDaY", 6),
        ("sun", 6),
    ],
)
def test_parse_weekday_valid(value: int | str, expected: int) -> None:
    assert parse_weekday(value) == expected


@pytest.mark.parametrize(
    "value", [7, -1, True, "tues", "mo", "", "monday ", "1", "lundi", 1.0, None]
)
def test_parse_weekday_rejects_invalid(value: Any) -> None:
    with pytest.raises(DefinitionError, match="invalid weekday") as caught:
        parse_weekday(value)
    assert repr(value) in str(caught.value)


# --- zone ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata"])
def test_zone_loads_iana_name(name: str) -> None:
    assert zone(name).key == name


@pytest.mark.parametrize(
    "name",
    [
        "../etc",
        "",
        "Mars/Base",
        "europe/paris",
        "Europe/Paris/",
        " Europe/Paris",
        "Europe",
        "/usr/share/zoneinfo/UTC",
        "a\0b",
        "localtime",
        "right/UTC",
        "posix/Europe/Paris",
        None,
    ],
)
def test_zone_rejects_unknown_name(name: Any) -> None:
    with pytest.raises(DefinitionError, match='use an IANA name such as "Europe/Paris"') as caught:
        zone(name)
    assert repr(name) in str(caught.value)


def test_zone_without_database_suggests_tzdata(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calendar, "_available_zones", frozenset)
    with pytest.raises(DefinitionError, match="install the tzdata package"):
        zone("Europe/Paris")


# --- next_time_of_day ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (utc(2026, 5, 10, 8, 0), utc(2026, 5, 10, 9, 0)),
        (utc(2026, 5, 10, 8, 59, 59, 999999), utc(2026, 5, 10, 9, 0)),
        (utc(2026, 5, 10, 9, 0, 0, 1), utc(2026, 5, 11, 9, 0)),
        (utc(2026, 5, 10, 23, 0), utc(2026, 5, 11, 9, 0)),
        (utc(2026, 12, 31, 10, 0), utc(2027, 1, 1, 9, 0)),
        (utc(2028, 2, 28, 10, 0), utc(2028, 2, 29, 9, 0)),
    ],
)
def test_next_time_of_day_utc(now: dt.datetime, expected: dt.datetime) -> None:
    assert next_time_of_day(now, dt.time(9, 0)) == expected


def test_next_time_of_day_at_fire_time_gives_next_day() -> None:
    assert next_time_of_day(utc(2026, 5, 10, 9, 0), dt.time(9, 0)) == utc(2026, 5, 11, 9, 0)


def test_next_time_of_day_returns_utc() -> None:
    result = next_time_of_day(
        local("Europe/Paris", 2026, 5, 10, 8, 0), dt.time(9, 0), "Asia/Kolkata"
    )
    assert result.tzinfo is dt.UTC


def test_next_time_of_day_accepts_now_in_any_zone() -> None:
    now = dt.datetime(2026, 5, 10, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=5)))  # 07:00Z
    assert next_time_of_day(now, dt.time(9, 0)) == utc(2026, 5, 10, 9, 0)


def test_next_time_of_day_keeps_microseconds() -> None:
    at = dt.time(9, 0, 0, 500)
    assert next_time_of_day(utc(2026, 5, 10, 9, 0), at) == utc(2026, 5, 10, 9, 0, 0, 500)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        # Saturday before the March change, before and after 09:00 EST.
        (utc(2026, 3, 7, 13, 0), utc(2026, 3, 7, 14, 0)),
        (utc(2026, 3, 7, 15, 0), utc(2026, 3, 8, 13, 0)),
        # Sunday of the change, then the Monday after it, both in EDT.
        (utc(2026, 3, 8, 14, 0), utc(2026, 3, 9, 13, 0)),
        # Saturday before the November change, in EDT, then Sunday in EST.
        (utc(2026, 10, 31, 12, 0), utc(2026, 10, 31, 13, 0)),
        (utc(2026, 10, 31, 14, 0), utc(2026, 11, 1, 14, 0)),
    ],
)
def test_next_time_of_day_new_york_across_dst(now: dt.datetime, expected: dt.datetime) -> None:
    assert next_time_of_day(now, dt.time(9, 0), "America/New_York") == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (utc(2026, 3, 28, 9, 0), utc(2026, 3, 29, 7, 0)),  # 09:00 CET to 09:00 CEST
        (utc(2026, 3, 29, 8, 0), utc(2026, 3, 30, 7, 0)),
        (utc(2026, 10, 24, 9, 0), utc(2026, 10, 25, 8, 0)),  # 09:00 CEST to 09:00 CET
        (utc(2026, 10, 25, 7, 30), utc(2026, 10, 25, 8, 0)),
    ],
)
def test_next_time_of_day_paris_across_dst(now: dt.datetime, expected: dt.datetime) -> None:
    assert next_time_of_day(now, dt.time(9, 0), "Europe/Paris") == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (utc(2026, 4, 3, 23, 0), utc(2026, 4, 4, 23, 0)),  # 10:00 AEDT, then 09:00 AEST
        (utc(2026, 4, 4, 23, 0), utc(2026, 4, 5, 23, 0)),
        (utc(2026, 10, 2, 23, 30), utc(2026, 10, 3, 22, 0)),  # 09:30 AEST, then 09:00 AEDT
    ],
)
def test_next_time_of_day_sydney_across_dst(now: dt.datetime, expected: dt.datetime) -> None:
    assert next_time_of_day(now, dt.time(9, 0), "Australia/Sydney") == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (utc(2026, 1, 15, 3, 0), utc(2026, 1, 15, 3, 30)),
        (utc(2026, 1, 15, 3, 30), utc(2026, 1, 16, 3, 30)),
        (local("Asia/Kolkata", 2026, 1, 15, 8, 59), utc(2026, 1, 15, 3, 30)),
    ],
)
def test_next_time_of_day_half_hour_offset(now: dt.datetime, expected: dt.datetime) -> None:
    assert next_time_of_day(now, dt.time(9, 0), "Asia/Kolkata") == expected


@pytest.mark.parametrize(
    ("tz", "now", "at", "expected"),
    [
        # Skipped 02:30 fires at 03:30 local, shifted forward by the one-hour gap.
        ("Europe/Paris", utc(2026, 3, 28, 23, 0), dt.time(2, 30), utc(2026, 3, 29, 1, 30)),
        ("Europe/Paris", utc(2026, 3, 28, 23, 0), dt.time(2, 0), utc(2026, 3, 29, 1, 0)),
        ("Europe/Paris", utc(2026, 3, 28, 23, 0), dt.time(2, 59, 59), utc(2026, 3, 29, 1, 59, 59)),
        ("America/New_York", utc(2026, 3, 8, 5, 0), dt.time(2, 30), utc(2026, 3, 8, 7, 30)),
        ("Australia/Sydney", utc(2026, 10, 3, 12, 0), dt.time(2, 30), utc(2026, 10, 3, 16, 30)),
        # Apia skipped all of 2011-12-30, so its 09:00 fires at 09:00 on the 31st (+14:00).
        ("Pacific/Apia", utc(2011, 12, 29, 20, 0), dt.time(9, 0), utc(2011, 12, 30, 19, 0)),
    ],
)
def test_next_time_of_day_in_gap_shifts_forward(
    tz: str, now: dt.datetime, at: dt.time, expected: dt.datetime
) -> None:
    assert next_time_of_day(now, at, tz) == expected


@pytest.mark.parametrize(
    "next_fire",
    [
        lambda now, at, tz: next_time_of_day(now, at, tz),
        lambda now, at, tz: next_weekday(now, SUNDAY, at, tz),
        lambda now, at, tz: next_day_of_month(now, 30, at, tz),
    ],
)
def test_next_gap_across_midnight_fires_next_day(next_fire: Callable[..., dt.datetime]) -> None:
    # Toronto moved from 23:30 EST to 00:30 EDT on Sunday 1919-03-30, so 23:45 that day fires
    # at 00:45 EDT on the 31st (04:45Z), which is still ahead at 00:35 EDT on the 31st.
    now = utc(1919, 3, 31, 4, 35)
    assert next_fire(now, dt.time(23, 45), "America/Toronto") == utc(1919, 3, 31, 4, 45)


def test_next_time_of_day_in_gap_then_next_day() -> None:
    # After the shifted 01:30Z fire, the next one is 02:30 CEST on the 30th.
    now = utc(2026, 3, 29, 1, 30)
    assert next_time_of_day(now, dt.time(2, 30), "Europe/Paris") == utc(2026, 3, 30, 0, 30)


@pytest.mark.parametrize(
    ("tz", "now", "at", "expected"),
    [
        # 02:30 occurs at 00:30Z (CEST) and again at 01:30Z (CET): only the first fires.
        ("Europe/Paris", utc(2026, 10, 24, 23, 0), dt.time(2, 30), utc(2026, 10, 25, 0, 30)),
        ("Europe/Paris", utc(2026, 10, 25, 0, 30), dt.time(2, 30), utc(2026, 10, 26, 1, 30)),
        ("Europe/Paris", utc(2026, 10, 25, 1, 0), dt.time(2, 30), utc(2026, 10, 26, 1, 30)),
        ("America/New_York", utc(2026, 10, 31, 16, 0), dt.time(1, 30), utc(2026, 11, 1, 5, 30)),
        ("America/New_York", utc(2026, 11, 1, 6, 15), dt.time(1, 30), utc(2026, 11, 2, 6, 30)),
        ("Australia/Sydney", utc(2026, 4, 4, 12, 0), dt.time(2, 30), utc(2026, 4, 4, 15, 30)),
        ("Australia/Sydney", utc(2026, 4, 4, 16, 0), dt.time(2, 30), utc(2026, 4, 5, 16, 30)),
    ],
)
def test_next_time_of_day_in_fold_fires_first_occurrence(
    tz: str, now: dt.datetime, at: dt.time, expected: dt.datetime
) -> None:
    assert next_time_of_day(now, at, tz) == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        # 02:15 in the repeated hour is 00:15Z with fold=0, before the 00:30Z fire, and 01:15Z
        # with fold=1, after it. A comparison by wall time ignores fold and gets the second wrong.
        (local("Europe/Paris", 2026, 10, 25, 2, 15, fold=0), utc(2026, 10, 25, 0, 30)),
        (local("Europe/Paris", 2026, 10, 25, 2, 15, fold=1), utc(2026, 10, 26, 1, 30)),
    ],
)
def test_next_time_of_day_honours_fold_of_now(now: dt.datetime, expected: dt.datetime) -> None:
    assert next_time_of_day(now, dt.time(2, 30), "Europe/Paris") == expected


def test_next_time_of_day_ignores_fold_of_at() -> None:
    at = dt.time(2, 30, fold=1)
    result = next_time_of_day(utc(2026, 10, 24, 23, 0), at, "Europe/Paris")
    assert result == utc(2026, 10, 25, 0, 30)


# --- next_weekday ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (utc(2026, 5, 11, 8, 0), utc(2026, 5, 11, 9, 0)),  # Monday before 09:00
        (utc(2026, 5, 11, 9, 0), utc(2026, 5, 18, 9, 0)),  # Monday at 09:00 exactly
        (utc(2026, 5, 11, 9, 0, 0, 1), utc(2026, 5, 18, 9, 0)),
        (utc(2026, 5, 12, 9, 0), utc(2026, 5, 18, 9, 0)),  # Tuesday
        (utc(2026, 5, 17, 23, 59), utc(2026, 5, 18, 9, 0)),  # Sunday
    ],
)
def test_next_weekday_utc(now: dt.datetime, expected: dt.datetime) -> None:
    assert next_weekday(now, MONDAY, dt.time(9, 0)) == expected


@pytest.mark.parametrize(
    ("tz", "now", "expected"),
    [
        # Monday 09:00 Paris after each 2026 change: CEST (07:00Z) and CET (08:00Z).
        ("Europe/Paris", utc(2026, 3, 27, 12, 0), utc(2026, 3, 30, 7, 0)),
        ("Europe/Paris", utc(2026, 10, 23, 12, 0), utc(2026, 10, 26, 8, 0)),
        ("America/New_York", utc(2026, 3, 6, 12, 0), utc(2026, 3, 9, 13, 0)),
        ("America/New_York", utc(2026, 10, 30, 12, 0), utc(2026, 11, 2, 14, 0)),
        # Monday 09:00 AEST is 23:00Z on Sunday. The first case asks at 08:30 local that Monday.
        ("Australia/Sydney", utc(2026, 4, 5, 22, 30), utc(2026, 4, 5, 23, 0)),
        ("Australia/Sydney", utc(2026, 4, 5, 23, 0), utc(2026, 4, 12, 23, 0)),
        ("Asia/Kolkata", utc(2026, 5, 10, 12, 0), utc(2026, 5, 11, 3, 30)),
    ],
)
def test_next_weekday_in_zone(tz: str, now: dt.datetime, expected: dt.datetime) -> None:
    assert next_weekday(now, MONDAY, dt.time(9, 0), tz) == expected


def test_next_weekday_local_day_differs_from_utc_day() -> None:
    # Monday 00:15 in Kolkata is Sunday 18:45Z.
    result = next_weekday(utc(2026, 5, 10, 12, 0), MONDAY, dt.time(0, 15), "Asia/Kolkata")
    assert result == utc(2026, 5, 10, 18, 45)


def test_next_weekday_in_gap_shifts_forward() -> None:
    now = utc(2026, 3, 27, 12, 0)
    result = next_weekday(now, SUNDAY, dt.time(2, 30), "Europe/Paris")
    assert result == utc(2026, 3, 29, 1, 30)


def test_next_weekday_in_fold_fires_first_occurrence() -> None:
    now = utc(2026, 10, 23, 12, 0)
    result = next_weekday(now, SUNDAY, dt.time(2, 30), "Europe/Paris")
    assert result == utc(2026, 10, 25, 0, 30)


def test_next_weekday_after_fold_waits_a_week() -> None:
    now = utc(2026, 10, 25, 1, 15)  # 02:15 CET, between the two 02:30 occurrences
    result = next_weekday(now, SUNDAY, dt.time(2, 30), "Europe/Paris")
    assert result == utc(2026, 11, 1, 1, 30)


def test_next_weekday_saturday_before_march_change() -> None:
    now = utc(2026, 3, 1, 12, 0)
    result = next_weekday(now, SATURDAY, dt.time(9, 0), "America/New_York")
    assert result == utc(2026, 3, 7, 14, 0)


# --- next_day_of_month -----------------------------------------------------------------------


def test_next_day_of_month_31_skips_short_months() -> None:
    now = utc(2026, 1, 1)
    fires = []
    for _ in range(8):
        now = next_day_of_month(now, 31, dt.time(9, 0))
        fires.append(now)
    assert fires == [
        utc(2026, 1, 31, 9, 0),
        utc(2026, 3, 31, 9, 0),
        utc(2026, 5, 31, 9, 0),
        utc(2026, 7, 31, 9, 0),
        utc(2026, 8, 31, 9, 0),
        utc(2026, 10, 31, 9, 0),
        utc(2026, 12, 31, 9, 0),
        utc(2027, 1, 31, 9, 0),
    ]


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (utc(2026, 1, 30), utc(2026, 3, 29, 9, 0)),  # 2026 is not a leap year
        (utc(2028, 1, 30), utc(2028, 2, 29, 9, 0)),
        (utc(2028, 2, 29, 9, 0), utc(2028, 3, 29, 9, 0)),
        (utc(2100, 1, 30), utc(2100, 3, 29, 9, 0)),  # divisible by 100, not by 400
        (utc(2000, 1, 30), utc(2000, 2, 29, 9, 0)),  # divisible by 400
    ],
)
def test_next_day_of_month_29_in_february(now: dt.datetime, expected: dt.datetime) -> None:
    assert next_day_of_month(now, 29, dt.time(9, 0)) == expected


@pytest.mark.parametrize(
    ("day", "now", "expected"),
    [
        (1, utc(2026, 5, 1, 8, 0), utc(2026, 5, 1, 9, 0)),
        (1, utc(2026, 5, 1, 9, 0), utc(2026, 6, 1, 9, 0)),  # exactly at the fire time
        (15, utc(2026, 12, 20), utc(2027, 1, 15, 9, 0)),
        (30, utc(2026, 1, 31), utc(2026, 3, 30, 9, 0)),
        (31, utc(2026, 4, 1), utc(2026, 5, 31, 9, 0)),
    ],
)
def test_next_day_of_month_utc(day: int, now: dt.datetime, expected: dt.datetime) -> None:
    assert next_day_of_month(now, day, dt.time(9, 0)) == expected


@pytest.mark.parametrize(
    ("tz", "now", "day", "at", "expected"),
    [
        # The 1st at 00:30 in Kolkata is 19:00Z on the last day of the previous month.
        ("Asia/Kolkata", utc(2026, 5, 15), 1, dt.time(0, 30), utc(2026, 5, 31, 19, 0)),
        ("Europe/Paris", utc(2026, 3, 1), 29, dt.time(2, 30), utc(2026, 3, 29, 1, 30)),
        ("Europe/Paris", utc(2026, 10, 1), 25, dt.time(2, 30), utc(2026, 10, 25, 0, 30)),
        ("America/New_York", utc(2026, 10, 15), 1, dt.time(9, 0), utc(2026, 11, 1, 14, 0)),
        ("Australia/Sydney", utc(2026, 3, 31), 5, dt.time(9, 0), utc(2026, 4, 4, 23, 0)),
    ],
)
def test_next_day_of_month_in_zone(
    tz: str, now: dt.datetime, day: int, at: dt.time, expected: dt.datetime
) -> None:
    assert next_day_of_month(now, day, at, tz) == expected


def test_next_day_of_month_skipped_month_end_fires_next_month() -> None:
    # Manila skipped 1844-12-31 by moving from -15:56:08 to +08:03:52, so the day-31 timer at
    # 09:00 fires shifted forward by a day, at 09:00 on 1845-01-01 (00:56:08Z), which is still
    # ahead at 05:00 local on that day.
    now = utc(1844, 12, 31, 20, 56, 8)
    result = next_day_of_month(now, 31, dt.time(9, 0), "Asia/Manila")
    assert result == utc(1845, 1, 1, 0, 56, 8)


# --- invalid arguments -----------------------------------------------------------------------


NEXT_FUNCTIONS: list[Callable[..., dt.datetime]] = [
    lambda now, at, tz: next_time_of_day(now, at, tz),
    lambda now, at, tz: next_weekday(now, MONDAY, at, tz),
    lambda now, at, tz: next_day_of_month(now, 1, at, tz),
]


@pytest.mark.parametrize("next_fire", NEXT_FUNCTIONS)
def test_next_rejects_naive_now(next_fire: Callable[..., dt.datetime]) -> None:
    with pytest.raises(DefinitionError, match="naive datetime"):
        next_fire(dt.datetime(2026, 5, 10, 8, 0), dt.time(9, 0), "UTC")


@pytest.mark.parametrize("next_fire", NEXT_FUNCTIONS)
def test_next_rejects_unknown_zone(next_fire: Callable[..., dt.datetime]) -> None:
    with pytest.raises(DefinitionError, match="'Mars/Base'"):
        next_fire(utc(2026, 5, 10), dt.time(9, 0), "Mars/Base")


@pytest.mark.parametrize("next_fire", NEXT_FUNCTIONS)
def test_next_rejects_aware_at(next_fire: Callable[..., dt.datetime]) -> None:
    with pytest.raises(DefinitionError, match="invalid time of day"):
        next_fire(utc(2026, 5, 10), dt.time(9, 0, tzinfo=dt.UTC), "UTC")


@pytest.mark.parametrize("day", [0, 32, -1, True, 1.0, "1"])
def test_next_day_of_month_rejects_invalid_day(day: Any) -> None:
    with pytest.raises(DefinitionError, match="invalid day of the month") as caught:
        next_day_of_month(utc(2026, 5, 10), day, dt.time(9, 0))
    assert repr(day) in str(caught.value)


@pytest.mark.parametrize("weekday", [7, -1, "someday"])
def test_next_weekday_rejects_invalid_weekday(weekday: Any) -> None:
    with pytest.raises(DefinitionError, match="invalid weekday"):
        next_weekday(utc(2026, 5, 10), weekday, dt.time(9, 0))


def test_next_time_of_day_past_year_9999_overflows() -> None:
    with pytest.raises(OverflowError):
        next_time_of_day(utc(9999, 12, 31, 10, 0), dt.time(9, 0))


def test_next_day_of_month_past_year_9999_overflows() -> None:
    with pytest.raises(OverflowError):
        next_day_of_month(utc(9999, 12, 31, 10, 0), 31, dt.time(9, 0))


# --- properties ------------------------------------------------------------------------------

# Zones with DST in either hemisphere, 30- and 45-minute offsets, a 30-minute DST shift
# (Lord_Howe), negative DST (Dublin), changes at midnight (Santiago, Havana), a move back
# across midnight (St_Johns until 2010), a skipped day (Apia, 2011) and offsets beyond +12:00
# (Chatham, Kiritimati).
ZONES = [
    "UTC",
    "Europe/Paris",
    "America/New_York",
    "Australia/Sydney",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "America/St_Johns",
    "Europe/Dublin",
    "America/Santiago",
    "America/Havana",
    "America/Sao_Paulo",
    "Africa/Casablanca",
    "Pacific/Apia",
    "Pacific/Chatham",
    "Pacific/Kiritimati",
]

FIRST_YEAR = 1950
LAST_YEAR = 2100


@functools.cache
def offset_changes(name: str, first_year: int, last_year: int) -> tuple[dt.datetime, ...]:
    """Find the instants at which ``name`` changes its UTC offset, to the second."""
    tzinfo = ZoneInfo(name)

    def offset_at(timestamp: int) -> dt.timedelta | None:
        return dt.datetime.fromtimestamp(timestamp, tzinfo).utcoffset()

    step = 12 * 3600
    timestamp = int(dt.datetime(first_year, 1, 1, tzinfo=dt.UTC).timestamp())
    end = int(dt.datetime(last_year + 1, 1, 1, tzinfo=dt.UTC).timestamp())
    changes = []
    while timestamp < end:
        if offset_at(timestamp) != offset_at(timestamp + step):
            low, high = timestamp, timestamp + step
            while high - low > 1:
                middle = (low + high) // 2
                if offset_at(middle) == offset_at(low):
                    low = middle
                else:
                    high = middle
            changes.append(dt.datetime.fromtimestamp(high, dt.UTC))
        timestamp += step
    return tuple(changes)


def wall_time(instant: dt.datetime, tzinfo: ZoneInfo) -> dt.datetime:
    return instant.astimezone(tzinfo).replace(tzinfo=None)


def expected_fire(day: dt.date, at: dt.time, tzinfo: ZoneInfo) -> tuple[dt.datetime, bool]:
    """Find the fire instant of ``at`` on local ``day`` by converting UTC instants to local time.

    This uses only the UTC-to-local direction, unlike the module under test. Every instant whose
    wall time is ``day`` at ``at`` is the wall time minus an offset that the zone uses within a
    day of it. The earliest such instant fires. When there is none, the wall time is in a gap
    and the fire is the candidate that lands just after it, which is the wall time shifted
    forward by the gap. Returns the fire instant and whether the wall time was in a gap.
    """
    naive = dt.datetime.combine(day, at.replace(fold=0))
    naive_as_utc = naive.replace(tzinfo=dt.UTC)
    offsets = set()
    for hours in range(-30, 31):
        offsets.add((naive_as_utc + dt.timedelta(hours=hours)).astimezone(tzinfo).utcoffset())
    candidates = sorted(naive_as_utc - offset for offset in offsets if offset is not None)
    exact = [instant for instant in candidates if wall_time(instant, tzinfo) == naive]
    if exact:
        return exact[0], False
    after = [instant for instant in candidates if wall_time(instant, tzinfo) > naive]
    return after[0], True


def expected_next(
    now: dt.datetime, tz: str, at: dt.time, matches: Callable[[dt.date], bool], span_days: int
) -> tuple[dt.datetime, dt.date, bool]:
    """Step local days around ``now`` and return the earliest matching fire after it.

    Returns the fire instant, the local day it belongs to and whether it was in a gap.
    """
    tzinfo = ZoneInfo(tz)
    start = now.astimezone(tzinfo).date() - dt.timedelta(days=2)
    fires = []
    for offset in range(span_days + 3):
        day = start + dt.timedelta(days=offset)
        if matches(day):
            instant, in_gap = expected_fire(day, at, tzinfo)
            if instant > now:
                fires.append((instant, day, in_gap))
    return min(fires)


def check_fire(
    result: dt.datetime,
    now: dt.datetime,
    tz: str,
    at: dt.time,
    matches: Callable[[dt.date], bool],
    span_days: int,
) -> None:
    expected, day, in_gap = expected_next(now, tz, at, matches, span_days)
    naive = dt.datetime.combine(day, at)
    assert result.tzinfo is dt.UTC
    assert result > now
    assert result - now <= dt.timedelta(days=span_days)
    assert result == expected, f"expected {expected} for local day {day}"
    if in_gap:
        assert wall_time(result, ZoneInfo(tz)) > naive
    else:
        assert wall_time(result, ZoneInfo(tz)) == naive


zone_names = st.sampled_from(ZONES)
times_of_day = st.times() | st.times(min_value=dt.time(0, 0), max_value=dt.time(4, 0))
instants = st.datetimes(
    min_value=dt.datetime(FIRST_YEAR, 1, 1),
    max_value=dt.datetime(LAST_YEAR, 12, 31),
    timezones=st.sampled_from([dt.UTC, *(ZoneInfo(name) for name in ZONES)]),
)


@st.composite
def instants_near_changes(draw: st.DrawFn) -> tuple[dt.datetime, str, dt.datetime]:
    """Draw a zone, an instant within three days of one of its offset changes, and the change."""
    name = draw(st.sampled_from([name for name in ZONES if offset_changes(name, 2005, 2030)]))
    change = draw(st.sampled_from(offset_changes(name, 2005, 2030)))
    shift = draw(st.timedeltas(min_value=-dt.timedelta(days=3), max_value=dt.timedelta(days=3)))
    return change + shift, name, change


def time_of_day_matches(day: dt.date) -> bool:
    return True


@PROPERTY_SETTINGS
@given(now=instants, tz=zone_names, at=times_of_day)
def test_next_time_of_day_property(now: dt.datetime, tz: str, at: dt.time) -> None:
    check_fire(next_time_of_day(now, at, tz), now, tz, at, time_of_day_matches, 2)


@PROPERTY_SETTINGS
@given(near_change=instants_near_changes(), at=times_of_day)
def test_next_time_of_day_property_near_changes(
    near_change: tuple[dt.datetime, str, dt.datetime], at: dt.time
) -> None:
    now, tz, _ = near_change
    check_fire(next_time_of_day(now, at, tz), now, tz, at, time_of_day_matches, 2)


@PROPERTY_SETTINGS
@given(now=instants, tz=zone_names, weekday=st.integers(0, 6), at=times_of_day)
def test_next_weekday_property(now: dt.datetime, tz: str, weekday: int, at: dt.time) -> None:
    result = next_weekday(now, weekday, at, tz)
    check_fire(result, now, tz, at, lambda day: day.weekday() == weekday, 8)


@PROPERTY_SETTINGS
@given(near_change=instants_near_changes(), weekday=st.integers(0, 6), at=times_of_day)
def test_next_weekday_property_near_changes(
    near_change: tuple[dt.datetime, str, dt.datetime], weekday: int, at: dt.time
) -> None:
    now, tz, _ = near_change
    result = next_weekday(now, weekday, at, tz)
    check_fire(result, now, tz, at, lambda day: day.weekday() == weekday, 8)


@PROPERTY_SETTINGS
@given(now=instants, tz=zone_names, day=st.integers(1, 31), at=times_of_day)
def test_next_day_of_month_property(now: dt.datetime, tz: str, day: int, at: dt.time) -> None:
    # The longest wait is 61 days, from day 31 of March or August to day 31 two months later.
    result = next_day_of_month(now, day, at, tz)
    check_fire(result, now, tz, at, lambda date: date.day == day, 63)


@PROPERTY_SETTINGS
@given(near_change=instants_near_changes(), at=times_of_day)
def test_next_day_of_month_property_near_changes(
    near_change: tuple[dt.datetime, str, dt.datetime], at: dt.time
) -> None:
    now, tz, change = near_change
    day = change.astimezone(ZoneInfo(tz)).day
    result = next_day_of_month(now, day, at, tz)
    check_fire(result, now, tz, at, lambda date: date.day == day, 63)


def test_offset_changes_finds_paris_2026() -> None:
    changes = offset_changes("Europe/Paris", 2026, 2026)
    assert changes == (utc(2026, 3, 29, 1, 0), utc(2026, 10, 25, 1, 0))
