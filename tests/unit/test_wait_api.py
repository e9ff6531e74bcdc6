"""Tests for zenflow.wait (commands and fire instants) and the run requests of zenflow.protocol.

Calendar rules are checked against :mod:`zenflow.calendar`, which has its own tests, so these
tests only check that each rule reaches the right calendar function with the right fields.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Callable
from typing import Any, cast

import pytest

from zenflow import calendar, serializer, wait
from zenflow.commands import EventWait, FirstOf, TaskCall, Timer
from zenflow.errors import DefinitionError
from zenflow.protocol import (
    JSON_CONTENT_TYPE,
    MAX_BUSINESS_ID_LENGTH,
    MAX_COUNTER,
    MAX_EVENT_NAME_LENGTH,
    MAX_REASON_LENGTH,
    MSGPACK_CONTENT_TYPE,
    ControlRequest,
    EventRequest,
    InvalidMessage,
    RunTarget,
    StartRequest,
    decode_body,
    parse_request,
)

PARIS = "Europe/Paris"
CHARGE = TaskCall("Charge", "payments", ("A-17",))


def seconds_of(timer: Timer) -> float:
    assert timer.rule["kind"] == "duration"
    seconds: float = timer.rule["seconds"]
    return seconds


# wait.for_()


@pytest.mark.parametrize(
    ("duration", "units", "expected"),
    [
        (None, {"hours": 1, "minutes": 30}, 5400.0),
        (None, {"weeks": 1, "days": 1}, 8 * 86_400.0),
        (None, {"seconds": 0.5, "minutes": 1}, 60.5),
        (None, {"days": 1.5}, 129_600.0),
        (dt.timedelta(minutes=1), {"seconds": 30}, 90.0),
        (90, {}, 90.0),
        (2.5, {"seconds": 2.5}, 5.0),
        (dt.timedelta(hours=2), {}, 7200.0),
        (None, {}, 0.0),
    ],
)
def test_for_adds_up_units(
    duration: dt.timedelta | float | None, units: dict[str, float], expected: float
) -> None:
    assert seconds_of(wait.for_(duration, **units)) == expected


def test_for_accepts_maximum_wait() -> None:
    timer = wait.for_(wait.MAX_WAIT)

    assert seconds_of(timer) == wait.MAX_WAIT.total_seconds()


def test_for_rule_is_a_timer() -> None:
    timer = wait.for_(minutes=5)

    assert timer == Timer({"kind": "duration", "seconds": 300.0})


INVALID_DURATIONS: list[Any] = [
    pytest.param(lambda: wait.for_(-1), "negative duration", id="negative-seconds"),
    pytest.param(
        lambda: wait.for_(dt.timedelta(microseconds=-1)), "negative duration", id="negative-delta"
    ),
    pytest.param(lambda: wait.for_(minutes=-5), "negative duration", id="negative-unit"),
    pytest.param(
        lambda: wait.for_(wait.MAX_WAIT + dt.timedelta(microseconds=1)),
        "longer than the limit",
        id="just-over-limit",
    ),
    pytest.param(lambda: wait.for_(days=40_000), "longer than the limit", id="too-many-days"),
    pytest.param(lambda: wait.for_(weeks=1e9), "invalid wait duration", id="overflowing-unit"),
    pytest.param(
        lambda: wait.for_(dt.timedelta.max, days=1), "invalid wait duration", id="overflowing-sum"
    ),
    pytest.param(lambda: wait.for_(math.nan), "invalid duration nan", id="nan-duration"),
    pytest.param(lambda: wait.for_(math.inf), "invalid duration inf", id="infinite-duration"),
    pytest.param(lambda: wait.for_(seconds=math.nan), "invalid wait duration", id="nan-unit"),
    pytest.param(lambda: wait.for_(True), "invalid duration True", id="bool-duration"),
    pytest.param(lambda: wait.for_(cast(Any, "5")), "invalid duration '5'", id="text-duration"),
    pytest.param(
        lambda: wait.for_(seconds=cast(Any, "5")), "invalid wait.for_(seconds='5')", id="text-unit"
    ),
    pytest.param(lambda: wait.for_(cast(Any, [1])), "invalid duration [1]", id="list-duration"),
]


@pytest.mark.parametrize(("make", "message"), INVALID_DURATIONS)
def test_for_rejects_invalid_duration(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("unit", ["seconds", "minutes", "hours", "days", "weeks"])
def test_for_rejects_bool_unit(unit: str) -> None:
    # A bool is not a duration: wait.for_(True) is rejected, so wait.for_(hours=True) must be
    # rejected too instead of waiting one hour.
    with pytest.raises(DefinitionError):
        wait.for_(**{unit: True})


# wait.until(), wait.at(), wait.weekday(), wait.day_of_month()


def test_until_stores_utc_instant() -> None:
    paris_summer = dt.timezone(dt.timedelta(hours=2))
    moment = dt.datetime(2026, 5, 4, 11, 0, tzinfo=paris_summer)

    rule = wait.until(moment).rule

    assert rule == {"kind": "until", "at": dt.datetime(2026, 5, 4, 9, 0, tzinfo=dt.UTC)}
    assert rule["at"].utcoffset() == dt.timedelta(0)


def test_until_same_instant_gives_same_payload() -> None:
    utc = wait.until(dt.datetime(2026, 5, 4, 9, 0, tzinfo=dt.UTC))
    paris = wait.until(dt.datetime(2026, 5, 4, 11, 0, tzinfo=calendar.zone(PARIS)))

    assert serializer.encode(paris.rule) == serializer.encode(utc.rule)


class NoOffset(dt.tzinfo):
    """A tzinfo whose utcoffset() is None, which makes a datetime naive."""

    def utcoffset(self, moment: dt.datetime | None) -> dt.timedelta | None:
        return None

    def dst(self, moment: dt.datetime | None) -> dt.timedelta | None:
        return None

    def tzname(self, moment: dt.datetime | None) -> str | None:
        return None


@pytest.mark.parametrize(
    ("moment", "message"),
    [
        pytest.param(dt.datetime(2026, 5, 4, 9, 0), "naive datetime", id="naive"),
        pytest.param(
            dt.datetime(2026, 5, 4, 9, 0, tzinfo=NoOffset()), "naive datetime", id="no-offset"
        ),
        pytest.param(dt.date(2026, 5, 4), "takes a datetime, not date", id="date"),
        pytest.param("2026-05-04T09:00:00Z", "takes a datetime, not str", id="text"),
        pytest.param(1_777_885_200, "takes a datetime, not int", id="timestamp"),
    ],
)
def test_until_rejects_invalid_moment(moment: Any, message: str) -> None:
    with pytest.raises(DefinitionError, match=re.escape(message)):
        wait.until(moment)


def test_calendar_rules_store_normalized_fields() -> None:
    assert wait.at("09:30").rule == {"kind": "time_of_day", "at": "09:30:00", "tz": "UTC"}
    assert wait.weekday("Mon", dt.time(9), tz=PARIS).rule == {
        "kind": "weekday",
        "weekday": 0,
        "at": "09:00:00",
        "tz": PARIS,
    }
    assert wait.day_of_month(31, "17:30:15", tz=PARIS).rule == {
        "kind": "day_of_month",
        "day": 31,
        "at": "17:30:15",
        "tz": PARIS,
    }


INVALID_CALENDAR_RULES: list[Any] = [
    pytest.param(lambda: wait.at("9:00"), "invalid time of day", id="at-one-digit-hour"),
    pytest.param(lambda: wait.at("24:00"), "invalid time of day", id="at-hour-24"),
    pytest.param(lambda: wait.at("09:60"), "invalid time of day", id="at-minute-60"),
    pytest.param(lambda: wait.at(cast(Any, 9)), "invalid time of day", id="at-int"),
    pytest.param(
        lambda: wait.at(dt.time(9, tzinfo=dt.UTC)), "invalid time of day", id="at-aware-time"
    ),
    pytest.param(lambda: wait.at("09:00", tz="Mars/Olympus"), "unknown time zone", id="at-zone"),
    pytest.param(lambda: wait.at("09:00", tz="localtime"), "unknown time zone", id="localtime"),
    pytest.param(lambda: wait.at("09:00", tz=""), "unknown time zone", id="at-empty-zone"),
    pytest.param(
        lambda: wait.at("09:00", tz=cast(Any, None)), "unknown time zone", id="at-zone-none"
    ),
    pytest.param(lambda: wait.weekday(7, "09:00"), "invalid weekday", id="weekday-7"),
    pytest.param(lambda: wait.weekday(-1, "09:00"), "invalid weekday", id="weekday-negative"),
    pytest.param(lambda: wait.weekday(True, "09:00"), "invalid weekday", id="weekday-bool"),
    pytest.param(lambda: wait.weekday("funday", "09:00"), "invalid weekday", id="weekday-name"),
    pytest.param(
        lambda: wait.weekday(cast(Any, 0.0), "09:00"), "invalid weekday", id="weekday-float"
    ),
    pytest.param(lambda: wait.weekday(0, "noon"), "invalid time of day", id="weekday-time"),
    pytest.param(
        lambda: wait.weekday(0, "09:00", tz="Europe/Pariss"), "unknown time zone", id="weekday-tz"
    ),
    pytest.param(lambda: wait.day_of_month(0, "09:00"), "day of the month", id="day-0"),
    pytest.param(lambda: wait.day_of_month(32, "09:00"), "day of the month", id="day-32"),
    pytest.param(lambda: wait.day_of_month(True, "09:00"), "day of the month", id="day-bool"),
    pytest.param(
        lambda: wait.day_of_month(cast(Any, 1.0), "09:00"), "day of the month", id="day-float"
    ),
    pytest.param(
        lambda: wait.day_of_month(cast(Any, "1"), "09:00"), "day of the month", id="day-text"
    ),
    pytest.param(lambda: wait.day_of_month(1, "25:00"), "invalid time of day", id="day-time"),
    pytest.param(
        lambda: wait.day_of_month(1, "09:00", tz="UTC+1"), "unknown time zone", id="day-tz"
    ),
]


@pytest.mark.parametrize(("make", "message"), INVALID_CALENDAR_RULES)
def test_calendar_rule_rejects_invalid_field(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=re.escape(message)):
        make()


# wait.event(), check_event_name(), wait.first()


def test_event_with_one_name() -> None:
    assert wait.event("Delivered") == EventWait(("Delivered",), None)


def test_event_with_names_drops_duplicates_in_order() -> None:
    waited = wait.event(["Lost", "Delivered", "Lost"])

    assert waited.names == ("Lost", "Delivered")


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [(60, 60.0), (0.5, 0.5), (dt.timedelta(days=7), 604_800.0), (0, 0.0)],
)
def test_event_timeout_in_seconds(timeout: dt.timedelta | float, expected: float) -> None:
    assert wait.event("Delivered", timeout=timeout).timeout == expected


def test_event_name_at_maximum_length_is_accepted() -> None:
    name = "e" * MAX_EVENT_NAME_LENGTH

    assert wait.event(name).names == (name,)


INVALID_EVENT_NAMES: list[Any] = [
    pytest.param("", id="empty"),
    pytest.param("e" * (MAX_EVENT_NAME_LENGTH + 1), id="too-long"),
    pytest.param("Delivered\n", id="newline"),
    pytest.param("Deli\x00vered", id="nul"),
    pytest.param("Deli\u2028vered", id="line-separator"),
    pytest.param("Delivered,Lost", id="comma"),
    pytest.param(5, id="int"),
    pytest.param(None, id="none"),
    pytest.param(b"Delivered", id="bytes"),
]


@pytest.mark.parametrize("name", INVALID_EVENT_NAMES)
def test_check_event_name_rejects(name: Any) -> None:
    with pytest.raises(DefinitionError, match="invalid event name"):
        wait.check_event_name(name)


@pytest.mark.parametrize("name", INVALID_EVENT_NAMES)
def test_event_rejects_invalid_name_in_list(name: Any) -> None:
    with pytest.raises(DefinitionError, match="invalid event name"):
        wait.event(["Delivered", name])


def test_check_event_name_returns_valid_name() -> None:
    assert wait.check_event_name("Order shipped") == "Order shipped"


@pytest.mark.parametrize("names", [[], (), iter(())])
def test_event_rejects_no_names(names: Any) -> None:
    with pytest.raises(DefinitionError, match="at least one event name"):
        wait.event(names)


@pytest.mark.parametrize(
    ("timeout", "message"),
    [
        pytest.param(-1, "negative duration", id="negative"),
        pytest.param(math.nan, "invalid timeout nan", id="nan"),
        pytest.param(True, "invalid timeout True", id="bool"),
        pytest.param("60", "invalid timeout '60'", id="text"),
        pytest.param(wait.MAX_WAIT + dt.timedelta(seconds=1), "longer than", id="too-long"),
    ],
)
def test_event_rejects_invalid_timeout(timeout: Any, message: str) -> None:
    with pytest.raises(DefinitionError, match=re.escape(message)):
        wait.event("Delivered", timeout=timeout)


def test_first_keeps_commands_in_order() -> None:
    timer = wait.for_(minutes=5)
    delivered = wait.event("Delivered")

    raced = wait.first(CHARGE, timer, delivered)

    assert raced == FirstOf((CHARGE, timer, delivered))


def test_first_accepts_one_list() -> None:
    timer = wait.for_(minutes=5)

    assert wait.first([CHARGE, timer]) == wait.first(CHARGE, timer)


@pytest.mark.parametrize("commands", [(), ([],), ((),)])
def test_first_rejects_no_commands(commands: tuple[Any, ...]) -> None:
    with pytest.raises(DefinitionError, match="at least one command"):
        wait.first(*commands)


# fire_time()

NOWS = [
    dt.datetime(2026, 3, 2, 8, 0, tzinfo=dt.UTC),
    # Half an hour before Europe/Paris skips from 02:00 to 03:00 local time.
    dt.datetime(2026, 3, 29, 0, 30, tzinfo=dt.UTC),
    # Given in a zone other than UTC, on the last day of a month.
    dt.datetime(2026, 1, 31, 23, 59, 59, tzinfo=calendar.zone("America/New_York")),
]


@pytest.mark.parametrize("now", NOWS)
def test_fire_time_of_duration(now: dt.datetime) -> None:
    rule = wait.for_(hours=1, seconds=0.25).rule

    assert wait.fire_time(rule, now) == now + dt.timedelta(hours=1, milliseconds=250)


@pytest.mark.parametrize("now", NOWS)
def test_fire_time_of_until_is_the_instant(now: dt.datetime) -> None:
    moment = dt.datetime(2026, 5, 4, 11, 0, tzinfo=calendar.zone(PARIS))

    fired = wait.fire_time(wait.until(moment).rule, now)

    assert fired == moment
    assert fired.utcoffset() == dt.timedelta(0)


def test_fire_time_of_past_until_is_in_past() -> None:
    now = NOWS[0]
    moment = now - dt.timedelta(days=1)

    assert wait.fire_time(wait.until(moment).rule, now) == moment


CALENDAR_CASES: list[Any] = [
    pytest.param(
        wait.at("09:00", tz=PARIS),
        lambda now: calendar.next_time_of_day(now, dt.time(9), PARIS),
        id="time-of-day",
    ),
    pytest.param(
        wait.at("02:30", tz=PARIS),
        lambda now: calendar.next_time_of_day(now, dt.time(2, 30), PARIS),
        id="time-of-day-in-gap",
    ),
    pytest.param(
        wait.at("00:00"),
        lambda now: calendar.next_time_of_day(now, dt.time(0), "UTC"),
        id="time-of-day-utc",
    ),
    pytest.param(
        wait.weekday("sunday", "02:30:15", tz=PARIS),
        lambda now: calendar.next_weekday(now, 6, dt.time(2, 30, 15), PARIS),
        id="weekday",
    ),
    pytest.param(
        wait.weekday(0, "09:00", tz="America/New_York"),
        lambda now: calendar.next_weekday(now, 0, dt.time(9), "America/New_York"),
        id="weekday-new-york",
    ),
    pytest.param(
        wait.day_of_month(31, "09:00", tz=PARIS),
        lambda now: calendar.next_day_of_month(now, 31, dt.time(9), PARIS),
        id="day-31",
    ),
    pytest.param(
        wait.day_of_month(1, "00:00", tz="Australia/Sydney"),
        lambda now: calendar.next_day_of_month(now, 1, dt.time(0), "Australia/Sydney"),
        id="day-1-sydney",
    ),
]


@pytest.mark.parametrize("now", NOWS)
@pytest.mark.parametrize(("timer", "oracle"), CALENDAR_CASES)
def test_fire_time_of_calendar_rule(
    timer: Timer, oracle: Callable[[dt.datetime], dt.datetime], now: dt.datetime
) -> None:
    assert wait.fire_time(timer.rule, now) == oracle(now)


@pytest.mark.parametrize("now", NOWS)
@pytest.mark.parametrize(("timer", "oracle"), CALENDAR_CASES)
def test_fire_time_of_stored_rule(
    timer: Timer, oracle: Callable[[dt.datetime], dt.datetime], now: dt.datetime
) -> None:
    # The engine computes the fire instant from the rule it decoded from the step's payload.
    stored = serializer.decode(serializer.encode(timer.rule))

    assert wait.fire_time(stored, now) == oracle(now)


def test_fire_time_of_stored_until_rule() -> None:
    moment = dt.datetime(2026, 5, 4, 11, 0, tzinfo=calendar.zone(PARIS))
    stored = serializer.decode(serializer.encode(wait.until(moment).rule))

    assert wait.fire_time(stored, NOWS[0]) == moment


def test_fire_time_weekday_spot_value() -> None:
    # Monday 2026-03-02 08:00 UTC is 09:00 in Paris, so Monday 09:00 Paris is a week later.
    fired = wait.fire_time(wait.weekday("monday", "09:00", tz=PARIS).rule, NOWS[0])

    assert fired == dt.datetime(2026, 3, 9, 8, 0, tzinfo=dt.UTC)


def test_fire_time_rejects_unknown_rule() -> None:
    with pytest.raises(DefinitionError, match="unknown timer rule"):
        wait.fire_time({"kind": "cron", "at": "09:00:00", "tz": "UTC"}, NOWS[0])


# Event and control requests.


def event_body(**fields: Any) -> dict[str, Any]:
    return {"version": 1, "type": "event", "run_id": "run-1", "name": "Delivered", **fields}


def control_body(action: str, **fields: Any) -> dict[str, Any]:
    return {"version": 1, "type": action, "run_id": "run-1", **fields}


def start_body(**fields: Any) -> dict[str, Any]:
    return {"version": 1, "type": "start", "workflow": "Checkout", **fields}


def parse_error(body: Any) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as caught:
        parse_request(body)
    return caught.value


def test_event_request_by_run_id() -> None:
    request = parse_request(event_body(data={"by": "courier", "at": [1, 2]}))

    assert request == EventRequest(
        RunTarget(run_id="run-1"), "Delivered", {"by": "courier", "at": [1, 2]}
    )


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ({"business_id": "order-17"}, RunTarget(business_id="order-17")),
        ({"run": "order-17"}, RunTarget(run="order-17")),
        ({"run": "run-1", "business_id": "order-17"}, RunTarget(None, "order-17", "run-1")),
    ],
)
def test_event_request_by_other_target(target: dict[str, str], expected: RunTarget) -> None:
    body = {"version": 1, "type": "event", "name": "Delivered", **target}

    request = parse_request(body)

    assert isinstance(request, EventRequest)
    assert request.target == expected


def test_event_request_without_data_has_none() -> None:
    request = parse_request(event_body())

    assert isinstance(request, EventRequest)
    assert request.data is None


def test_event_name_at_maximum_length_is_parsed() -> None:
    name = "e" * MAX_EVENT_NAME_LENGTH

    request = parse_request(event_body(name=name))

    assert isinstance(request, EventRequest)
    assert request.name == name


INVALID_EVENT_REQUESTS: list[Any] = [
    pytest.param(event_body(name=None), "missing_field", "name", id="name-missing"),
    pytest.param(event_body(name=""), "invalid_field", "name", id="name-empty"),
    pytest.param(
        event_body(name="e" * (MAX_EVENT_NAME_LENGTH + 1)),
        "invalid_field",
        "name",
        id="name-too-long",
    ),
    pytest.param(event_body(name="Delivered,Lost"), "invalid_field", "name", id="name-comma"),
    pytest.param(event_body(name="Deli\nvered"), "invalid_field", "name", id="name-newline"),
    pytest.param(event_body(name=7), "invalid_field", "name", id="name-int"),
    pytest.param(event_body(run_id=None), "missing_field", "run_id", id="no-target"),
    pytest.param(event_body(run_id="run 1"), "invalid_field", "run_id", id="run-id-space"),
    pytest.param(event_body(run_id="r" * 65), "invalid_field", "run_id", id="run-id-too-long"),
    pytest.param(
        event_body(run_id=None, business_id="b" * (MAX_BUSINESS_ID_LENGTH + 1)),
        "invalid_field",
        "business_id",
        id="business-id-too-long",
    ),
    pytest.param(
        event_body(run_id=None, business_id="order\x001"),
        "invalid_field",
        "business_id",
        id="business-id-nul",
    ),
    pytest.param(event_body(run_id=None, run=""), "invalid_field", "run", id="run-empty"),
    pytest.param(
        event_body(run_id=None, run="r" * (MAX_BUSINESS_ID_LENGTH + 1)),
        "invalid_field",
        "run",
        id="run-too-long",
    ),
    pytest.param(event_body(run_id=None, run=5), "invalid_field", "run", id="run-int"),
]


@pytest.mark.parametrize(("body", "code", "field"), INVALID_EVENT_REQUESTS)
def test_invalid_event_request_is_rejected(body: dict[str, Any], code: str, field: str) -> None:
    error = parse_error(body)

    assert error.code == code
    assert error.field == field


@pytest.mark.parametrize("action", ["kill", "pause", "resume"])
def test_control_request_of_each_action(action: str) -> None:
    request = parse_request(control_body(action, by="ops@example.com", reason="stuck\nfor days"))

    assert request == ControlRequest(
        action, RunTarget(run_id="run-1"), by="ops@example.com", reason="stuck\nfor days"
    )


@pytest.mark.parametrize("action", ["kill", "pause", "resume"])
def test_control_request_without_by_or_reason(action: str) -> None:
    request = parse_request({"version": 1, "type": action, "business_id": "order-17"})

    assert request == ControlRequest(action, RunTarget(business_id="order-17"))


def test_reason_at_maximum_length_is_accepted() -> None:
    reason = "r" * MAX_REASON_LENGTH

    request = parse_request(control_body("kill", reason=reason))

    assert isinstance(request, ControlRequest)
    assert request.reason == reason


def test_by_at_maximum_length_is_accepted() -> None:
    by = "b" * MAX_BUSINESS_ID_LENGTH

    request = parse_request(control_body("pause", by=by))

    assert isinstance(request, ControlRequest)
    assert request.by == by


INVALID_CONTROL_REQUESTS: list[Any] = [
    pytest.param(
        control_body("kill", reason="r" * (MAX_REASON_LENGTH + 1)),
        "invalid_field",
        "reason",
        id="reason-too-long",
    ),
    pytest.param(control_body("kill", reason=5), "invalid_field", "reason", id="reason-int"),
    pytest.param(control_body("kill", reason=["x"]), "invalid_field", "reason", id="reason-list"),
    pytest.param(
        control_body("pause", by="b" * (MAX_BUSINESS_ID_LENGTH + 1)),
        "invalid_field",
        "by",
        id="by-too-long",
    ),
    pytest.param(control_body("pause", by=""), "invalid_field", "by", id="by-empty"),
    pytest.param(control_body("pause", by="ops\n"), "invalid_field", "by", id="by-newline"),
    pytest.param(control_body("pause", by=3), "invalid_field", "by", id="by-int"),
    pytest.param(control_body("resume", run_id=None), "missing_field", "run_id", id="no-target"),
    pytest.param(control_body("resume", run_id="a/b"), "invalid_field", "run_id", id="run-id"),
    pytest.param(control_body("kill", version=2), "unsupported_version", "version", id="version"),
]


@pytest.mark.parametrize(("body", "code", "field"), INVALID_CONTROL_REQUESTS)
def test_invalid_control_request_is_rejected(body: dict[str, Any], code: str, field: str) -> None:
    error = parse_error(body)

    assert error.code == code
    assert error.field == field


def test_run_target_text_prefers_run_id() -> None:
    assert RunTarget(run_id="run-1", business_id="order-17").text == "run-1"
    assert RunTarget(business_id="order-17", run="x").text == "order-17"
    assert RunTarget(run="order-17").text == "order-17"


def test_run_target_fields_omit_unset() -> None:
    assert RunTarget(business_id="order-17").to_fields() == {"business_id": "order-17"}


# Start requests: if_running and the parent of a child run.


def test_start_if_running_defaults_to_reject() -> None:
    request = parse_request(start_body())

    assert isinstance(request, StartRequest)
    assert request.if_running == "reject"


def test_start_if_running_return_existing() -> None:
    request = parse_request(start_body(if_running="return_existing", business_id="order-17"))

    assert isinstance(request, StartRequest)
    assert request.if_running == "return_existing"


def test_start_body_omits_default_if_running() -> None:
    body = StartRequest("Checkout", (), {}).to_body()

    assert "if_running" not in body


def test_start_with_parent() -> None:
    request = parse_request(start_body(run_id="c-1", parent_run_id="run-1", parent_step=4))

    assert isinstance(request, StartRequest)
    assert request.parent_run_id == "run-1"
    assert request.parent_step == 4


def test_start_with_parent_step_at_maximum() -> None:
    request = parse_request(start_body(parent_run_id="run-1", parent_step=MAX_COUNTER))

    assert isinstance(request, StartRequest)
    assert request.parent_step == MAX_COUNTER


INVALID_STARTS: list[Any] = [
    pytest.param(start_body(if_running="replace"), "if_running", id="if-running-unknown"),
    pytest.param(start_body(if_running=None), "if_running", id="if-running-null"),
    pytest.param(start_body(if_running=True), "if_running", id="if-running-bool"),
    pytest.param(start_body(if_running=["reject"]), "if_running", id="if-running-list"),
    pytest.param(start_body(parent_run_id="run 1", parent_step=1), "parent_run_id", id="parent"),
    pytest.param(start_body(parent_run_id=7, parent_step=1), "parent_run_id", id="parent-int"),
    pytest.param(start_body(parent_run_id="run-1", parent_step=0), "parent_step", id="step-0"),
    pytest.param(start_body(parent_run_id="run-1", parent_step=-1), "parent_step", id="step-neg"),
    pytest.param(
        start_body(parent_run_id="run-1", parent_step=MAX_COUNTER + 1),
        "parent_step",
        id="step-too-big",
    ),
    pytest.param(start_body(parent_run_id="run-1", parent_step=True), "parent_step", id="bool"),
    pytest.param(start_body(parent_run_id="run-1", parent_step="2"), "parent_step", id="text"),
    pytest.param(start_body(parent_run_id="run-1", parent_step=2.0), "parent_step", id="float"),
]


@pytest.mark.parametrize(("body", "field"), INVALID_STARTS)
def test_invalid_start_field_is_rejected(body: dict[str, Any], field: str) -> None:
    error = parse_error(body)

    assert error.code == "invalid_field"
    assert error.field == field


def test_start_parent_without_step_is_rejected() -> None:
    error = parse_error(start_body(parent_run_id="run-1"))

    assert error.code == "missing_field"
    assert error.field == "parent_step"


# Round trips through to_body.

ROUND_TRIPS: list[Any] = [
    pytest.param(EventRequest(RunTarget(run_id="run-1"), "Delivered"), id="event"),
    pytest.param(
        EventRequest(RunTarget(business_id="order-17"), "Delivered", {"by": ["courier"]}),
        id="event-with-data",
    ),
    pytest.param(EventRequest(RunTarget(run="order-17"), "Lost", 3.5), id="event-by-run"),
    pytest.param(ControlRequest("kill", RunTarget(run_id="run-1")), id="kill"),
    pytest.param(
        ControlRequest("pause", RunTarget(business_id="order-17"), by="ops", reason="maintenance"),
        id="pause",
    ),
    pytest.param(ControlRequest("resume", RunTarget(run="order-17"), by="ops"), id="resume"),
    pytest.param(
        StartRequest(
            "Checkout", ("A-17",), {"total": 4200}, "run-1", "order-17", "return_existing"
        ),
        id="start-return-existing",
    ),
    pytest.param(
        StartRequest("Invoice", (), {}, "c-1", None, "reject", "run-1", 4), id="start-child"
    ),
]


@pytest.mark.parametrize("request_", ROUND_TRIPS)
def test_request_round_trips_through_body(request_: Any) -> None:
    assert parse_request(request_.to_body()) == request_


@pytest.mark.parametrize("request_", ROUND_TRIPS)
def test_request_round_trips_through_msgpack(request_: Any) -> None:
    body = serializer.encode(request_.to_body())

    assert parse_request(decode_body(body, MSGPACK_CONTENT_TYPE)) == request_


@pytest.mark.parametrize("request_", ROUND_TRIPS)
def test_request_round_trips_through_json(request_: Any) -> None:
    body = json.dumps(request_.to_body()).encode()

    assert parse_request(decode_body(body, JSON_CONTENT_TYPE)) == request_
