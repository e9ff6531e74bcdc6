"""Calendar waits across a daylight-saving change, with the engine's clock moved forward.

``zenflow engine --clock-offset`` shifts the engine's clock, so a run can start seconds
before a real change of offset and its timer fire just after it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tests.support import Database, cluster_of, wait_until

pytestmark = pytest.mark.e2e

UTC = dt.UTC
# Seconds between the second engine's shifted clock at its start and the fire instant.
LEAD = 2.0


def fire_at_of(database: Database, run_id: str) -> dt.datetime | None:
    value = database.scalar("SELECT fire_at FROM timers WHERE run_id = :id", id=run_id)
    if value is None:
        return None
    return dt.datetime.fromisoformat(str(value)).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("zone", "change", "clock", "expected", "wait_for_it"),
    [
        # New York springs forward at 02:00 EST (07:00 UTC), so 03:00 that night is EDT.
        (
            "America/New_York",
            dt.datetime(2027, 3, 14, 7, 0, tzinfo=UTC),
            "03:00",
            dt.datetime(2027, 3, 14, 7, 0, tzinfo=UTC),
            True,
        ),
        # Paris springs forward at 02:00 CET (01:00 UTC), so 03:00 that night is CEST.
        (
            "Europe/Paris",
            dt.datetime(2027, 3, 28, 1, 0, tzinfo=UTC),
            "03:00",
            dt.datetime(2027, 3, 28, 1, 0, tzinfo=UTC),
            True,
        ),
        # 02:30 does not exist in Paris that night: the wait fires when the clock passes
        # it, at 03:30 CEST (01:30 UTC). Only the stored instant is checked, 30 minutes on.
        (
            "Europe/Paris",
            dt.datetime(2027, 3, 28, 1, 0, tzinfo=UTC),
            "02:30",
            dt.datetime(2027, 3, 28, 1, 30, tzinfo=UTC),
            False,
        ),
    ],
    ids=["new-york-spring", "paris-spring", "paris-gap"],
)
def test_wait_at_across_change(
    tmp_path: Path,
    backend: str,
    rabbitmq: str,
    zone: str,
    change: dt.datetime,
    clock: str,
    expected: dt.datetime,
    wait_for_it: bool,
) -> None:
    # The run starts a minute before the change, whatever the time the engine takes to start.
    before = (change - dt.timedelta(seconds=60) - dt.datetime.now(UTC)).total_seconds()
    with cluster_of(tmp_path, backend, "handlers") as cluster:
        engine = cluster.start_engine("--clock-offset", str(before))
        with cluster.client() as client:
            run_id = client.start("WakesAtLocalTime", clock, zone)
            wait_until(lambda: fire_at_of(cluster.database, run_id) is not None, 30)
            started = cluster.database.scalar(
                "SELECT created_at FROM runs WHERE id = :id", id=run_id
            )
            assert dt.datetime.fromisoformat(str(started)).replace(tzinfo=UTC) < change
            assert fire_at_of(cluster.database, run_id) == expected
            if not wait_for_it:
                return

            # A new engine whose clock is just before the fire instant fires the timer.
            engine.stop()
            just_before = expected - dt.timedelta(seconds=LEAD)
            cluster.start_engine(
                "--clock-offset", str((just_before - dt.datetime.now(UTC)).total_seconds())
            )
            woke = client.wait(run_id, timeout=30)
        assert woke >= expected
        # Late by the second engine's start at most: far from the hour a wrong offset gives.
        assert woke - expected < dt.timedelta(seconds=30)
