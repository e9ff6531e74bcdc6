"""Next fire instants of calendar timers, such as "next Monday at 09:00 in Europe/Paris".

A timer names a wall-clock time of day in an IANA time zone, optionally restricted to a weekday
or a day of the month. The ``next_*`` functions return the first matching instant strictly after
``now`` as an aware datetime in UTC, so a replayed workflow computes the same instant on every
host. A timer fires at most once per matching local day, with two rules for daylight-saving
changes:

- A wall time that the clock skips that day (02:30 on the day Europe/Paris moves from 02:00
  to 03:00) fires shifted forward by the length of the gap: 03:30 local, which is 01:30 UTC.
- A wall time that occurs twice that day (02:30 on the day Europe/Paris moves from 03:00 back
  to 02:00) fires at its first occurrence only, the one with ``fold=0``.
"""

from __future__ import annotations

import calendar
import datetime as dt
import functools
import itertools
import re
import zoneinfo
from collections.abc import Iterator

from zenflow.errors import DefinitionError

_WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

_TIME_OF_DAY = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?")


def parse_time_of_day(value: dt.time | str) -> dt.time:
    """Parse a time of day given as a naive ``datetime.time`` or as "HH:MM" or "HH:MM:SS".

    Text uses the 24-hour clock with two digits per field, so "09:00" is valid and "9:00" is
    not. The result has ``fold=0`` because the timer rules, not the value, pick between the two
    occurrences of an ambiguous wall time. Raises DefinitionError for any other value,
    including a time with a tzinfo, since the time zone is a separate argument of the timer.
    """
    if isinstance(value, dt.time):
        if value.tzinfo is not None:
            raise DefinitionError(
                f"invalid time of day {value!r}: it has tzinfo {value.tzinfo!r}, but a timer "
                "takes a naive time and the time zone as a separate argument"
            )
        return value.replace(fold=0)
    if isinstance(value, str):
        match = _TIME_OF_DAY.fullmatch(value)
        if match is not None:
            hour, minute, second = match.groups()
            return dt.time(int(hour), int(minute), int(second or 0))
    raise DefinitionError(
        f"invalid time of day {value!r}: expected a naive datetime.time or text "
        '"HH:MM" or "HH:MM:SS" on the 24-hour clock, such as "09:00" or "17:30:15"'
    )


def parse_weekday(value: int | str) -> int:
    """Parse a weekday into 0 for Monday through 6 for Sunday, like ``date.weekday()``.

    Accepts an int from 0 to 6, or an English day name in full or as its 3-letter
    abbreviation, in any case ("Monday", "mon", "MON"). Raises DefinitionError otherwise.
    """
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 6:
        return value
    if isinstance(value, str):
        text = value.lower()
        for number, name in enumerate(_WEEKDAY_NAMES):
            if text in (name, name[:3]):
                return number
    raise DefinitionError(
        f"invalid weekday {value!r}: expected an int from 0 (Monday) to 6 (Sunday), "
        'or an English day name or its 3-letter abbreviation, such as "Monday" or "mon"'
    )


@functools.cache
def _available_zones() -> frozenset[str]:
    # "localtime" is a link to the host's own zone on Debian-based systems, so the same
    # workflow would fire at different instants on different hosts.
    return frozenset(zoneinfo.available_timezones() - {"localtime"})


def zone(name: str) -> zoneinfo.ZoneInfo:
    """Load the IANA time zone ``name``, such as "Europe/Paris".

    Only names that ``zoneinfo.available_timezones()`` lists are accepted, which excludes
    the leap-second "right/..." variants and file paths. Raises DefinitionError for any
    other name.
    """
    available = _available_zones()
    if isinstance(name, str) and name in available:
        return zoneinfo.ZoneInfo(name)
    message = f'unknown time zone {name!r}: use an IANA name such as "Europe/Paris"'
    if not available:
        message += ". No time zone database was found, so install the tzdata package"
    raise DefinitionError(message)


