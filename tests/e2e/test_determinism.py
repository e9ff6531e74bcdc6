"""Replay after an engine restart: a run parked at an event wait is finished by an engine
without a generator cache, so every later step replays the history written before.

The values that workflow code draws (``zenflow.now()``, ``zenflow.random()``,
``zenflow.uuid4()``) must come out the same on replay. The tests compute the expected values
by running the same calls in a fresh run context of the same run and decision.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import zenflow
from tests.support import (
    Cluster,
    cluster_of,
    history_time,
    result_of,
    send,
    start,
    wait_until,
    wait_until_waiting_for,
)
from zenflow.context import RunContext, reset_current_run, set_current_run

pytestmark = pytest.mark.e2e

T = TypeVar("T")

FAILURE_KINDS = ("task_failed", "child_failed", "run_failed")


@pytest.fixture
def cluster(tmp_path: Path, backend: str, rabbitmq: str) -> Iterator[Cluster]:
    """A cluster of its own, because these tests restart its engine."""
    with cluster_of(tmp_path, backend, "waits") as cluster:
        cluster.start_engine()
        cluster.start_agent("--concurrency", "8")
        yield cluster


def history(cluster: Cluster, run_id: str) -> list[tuple[Any, ...]]:
    """Return the run's history as (seq, kind, step, name, payload) rows, in order."""
    rows = cluster.database.rows(
        "SELECT seq, kind, step, name, payload FROM history WHERE run_id = :id ORDER BY seq",
        id=run_id,
    )
    return [(row[0], row[1], row[2], row[3], bytes(row[4] or b"")) for row in rows]


def park_at_event(cluster: Cluster, workflow: str, event: str) -> str:
    """Start a run, wait until it waits for ``event``, and return its run id."""
    run_id = start(cluster, workflow)
    wait_until_waiting_for(cluster, run_id, [event])
    return run_id


def restart_engine_without_cache(cluster: Cluster) -> None:
    engine = next(process for process in cluster.processes if process.args[0] == "engine")
    assert engine.stop() == 0
    cluster.start_engine("--cache-size", "0")


def drawn_in(
    run_id: str, workflow: str, decision: int, now: dt.datetime, draw: Callable[[], T]
) -> T:
    """Return what ``draw`` gives inside workflow code of this run at this decision."""
    context = RunContext(run_id, workflow, now=now, decision=decision)
    token = set_current_run(context)
    try:
        return draw()
    finally:
        reset_current_run(token)


def failure_kinds(cluster: Cluster, run_id: str) -> list[str]:
    return [row[1] for row in history(cluster, run_id) if row[1] in FAILURE_KINDS]


# The Everything workflow: every kind of command.


def test_everything_completes_after_restart_without_cache(cluster: Cluster) -> None:
    run_id = park_at_event(cluster, "Everything", "Continue")
    before = history(cluster, run_id)
    restart_engine_without_cache(cluster)
    send(cluster, run_id, "Continue", "resumed")
    result = result_of(cluster, run_id)
    after = history(cluster, run_id)

    assert cluster.database.run_status(run_id) == "completed"
    assert failure_kinds(cluster, run_id) == []
    assert after[: len(before)] == before
    assert after[-1][1] == "run_completed"
    assert result["pair"] == [4, 5]
    assert result["child"] == 4
    assert result["event"] == "resumed"
    assert result["winner"] == 0


def test_everything_drawn_values_replay_identically(cluster: Cluster) -> None:
    run_id = park_at_event(cluster, "Everything", "Continue")
    restart_engine_without_cache(cluster)
    send(cluster, run_id, "Continue", None)
    result = result_of(cluster, run_id)
    started = history_time(cluster, run_id, "run_started")
    # Everything yields six times before it draws ``lucky``.
    lucky = drawn_in(run_id, "Everything", 6, started, lambda: zenflow.random().randint(1, 1000))

    assert result["stamp"] == started
    assert result["token"] == drawn_in(run_id, "Everything", 0, started, zenflow.uuid4)
    assert result["token"].version == 4
    assert result["lucky"] == lucky


# The Deterministic workflow: values drawn before and after a task.


