"""Run control end to end: kill, pause and resume, with tasks, timers and child runs.

A killed run dispatches nothing more. Results that arrive later are recorded as
``result_ignored``, and its timers are cancelled. A paused run records results and fires
timers but makes no decision until it is resumed.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    Cluster,
    cluster_of,
    count_kind,
    history_kinds,
    queue_depth,
    result_of,
    start,
    wait_for_child_run,
    wait_for_kind,
    wait_for_timer,
    wait_until,
)
from zenflow import AsyncClient, RequestRejected, RunFailed, RunNotFound

pytestmark = pytest.mark.e2e

PARALLEL_TASKS = 3  # the number of tasks in the parallel step of ParallelThenWait


def wait_for_status(cluster: Cluster, run_id: str, status: str) -> None:
    try:
        wait_until(
            lambda: cluster.database.run_status(run_id) == status,
            20,
            message=f"run {run_id} to be {status}",
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\n{cluster.logs()}") from None


def timer_statuses(cluster: Cluster, run_id: str) -> list[str]:
    rows = cluster.database.rows(
        "SELECT status FROM timers WHERE run_id = :id ORDER BY step", id=run_id
    )
    return [row[0] for row in rows]


# Kill.


def test_kill_during_parallel_step(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "ParallelThenWait", 2.0)
    wait_for_kind(waits_cluster, run_id, "task_scheduled", PARALLEL_TASKS)
    with waits_cluster.client() as client:
        reply = client.kill(run_id, reason="stopped by the test")
        stored = client.get_run(run_id)
        with pytest.raises(RunFailed) as failure:
            client.wait(run_id, timeout=10)
    by = f"{getpass.getuser()}@{socket.gethostname()}"

    assert reply["status"] == "killed"
    assert stored["status"] == "killed"
    assert stored["error"]["type"] == "Killed"
    assert stored["error"]["by"] == by
    assert stored["error"]["reason"] == "stopped by the test"
    assert stored["error"]["message"] == f"killed by {by}: stopped by the test"
    assert failure.value.error["type"] == "Killed"

    # The tasks that were running finish later. Their results are recorded as ignored, and
    # nothing follows.
    wait_for_kind(waits_cluster, run_id, "result_ignored", PARALLEL_TASKS)
    kinds = history_kinds(waits_cluster, run_id)
    reasons = [
        json.loads(row[0])["reason"]
        for row in waits_cluster.database.rows(
            "SELECT error FROM history WHERE run_id = :id AND kind = 'result_ignored'",
            id=run_id,
        )
    ]
    steps = waits_cluster.database.scalar(
        "SELECT MAX(step) FROM history WHERE run_id = :id", id=run_id
    )

    assert kinds[: PARALLEL_TASKS + 2] == ["run_started"] + ["task_scheduled"] * PARALLEL_TASKS + [
        "run_killed"
    ]
    assert kinds[PARALLEL_TASKS + 2 :] == ["result_ignored"] * PARALLEL_TASKS
    assert reasons == ["the run was killed"] * PARALLEL_TASKS
    assert steps == PARALLEL_TASKS
    assert timer_statuses(waits_cluster, run_id) == []
    assert waits_cluster.database.run_status(run_id) == "killed"


def test_kill_cancels_pending_timer(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "Sleeper", 3600)
    wait_for_timer(waits_cluster, run_id)
    with waits_cluster.client() as client:
        client.kill(run_id, reason="no need to wait", by="operator")
        stored = client.get_run(run_id)

    assert stored["status"] == "killed"
    assert stored["error"]["message"] == "killed by operator: no need to wait"
    assert timer_statuses(waits_cluster, run_id) == ["cancelled"]


def test_kill_cancels_event_timeout(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "WaitsForEvent", "Ping", 3600)
    wait_for_timer(waits_cluster, run_id)
    with waits_cluster.client() as client:
        client.kill(run_id)
        stored = client.get_run(run_id)

    assert stored["waiting_for"] == []
    assert timer_statuses(waits_cluster, run_id) == ["cancelled"]


def test_kill_paused_run(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "Sleeper", 3600)
    wait_for_timer(waits_cluster, run_id)
    with waits_cluster.client() as client:
        client.pause(run_id)
        reply = client.kill(run_id, reason="paused too long")

    assert reply["status"] == "killed"
    assert waits_cluster.database.run_status(run_id) == "killed"
    assert timer_statuses(waits_cluster, run_id) == ["cancelled"]


def test_kill_parent_kills_active_child(waits_cluster: Cluster) -> None:
    parent_id = start(waits_cluster, "ParentOfSleeper")
    database = waits_cluster.database
    child_id = wait_for_child_run(waits_cluster, parent_id)
    wait_for_timer(waits_cluster, child_id)
    with waits_cluster.client() as client:
        client.kill(parent_id, reason="parent stopped")
    wait_for_status(waits_cluster, child_id, "killed")
    with waits_cluster.client() as client:
        child = client.get_run(child_id)
    # The killed child reports its end to the parent, which ignores it.
    wait_for_kind(waits_cluster, parent_id, "result_ignored")

    assert database.run_status(parent_id) == "killed"
    assert child["parent_id"] == parent_id
    assert child["error"]["by"] == f"parent run {parent_id}"
    assert child["error"]["reason"] == "parent stopped"
    assert timer_statuses(waits_cluster, child_id) == ["cancelled"]
    assert count_kind(waits_cluster, parent_id, "child_completed") == 0
    assert count_kind(waits_cluster, parent_id, "child_failed") == 0


# Pause and resume.


def test_pause_during_parallel_step_then_resume(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "ParallelThenWait", 1.5)
    wait_for_kind(waits_cluster, run_id, "task_scheduled", PARALLEL_TASKS)
    with waits_cluster.client() as client:
        paused = client.pause(run_id)
        stored = client.get_run(run_id)

    # Tasks that were running finish and are recorded while the run is paused.
    wait_for_kind(waits_cluster, run_id, "task_completed", PARALLEL_TASKS)
    status_while_paused = waits_cluster.database.run_status(run_id)
    timers_while_paused = count_kind(waits_cluster, run_id, "timer_started")
    with waits_cluster.client() as client:
        resumed = client.resume(run_id)
    result = result_of(waits_cluster, run_id)
    kinds = history_kinds(waits_cluster, run_id)

    assert paused["status"] == "paused"
    assert stored["status"] == "paused"
    assert status_while_paused == "paused"
    assert timers_while_paused == 0
    assert resumed["status"] == "running"
    assert result == [0, 1, 2]
    assert kinds.index("run_paused") < kinds.index("run_resumed") < kinds.index("timer_started")
    assert kinds[-1] == "run_completed"


def test_timer_due_while_paused_fires_on_resume(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "Sleeper", 1.0)
    fire_at = wait_for_timer(waits_cluster, run_id)
    with waits_cluster.client() as client:
        client.pause(run_id)
    # The timer comes due and is recorded while the run is paused.
    wait_for_kind(waits_cluster, run_id, "timer_fired")
    status_while_paused = waits_cluster.database.run_status(run_id)
    with waits_cluster.client() as client:
        client.resume(run_id)
    result = result_of(waits_cluster, run_id)

    assert status_while_paused == "paused"
    assert result["after"] >= fire_at
    assert timer_statuses(waits_cluster, run_id) == ["fired"]
    assert history_kinds(waits_cluster, run_id) == [
        "run_started",
        "timer_started",
        "run_paused",
        "timer_fired",
        "run_resumed",
        "run_completed",
    ]


def test_event_while_paused_delivered_on_resume(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "WaitsForEvent", "Ping", 60)
    wait_for_timer(waits_cluster, run_id)
    with waits_cluster.client() as client:
        client.pause(run_id)
        reply = client.send_event(run_id, "Ping", "while paused")
        status_while_paused = client.get_run(run_id)["status"]
        client.resume(run_id)
    result = result_of(waits_cluster, run_id)

    assert reply["delivered"] is True
    assert status_while_paused == "paused"
    assert result == {"timed_out": False, "name": "Ping", "data": "while paused"}


def test_pause_twice_rejected(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "Sleeper", 3600)
    wait_for_timer(waits_cluster, run_id)
    with waits_cluster.client() as client:
        client.pause(run_id)
        with pytest.raises(RequestRejected) as rejected:
            client.pause(run_id)

    assert rejected.value.code == "invalid_state"
    assert waits_cluster.database.run_status(run_id) == "paused"


def test_resume_running_run_rejected(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "Sleeper", 3600)
    wait_for_timer(waits_cluster, run_id)
    with waits_cluster.client() as client, pytest.raises(RequestRejected) as rejected:
        client.resume(run_id)

    assert rejected.value.code == "invalid_state"
    assert waits_cluster.database.run_status(run_id) == "running"


# Finished and missing runs.


@pytest.mark.parametrize("action", ["kill", "pause", "resume"])
def test_control_of_finished_run_rejected(waits_cluster: Cluster, action: str) -> None:
    run_id = start(waits_cluster, "Child", 1)
    assert result_of(waits_cluster, run_id) == 2
    entries_before = history_kinds(waits_cluster, run_id)
    with waits_cluster.client() as client, pytest.raises(RequestRejected) as rejected:
        getattr(client, action)(run_id)

    assert rejected.value.code == "run_finished"
    assert run_id in str(rejected.value)
    assert waits_cluster.database.run_status(run_id) == "completed"
    assert history_kinds(waits_cluster, run_id) == entries_before


@pytest.mark.parametrize("action", ["kill", "pause", "resume"])
def test_control_of_missing_run_not_found(waits_cluster: Cluster, action: str) -> None:
    missing = f"missing-{uuid.uuid4().hex}"
    with waits_cluster.client() as client, pytest.raises(RunNotFound) as not_found:
        getattr(client, action)(missing)

    assert missing in str(not_found.value)


# The kill races with the start of the parent's child, so each test kills several parents
# to give the race several chances.
RACING_PARENTS = 5


def active_children(cluster: Cluster, parent_ids: list[str], timeout: float = 15.0) -> list[Any]:
    """Wait until the parents have no running or paused child run, or the timeout passes.

    Returns the child runs still active then, as (parent_id, child_id, status).
    """
    placeholders = ", ".join(f":parent{index}" for index in range(len(parent_ids)))
    parameters = {f"parent{index}": parent for index, parent in enumerate(parent_ids)}

    def active() -> list[Any]:
        return cluster.database.rows(
            f"SELECT parent_id, id, status FROM runs WHERE parent_id IN ({placeholders}) "
            "AND status IN ('running', 'paused')",
            **parameters,
        )

    deadline = time.monotonic() + timeout
    rows = active()
    while rows and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = active()
    return rows


def test_kill_right_after_start_leaves_no_active_child(waits_cluster: Cluster) -> None:
    parent_ids = []
    with waits_cluster.client() as client:
        for _ in range(RACING_PARENTS):
            parent_id = client.start("ParentOfSleeper")
            client.kill(parent_id, reason="killed at once")
            parent_ids.append(parent_id)
    statuses = [waits_cluster.database.run_status(parent_id) for parent_id in parent_ids]

    assert statuses == ["killed"] * RACING_PARENTS
    assert active_children(waits_cluster, parent_ids) == []


def test_result_while_paused_not_logged_as_ignored(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "ParallelThenWait", 1.0)
    wait_for_kind(waits_cluster, run_id, "task_scheduled", PARALLEL_TASKS)
    with waits_cluster.client() as client:
        client.pause(run_id)
    wait_for_kind(waits_cluster, run_id, "task_completed", PARALLEL_TASKS)
    with waits_cluster.client() as client:
        client.resume(run_id)
    result_of(waits_cluster, run_id)
    engine = next(process for process in waits_cluster.processes if process.args[0] == "engine")
    ignored = [
        record
        for record in (json.loads(line) for line in engine.log_text().splitlines() if line)
        if record.get("event") == "result_ignored" and record.get("run_id") == run_id
    ]

    # The results were recorded in history and used on resume, so nothing was ignored.
    assert ignored == []


def test_async_client_controls_run(waits_cluster: Cluster) -> None:
    async def main() -> tuple[list[str], dict[str, Any]]:
        async with AsyncClient(namespace=waits_cluster.namespace) as client:
            run_id = await client.start("WaitsForEvent", "Ping", 3600)
            statuses = [
                (await client.pause(run_id))["status"],
                (await client.resume(run_id))["status"],
                (await client.kill(run_id, reason="async kill"))["status"],
            ]
            return statuses, await client.get_run(run_id)

    statuses, stored = asyncio.run(main())

    assert statuses == ["paused", "running", "killed"]
    assert stored["error"]["reason"] == "async kill"


# Requests queued while the engine is down.


@pytest.fixture
def cluster(tmp_path: Path, backend: str, rabbitmq: str) -> Iterator[Cluster]:
    """A cluster of its own, because the test stops its engine."""
    with cluster_of(tmp_path, backend, "waits") as cluster:
        cluster.start_engine()
        cluster.start_agent("--concurrency", "8")
        yield cluster


def test_kill_queued_behind_start_leaves_no_active_child(cluster: Cluster) -> None:
    engine = cluster.processes[0]
    assert engine.stop() == 0
    outcomes: list[dict[str, Any]] = [{} for _ in range(RACING_PARENTS)]

    def start_and_kill(outcome: dict[str, Any]) -> None:
        try:
            with cluster.client() as client:
                outcome["run_id"] = client.start("ParentOfSleeper")
                outcome["reply"] = client.kill(outcome["run_id"], reason="queued kill")
        except Exception as error:  # reported by the assert below
            outcome["error"] = error

    threads = [threading.Thread(target=start_and_kill, args=(outcome,)) for outcome in outcomes]
    for thread in threads:
        thread.start()
    # Each start, then its kill, waits in the requests queue for an engine.
    wait_until(
        lambda: queue_depth(cluster.namespace, "engine.requests") == 2 * RACING_PARENTS,
        15,
        message="the starts and the kills in the requests queue",
    )
    cluster.start_engine()
    for thread in threads:
        thread.join(60)
    errors = [outcome["error"] for outcome in outcomes if "error" in outcome]
    assert errors == []
    parent_ids = [outcome["run_id"] for outcome in outcomes]

    assert [outcome["reply"]["status"] for outcome in outcomes] == ["killed"] * RACING_PARENTS
    assert active_children(cluster, parent_ids) == []