def next_time_of_day(now: dt.datetime, at: dt.time, tz: str = "UTC") -> dt.datetime:
    """Return the first instant after ``now`` when the wall clock in ``tz`` shows ``at``.

    ``now`` must be aware. The result is in UTC and strictly after ``now``, so ``now`` itself
    never matches. A wall time skipped by a daylight-saving change fires shifted forward by
    the length of the gap. A wall time that occurs twice fires at its first occurrence only
    (``fold=0``). Raises DefinitionError for invalid arguments, and OverflowError when the
    result would fall after year 9999.
    """
    local_today = _local_date(now, tz)
    days = (local_today + dt.timedelta(days=offset) for offset in itertools.count(-1))
    return _first_fire_after(now, days, at, tz)


def next_weekday(now: dt.datetime, weekday: int, at: dt.time, tz: str = "UTC") -> dt.datetime:
    """Return the first instant after ``now`` that is ``at`` on ``weekday`` in ``tz``.

    ``weekday`` runs from 0 for Monday to 6 for Sunday, as returned by :func:`parse_weekday`.
    The other rules, including those for daylight-saving changes, are those of
    :func:`next_time_of_day`. The result is at most 7 days after ``now``, plus the size of any
    change of the zone's UTC offset in between.
    """
    weekday = parse_weekday(weekday)
    local_today = _local_date(now, tz)
    start = local_today - dt.timedelta(days=1)
    first = start + dt.timedelta(days=(weekday - start.weekday()) % 7)
    days = (first + dt.timedelta(weeks=week) for week in itertools.count())
    return _first_fire_after(now, days, at, tz)


def next_day_of_month(now: dt.datetime, day: int, at: dt.time, tz: str = "UTC") -> dt.datetime:
    """Return the first instant after ``now`` that is ``at`` on day ``day`` of a month in ``tz``.

    ``day`` runs from 1 to 31. Months without that day are skipped, as cron does: day 31 fires
    only in the seven months that have 31 days, and day 29 skips February outside leap years.
    The other rules, including those for daylight-saving changes, are those of
    :func:`next_time_of_day`.
    """
    if not isinstance(day, int) or isinstance(day, bool) or not 1 <= day <= 31:
        raise DefinitionError(f"invalid day of the month {day!r}: expected an int from 1 to 31")
    start = _local_date(now, tz) - dt.timedelta(days=1)
    return _first_fire_after(now, _days_of_month(start.year, start.month, day), at, tz)


def _local_date(now: dt.datetime, tz: str) -> dt.date:
    if now.tzinfo is None or now.utcoffset() is None:
        raise DefinitionError(
            f"invalid now {now!r}: a naive datetime is not an instant, so pass an aware one "
            "such as datetime.now(datetime.UTC)"
        )
    return now.astimezone(zone(tz)).date()


def _first_fire_after(
    now: dt.datetime, days: Iterator[dt.date], at: dt.time, tz: str
) -> dt.datetime:
    """Return the fire instant of the first of ``days`` whose fire instant is after ``now``.

    ``days`` must be endless, ascending, and start no later than the day before ``now``'s local
    date. That day can still fire after ``now`` when its wall time falls in a gap that spans
    midnight: America/Toronto moved from 23:30 to 00:30 on 1919-03-30, so 23:45 that day fired
    at 00:45 on the 31st. Fire instants never decrease from one day to the next because no zone
    in the tz database (2025b) has changed its offset by more than a day at once, so the first
    fire after ``now`` is the earliest.
    """
    at = parse_time_of_day(at)
    tzinfo = zone(tz)
    for day in days:
        # With fold=0, zoneinfo applies the offset in effect before a transition (PEP 495).
        # That gives the first occurrence of a repeated wall time and moves a skipped wall
        # time forward by the length of the gap. The comparison happens in UTC because Python
        # compares two datetimes that share a tzinfo by wall time, ignoring fold.
        fire = dt.datetime.combine(day, at, tzinfo=tzinfo).astimezone(dt.UTC)
        if fire > now:
            return fire
    raise AssertionError("unreachable, because days is an endless iterator")


def _days_of_month(year: int, month: int, day: int) -> Iterator[dt.date]:
    """Yield day ``day`` of each month from ``year``-``month`` on, skipping months without it."""
    while True:
        if year > dt.MAXYEAR:
            raise OverflowError(f"no day {day} of a month is left before year {dt.MAXYEAR + 1}")
        if day <= calendar.monthrange(year, month)[1]:
            yield dt.date(year, month, day)
        year, month = divmod(year * 12 + month, 12)
        month += 1
