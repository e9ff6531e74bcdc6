"""Durable timers run end to end: durations, instants, calendar rules and engine restarts.

Timer rows live in the ``timers`` table with their fire instant. These tests read them
there and compare them with the workflow clock (``zenflow.now()``) and with instants
computed here with ``zoneinfo``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.support import (
    Cluster,
    cluster_of,
    history_kinds,
    history_time,
    result_of,
    utc,
    wait_until,
)
from zenflow import RunFailed

pytestmark = pytest.mark.e2e


def timer_row(cluster: Cluster, run_id: str, step: int = 1) -> Any:
    """Wait until the step's timer row exists and return it (status, fire_at)."""
    rows = wait_until(
        lambda: cluster.database.rows(
            "SELECT status, fire_at FROM timers WHERE run_id = :id AND step = :step",
            id=run_id,
            step=step,
        ),
        15,
        message=f"the timer row of step {step} of run {run_id}",
    )
    return rows[0]


def sleep_past(moment: dt.datetime, margin: float = 0.3) -> None:
    """Sleep until the wall clock has passed ``moment``, which must be less than 5 s away."""
    remaining = (moment - dt.datetime.now(dt.UTC)).total_seconds() + margin
    assert remaining < 5, f"{moment} is {remaining:.1f} s away, too far for a test to wait"
    if remaining > 0:
        time.sleep(remaining)


# A short duration.


def test_short_sleep_wakes_after_fire_time(waits_cluster: Cluster) -> None:
    with waits_cluster.client() as client:
        run_id = client.start("Sleeper", 0.5)
    result = result_of(waits_cluster, run_id)
    status, fire_at = timer_row(waits_cluster, run_id)

    assert result["after"] >= utc(fire_at)
    assert result["after"] - result["before"] >= dt.timedelta(seconds=0.5)
    assert status == "fired"
    assert history_kinds(waits_cluster, run_id, 1) == ["timer_started", "timer_fired"]


def test_timer_fire_at_is_start_plus_duration(waits_cluster: Cluster) -> None:
    with waits_cluster.client() as client:
        run_id = client.start("Sleeper", 0.5)
    result_of(waits_cluster, run_id)
    _, fire_at = timer_row(waits_cluster, run_id)
    started = history_time(waits_cluster, run_id, "timer_started")

    assert utc(fire_at) - started == dt.timedelta(seconds=0.5)


# Instants.


def test_until_in_past_fires_at_once(waits_cluster: Cluster) -> None:
    moment = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    with waits_cluster.client() as client:
        run_id = client.start("SleepUntil", moment)
    woke = result_of(waits_cluster, run_id, timeout=15)
    _, fire_at = timer_row(waits_cluster, run_id)
    started = history_time(waits_cluster, run_id, "timer_started")

    assert utc(fire_at) == moment
    # The engine polls for due timers every 0.2 s. The 3 s bound allows for a loaded machine.
    assert woke - started < dt.timedelta(seconds=3)


def test_until_in_named_zone_stores_utc_instant(waits_cluster: Cluster) -> None:
    paris = ZoneInfo("Europe/Paris")
    moment = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).astimezone(paris)
    with waits_cluster.client() as client:
        run_id = client.start("SleepUntil", moment)
    result_of(waits_cluster, run_id, timeout=15)
    _, fire_at = timer_row(waits_cluster, run_id)

    assert utc(fire_at) == moment.astimezone(dt.UTC)


def test_naive_until_fails_run_with_hint(waits_cluster: Cluster) -> None:
    naive = dt.datetime(2030, 1, 1, 9, 0)
    with waits_cluster.client() as client:
        run_id = client.start("SleepUntil", naive)
        with pytest.raises(RunFailed) as failure:
            client.wait(run_id, timeout=30)
    error = failure.value.error
    timers = waits_cluster.database.rows("SELECT id FROM timers WHERE run_id = :id", id=run_id)

    assert error["type"] == "DefinitionError"
    assert "naive datetime 2030-01-01T09:00:00" in error["message"]
    assert "give it a time zone" in error["message"]
    assert timers == []


# Calendar rules in named zones.