def test_deterministic_values_survive_restart(cluster: Cluster) -> None:
    run_id = park_at_event(cluster, "Deterministic", "Go")
    before = history(cluster, run_id)
    restart_engine_without_cache(cluster)
    send(cluster, run_id, "Go", None)
    result = result_of(cluster, run_id)
    started = history_time(cluster, run_id, "run_started")
    task_done = history_time(cluster, run_id, "task_completed", step=1)
    first, second = result["first"], result["second"]
    expected_first = drawn_in(
        run_id,
        "Deterministic",
        0,
        started,
        lambda: (zenflow.now(), zenflow.random().random(), zenflow.uuid4()),
    )
    expected_second = drawn_in(
        run_id,
        "Deterministic",
        1,
        task_done,
        lambda: (zenflow.now(), zenflow.random().randint(0, 10**9), zenflow.uuid4()),
    )

    assert history(cluster, run_id)[: len(before)] == before
    assert failure_kinds(cluster, run_id) == []
    assert first[0] == started
    assert second[0] == task_done
    assert isinstance(first[2], uuid.UUID)
    assert first[2].version == 4
    assert second[2].version == 4
    assert first[2] != second[2]
    assert tuple(first) == expected_first
    assert tuple(second) == expected_second


def test_values_recorded_before_restart_match_replay(cluster: Cluster) -> None:
    run_id = park_at_event(cluster, "EchoesDrawnValues", "Go")
    restart_engine_without_cache(cluster)
    send(cluster, run_id, "Go", None)
    result = result_of(cluster, run_id)

    # The task's arguments were recorded before the restart. A replay that drew other
    # values would have failed the run as not deterministic.
    assert failure_kinds(cluster, run_id) == []
    assert result["drawn"] == result["echoed"]


def test_paused_run_resumes_after_restart(cluster: Cluster) -> None:
    run_id = park_at_event(cluster, "Deterministic", "Go")
    with cluster.client() as client:
        client.pause(run_id)
        client.send_event(run_id, "Go", None)
    restart_engine_without_cache(cluster)
    status_after_restart = cluster.database.run_status(run_id)
    with cluster.client() as client:
        client.resume(run_id)
    result = result_of(cluster, run_id)
    started = history_time(cluster, run_id, "run_started")

    assert status_after_restart == "paused"
    assert failure_kinds(cluster, run_id) == []
    assert result["first"][0] == started


# Every decision replayed: an engine without a generator cache from the start.


def test_replayed_events_reach_later_waits(waits_replay_cluster: Cluster) -> None:
    with waits_replay_cluster.client() as client:
        run_id = client.start("TwoEventsAfterTask", 1.0)
        client.send_event(run_id, "Item", "one")
        client.send_event(run_id, "Item", "two")

    assert result_of(waits_replay_cluster, run_id) == ["one", "two"]
    assert failure_kinds(waits_replay_cluster, run_id) == []


def test_replayed_event_kept_after_timeout(waits_replay_cluster: Cluster) -> None:
    with waits_replay_cluster.client() as client:
        run_id = client.start("TimeoutTaskThenWait", 0.3, 1.5)
    wait_until(
        lambda: "event_timed_out" in [row[1] for row in history(waits_replay_cluster, run_id)],
        15,
        message=f"the first wait of run {run_id} to time out",
    )
    send(waits_replay_cluster, run_id, "Late", "kept")

    assert result_of(waits_replay_cluster, run_id) == [None, "kept"]


@pytest.mark.parametrize(
    ("task_seconds", "timer_seconds", "cancel", "expected"),
    [
        (2.0, 0.3, False, [1, None]),
        (0.1, 60, False, [0, "task"]),
        (2.0, 60, True, [2, "stop"]),
    ],
    ids=["timer-wins", "task-wins", "event-wins"],
)
def test_replayed_race_picks_same_winner(
    waits_replay_cluster: Cluster,
    task_seconds: float,
    timer_seconds: float,
    cancel: bool,
    expected: list[Any],
) -> None:
    with waits_replay_cluster.client() as client:
        run_id = client.start("RaceTaskAndTimer", task_seconds, timer_seconds)
        if cancel:
            client.send_event(run_id, "Cancel", "stop")

    assert result_of(waits_replay_cluster, run_id) == expected
    assert failure_kinds(waits_replay_cluster, run_id) == []


def test_replayed_pause_and_resume(waits_replay_cluster: Cluster) -> None:
    with waits_replay_cluster.client() as client:
        run_id = client.start("ParallelThenWait", 1.0)
        client.pause(run_id)
    wait_until(
        lambda: (
            [row[1] for row in history(waits_replay_cluster, run_id)].count("task_completed") == 3
        ),
        15,
        message=f"the parallel tasks of run {run_id} to finish while it is paused",
    )
    with waits_replay_cluster.client() as client:
        client.resume(run_id)

    assert result_of(waits_replay_cluster, run_id) == [0, 1, 2]


def test_replayed_parent_receives_child_results(waits_replay_cluster: Cluster) -> None:
    with waits_replay_cluster.client() as client:
        run_id = client.start("Parent", 5)
    result = result_of(waits_replay_cluster, run_id)

    assert result["first"] == 6
    assert "child broke" in result["caught"]
    assert waits_replay_cluster.database.run_status(run_id) == "completed"
