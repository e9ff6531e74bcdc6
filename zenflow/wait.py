"""Durable waits: timers, events, and races between commands.

Each function returns a command for a workflow to yield::

    yield wait.for_(hours=1)                                   # returns None
    yield wait.until(dt.datetime(2027, 1, 4, 9, tzinfo=ZoneInfo("Europe/Paris")))
    yield wait.weekday("monday", "09:00", tz="America/New_York")
    event = yield wait.event("Delivered", timeout=dt.timedelta(days=7))
    if event is None: ...                                      # timed out
    winner = yield wait.first(ChargeCard(order), wait.for_(minutes=5))

Timers are rows in the engine's database with their fire instant, so they fire after an
engine restart, including those that came due while no engine ran. The fire instant of a
calendar rule is computed when the workflow first yields it, from the engine's clock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from zenflow import calendar, protocol
from zenflow.commands import EventWait, FirstOf, Timer
from zenflow.errors import DefinitionError

# Waits longer than this are almost surely a unit mistake, and an instant this far ahead
# could overflow datetime arithmetic.
MAX_WAIT = dt.timedelta(days=36_500)
MAX_EVENT_NAME_LENGTH = protocol.MAX_EVENT_NAME_LENGTH


def for_(
    duration: dt.timedelta | float | None = None,
    *,
    seconds: float = 0,
    minutes: float = 0,
    hours: float = 0,
    days: float = 0,
    weeks: float = 0,
) -> Timer:
    """Wait for a duration: a ``timedelta``, a number of seconds, or keyword units.

    Units add up: ``wait.for_(hours=1, minutes=30)`` waits 90 minutes.
    """
    total = _to_timedelta(duration, "duration") if duration is not None else dt.timedelta()
    units = {"seconds": seconds, "minutes": minutes, "hours": hours, "days": days, "weeks": weeks}
    for unit, amount in units.items():
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            raise DefinitionError(f"invalid wait.for_({unit}={amount!r}): use a number")
    try:
        total += dt.timedelta(seconds=seconds, minutes=minutes, hours=hours, days=days, weeks=weeks)
    except (TypeError, ValueError, OverflowError) as error:
        raise DefinitionError(f"invalid wait duration: {error}") from None
    _check_span(total, "wait.for_")
    return Timer({"kind": "duration", "seconds": total.total_seconds()})


def until(moment: dt.datetime) -> Timer:
    """Wait until an aware datetime; an instant in the past fires at once."""
    if not isinstance(moment, dt.datetime):
        raise DefinitionError(
            f"wait.until() takes a datetime, not {type(moment).__name__}: {moment!r}"
        )
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise DefinitionError(
            f"wait.until() got the naive datetime {moment.isoformat()}: give it a time zone, "
            "for example datetime(..., tzinfo=ZoneInfo('Europe/Paris')) or tzinfo=UTC"
        )
    try:
        instant = moment.astimezone(dt.UTC)
    except OverflowError:
        raise DefinitionError(
            f"wait.until() got {moment.isoformat()}, which is out of the range of UTC datetimes"
        ) from None
    return Timer({"kind": "until", "at": instant})


def at(time_of_day: dt.time | str, *, tz: str = "UTC") -> Timer:
    """Wait until the next time the clock in zone ``tz`` shows ``time_of_day`` ("09:30")."""
    clock = calendar.parse_time_of_day(time_of_day)
    calendar.zone(tz)
    return Timer({"kind": "time_of_day", "at": clock.isoformat(), "tz": tz})


def weekday(day: int | str, time_of_day: dt.time | str, *, tz: str = "UTC") -> Timer:
    """Wait until the next ``day`` ("monday" or 0 to 6) at ``time_of_day`` in zone ``tz``."""
    number = calendar.parse_weekday(day)
    clock = calendar.parse_time_of_day(time_of_day)
    calendar.zone(tz)
    return Timer({"kind": "weekday", "weekday": number, "at": clock.isoformat(), "tz": tz})


def day_of_month(day: int, time_of_day: dt.time | str, *, tz: str = "UTC") -> Timer:
    """Wait until the next ``day`` (1 to 31) of a month at ``time_of_day`` in zone ``tz``.

    Months without that day are skipped, as in cron: day 31 fires only in 31-day months.
    """
    if type(day) is not int or not 1 <= day <= 31:
        raise DefinitionError(f"invalid day of the month {day!r}: use 1 to 31")
    clock = calendar.parse_time_of_day(time_of_day)
    calendar.zone(tz)
    return Timer({"kind": "day_of_month", "day": day, "at": clock.isoformat(), "tz": tz})


def event(names: str | Iterable[str], *, timeout: dt.timedelta | float | None = None) -> EventWait:
    """Wait for the next event named ``names`` (one name or several).

    The ``yield`` returns an :class:`~zenflow.Event` (name, data, received_at), or None when
    ``timeout`` passed first. Events sent before the wait are kept in order and delivered to
    the next wait for their name.
    """
    if isinstance(names, str):
        listed: tuple[Any, ...] = (names,)
    elif isinstance(names, set | frozenset):
        # Sorted, because a set's order changes between processes and replay compares names.
        listed = tuple(sorted(names, key=str))
    else:
        listed = tuple(names)
    if not listed:
        raise DefinitionError("wait.event() needs at least one event name")
    for name in listed:
        check_event_name(name)
    joined = ",".join(dict.fromkeys(listed))
    if len(joined) > MAX_EVENT_NAME_LENGTH:
        raise DefinitionError(
            f"wait.event(): the names add up to {len(joined)} characters with their commas; "
            f"the limit is {MAX_EVENT_NAME_LENGTH}"
        )
    seconds = None
    if timeout is not None:
        span = _to_timedelta(timeout, "timeout")
        _check_span(span, "wait.event timeout")
        seconds = span.total_seconds()
    return EventWait(tuple(dict.fromkeys(listed)), seconds)


def first(*commands: Any) -> FirstOf:
    """Race tasks, child workflows, timers and event waits; the ``yield`` returns the winner.

    The result is a :class:`~zenflow.First` ``(position, value)``: the position of the first
    command to finish and its value. If that command failed, its error is raised at the
    ``yield``. Timers and event waits that lost are cancelled. Tasks and child workflows
    that lost go on, and their results are recorded but not sent to the workflow.
    """
    if len(commands) == 1 and isinstance(commands[0], list | tuple):
        commands = tuple(commands[0])
    if not commands:
        raise DefinitionError("wait.first() needs at least one command")
    return FirstOf(tuple(commands))


def check_event_name(name: Any) -> str:
    """Return ``name`` if it is a valid event name, else raise DefinitionError."""
    problem = protocol.event_name_problem(name)
    if problem is not None:
        raise DefinitionError(f"invalid event name {name!r}: {problem}")
    return str(name)


def fire_time(rule: dict[str, Any], now: dt.datetime) -> dt.datetime:
    """Return the instant at which a timer with ``rule``, set at ``now``, fires."""
    kind = rule["kind"]
    if kind == "duration":
        return now + dt.timedelta(seconds=rule["seconds"])
    if kind == "until":
        moment: dt.datetime = rule["at"]
        return moment.astimezone(dt.UTC)
    clock = dt.time.fromisoformat(rule["at"])
    zone = rule.get("tz", "UTC")
    if kind == "time_of_day":
        return calendar.next_time_of_day(now, clock, zone)
    if kind == "weekday":
        return calendar.next_weekday(now, rule["weekday"], clock, zone)
    if kind == "day_of_month":
        return calendar.next_day_of_month(now, rule["day"], clock, zone)
    raise DefinitionError(f"unknown timer rule {rule!r}")


def _to_timedelta(value: Any, what: str) -> dt.timedelta:
    if isinstance(value, dt.timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return dt.timedelta(seconds=value)
        except (ValueError, OverflowError):
            pass
    raise DefinitionError(
        f"invalid {what} {value!r}: use a datetime.timedelta or a number of seconds"
    )


def _check_span(span: dt.timedelta, what: str) -> None:
    if span < dt.timedelta():
        raise DefinitionError(
            f"{what}: negative duration of {span.total_seconds():g} seconds; use zero or more"
        )
    if span > MAX_WAIT:
        raise DefinitionError(f"{what}: {span} is longer than the limit of {MAX_WAIT.days} days")