def next_local_instant(
    now: dt.datetime, zone: str, matches: Callable[[dt.date], bool], at: dt.time
) -> dt.datetime:
    """Return the first instant after ``now`` when the clock in ``zone`` shows ``at`` on a
    local day that ``matches``, computed with zoneinfo alone (fold=0 for repeated times)."""
    tzinfo = ZoneInfo(zone)
    day = now.astimezone(tzinfo).date() - dt.timedelta(days=1)
    while True:
        if matches(day):
            fire = dt.datetime.combine(day, at, tzinfo=tzinfo).astimezone(dt.UTC)
            if fire > now:
                return fire
        day += dt.timedelta(days=1)


RULES: dict[str, Callable[[dt.date], bool]] = {
    "time_of_day": lambda day: True,
    "weekday": lambda day: day.weekday() == 0,
    "day_of_month": lambda day: day.day == 1,
}


# The engine computes fire instants from its own clock, so whether these waits cross a
# daylight-saving change depends on the date the test runs. test_daylight_saving.py moves
# the engine's clock to cross one on purpose.
@pytest.mark.parametrize("zone", ["America/New_York", "Europe/Paris", "Australia/Lord_Howe"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_calendar_wait_fire_at_matches_zoneinfo(
    waits_cluster: Cluster, rule: str, zone: str
) -> None:
    with waits_cluster.client() as client:
        run_id = client.start("WaitsOnCalendar", rule, zone)
    status, fire_at = timer_row(waits_cluster, run_id)
    scheduled = history_time(waits_cluster, run_id, "timer_started")
    expected = next_local_instant(scheduled, zone, RULES[rule], dt.time(9, 0))
    local = utc(fire_at).astimezone(ZoneInfo(zone))

    assert status == "pending"
    assert utc(fire_at) == expected
    assert local.time() == dt.time(9, 0)
    assert RULES[rule](local.date())


def test_weekday_wait_fire_at_matches_zoneinfo(waits_cluster: Cluster) -> None:
    with waits_cluster.client() as client:
        run_id = client.start("WaitsAtWeekday", "America/New_York")
    _, fire_at = timer_row(waits_cluster, run_id)
    scheduled = history_time(waits_cluster, run_id, "timer_started")
    expected = next_local_instant(scheduled, "America/New_York", RULES["weekday"], dt.time(9, 0))

    assert utc(fire_at) == expected


# Engine restarts.


@pytest.fixture
def cluster(tmp_path: Path, backend: str, rabbitmq: str) -> Iterator[Cluster]:
    """A cluster of its own, because these tests stop its engine. Timers need no agent."""
    with cluster_of(tmp_path, backend, "waits") as cluster:
        cluster.start_engine()
        yield cluster


RUNS_DURING_OUTAGE = 5


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_timer_due_while_engine_down_fires_after_restart(cluster: Cluster, stop: str) -> None:
    engine = cluster.processes[0]
    with cluster.client() as client:
        run_ids = [client.start("Sleeper", 1.0) for _ in range(RUNS_DURING_OUTAGE)]
    fire_ats = [utc(timer_row(cluster, run_id)[1]) for run_id in run_ids]

    if stop == "sigterm":
        assert engine.stop() == 0
    else:
        engine.kill()
    sleep_past(max(fire_ats))
    statuses_while_down = [timer_row(cluster, run_id)[0] for run_id in run_ids]
    runs_while_down = [cluster.database.run_status(run_id) for run_id in run_ids]

    cluster.start_engine()
    results = [result_of(cluster, run_id) for run_id in run_ids]
    statuses_after = [timer_row(cluster, run_id)[0] for run_id in run_ids]
    woke_early = [
        run_id
        for run_id, result, fire_at in zip(run_ids, results, fire_ats, strict=True)
        if result["after"] < fire_at
    ]
    timelines = {tuple(history_kinds(cluster, run_id, 1)) for run_id in run_ids}

    assert statuses_while_down == ["pending"] * RUNS_DURING_OUTAGE
    assert runs_while_down == ["running"] * RUNS_DURING_OUTAGE
    assert woke_early == []
    assert statuses_after == ["fired"] * RUNS_DURING_OUTAGE
    assert timelines == {("timer_started", "timer_fired")}
