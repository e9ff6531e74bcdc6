"""Child workflows and business ids, end to end.

A workflow that yields another workflow starts a child run, linked by ``runs.parent_id``
and ``runs.parent_step``, and receives its result (or its failure, raised at the ``yield``).
A business id belongs to at most one active run at a time.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.apps import waits
from tests.support import (
    Cluster,
    children_of,
    history_kinds,
    result_of,
    start,
    wait_for_child_run,
    wait_until,
)
from zenflow import RequestRejected, RunFailed

pytestmark = pytest.mark.e2e


def wait_for_children_finished(cluster: Cluster, parent_id: str, count: int) -> list[Any]:
    def finished() -> list[Any] | None:
        rows = children_of(cluster, parent_id)
        if len(rows) == count and all(row[3] in ("completed", "failed") for row in rows):
            return rows
        return None

    rows = wait_until(finished, 20, message=f"{count} finished child runs of {parent_id}")
    assert rows is not None
    return rows


# Results and links.


def test_parent_receives_child_results(waits_cluster: Cluster) -> None:
    parent_id = start(waits_cluster, "Parent", 5)
    result = result_of(waits_cluster, parent_id)
    children = wait_for_children_finished(waits_cluster, parent_id, 3)
    detached_id, failing_id = children[1][0], children[2][0]

    assert result["first"] == 6
    assert result["detached"] == detached_id
    assert failing_id in result["caught"]
    assert "child broke" in result["caught"]


def test_child_runs_link_to_parent(waits_cluster: Cluster) -> None:
    parent_id = start(waits_cluster, "Parent", 5)
    result_of(waits_cluster, parent_id)
    children = wait_for_children_finished(waits_cluster, parent_id, 3)
    with waits_cluster.client() as client:
        views = [client.get_run(row[0]) for row in children]

    assert [(row[1], row[2], row[3]) for row in children] == [
        (1, "Child", "completed"),
        (2, "Child", "completed"),
        (3, "FailingChild", "failed"),
    ]
    assert [view["parent_id"] for view in views] == [parent_id] * 3
    assert [view["result"] for view in views[:2]] == [6, 101]


def test_child_steps_recorded_in_parent_history(waits_cluster: Cluster) -> None:
    parent_id = start(waits_cluster, "Parent", 5)
    result_of(waits_cluster, parent_id)
    wait_for_children_finished(waits_cluster, parent_id, 3)
    # The detached child's result is recorded for the timeline once it arrives.
    wait_until(
        lambda: len(history_kinds(waits_cluster, parent_id, 2)) == 2,
        15,
        message="the detached child's result in the parent's history",
    )

    assert history_kinds(waits_cluster, parent_id, 1) == ["child_started", "child_completed"]
    assert history_kinds(waits_cluster, parent_id, 2) == ["child_dispatched", "child_completed"]
    assert history_kinds(waits_cluster, parent_id, 3) == ["child_started", "child_failed"]


def test_uncaught_child_failure_fails_parent(waits_cluster: Cluster) -> None:
    parent_id = start(waits_cluster, "ParentOfFailingChild")
    with waits_cluster.client() as client, pytest.raises(RunFailed) as failure:
        client.wait(parent_id, timeout=30)
    error = failure.value.error
    child_id = children_of(waits_cluster, parent_id)[0][0]

    assert error["type"] == "TaskFailed"
    assert error["step"] == 1
    assert child_id in error["cause"]["message"]
    assert "child broke" in error["cause"]["message"]


def test_function_workflow_as_child(waits_cluster: Cluster) -> None:
    parent_id = start(waits_cluster, "ParentOfFunction", 41)

    assert result_of(waits_cluster, parent_id) == 42
    assert [row[2] for row in children_of(waits_cluster, parent_id)] == ["plus_one"]


# Business ids.


def order_id() -> str:
    return f"A1-{uuid.uuid4().hex[:8]}"


def test_business_id_computed_by_class(waits_cluster: Cluster) -> None:
    order = order_id()
    run_id = start(waits_cluster, waits.OrderById, order)
    with waits_cluster.client() as client:
        stored = client.get_run(run_id)
        client.send_event(run_id, "Done", "shipped")

    assert stored["business_id"] == f"order-{order}"
    assert result_of(waits_cluster, run_id) == "shipped"


def test_second_start_with_business_id_rejected(waits_cluster: Cluster) -> None:
    order = order_id()
    first = start(waits_cluster, waits.OrderById, order)
    with waits_cluster.client() as client, pytest.raises(RequestRejected) as rejected:
        client.start(waits.OrderById, order)
    runs = waits_cluster.database.rows(
        "SELECT id FROM runs WHERE business_id = :key", key=f"order-{order}"
    )

    assert rejected.value.code == "business_id_in_use"
    assert first in str(rejected.value)
    assert [row[0] for row in runs] == [first]


def test_return_existing_gives_active_run(waits_cluster: Cluster) -> None:
    order = order_id()
    first = start(waits_cluster, waits.OrderById, order)
    again = start(waits_cluster, waits.OrderById, order, if_running="return_existing")
    runs = waits_cluster.database.rows(
        "SELECT id FROM runs WHERE business_id = :key", key=f"order-{order}"
    )

    assert again == first
    assert [row[0] for row in runs] == [first]


def test_business_id_reused_after_run_finishes(waits_cluster: Cluster) -> None:
    order = order_id()
    first = start(waits_cluster, waits.OrderById, order)
    with waits_cluster.client() as client:
        client.send_event(first, "Done", "first done")
    assert result_of(waits_cluster, first) == "first done"
    second = start(waits_cluster, waits.OrderById, order)
    with waits_cluster.client() as client:
        latest = client.get_run(business_id=f"order-{order}")
        client.send_event(f"order-{order}", "Done", "second done")

    assert second != first
    assert latest["run_id"] == second
    assert result_of(waits_cluster, second) == "second done"


def test_business_id_given_by_caller_rejected_twice(waits_cluster: Cluster) -> None:
    business_id = f"caller-{uuid.uuid4().hex[:8]}"
    first = start(waits_cluster, "WaitsForEvent", "Ping", 60, business_id=business_id)
    with waits_cluster.client() as client, pytest.raises(RequestRejected) as rejected:
        client.start("WaitsForEvent", "Ping", 60, business_id=business_id)

    assert rejected.value.code == "business_id_in_use"
    assert first in str(rejected.value)


def test_child_with_taken_business_id_fails(waits_cluster: Cluster) -> None:
    order = order_id()
    holder = start(waits_cluster, waits.OrderById, order)
    parent_id = start(waits_cluster, "ParentOfOrder", order)
    result = result_of(waits_cluster, parent_id)

    assert result["error_type"] == "ChildNotStarted"
    assert holder in result["message"]
    assert "business_id" in result["message"] or "business id" in result["message"]


def test_killed_child_fails_parent_at_yield(waits_cluster: Cluster) -> None:
    parent_id = start(waits_cluster, "ParentOfSleeper")
    child_id = wait_for_child_run(waits_cluster, parent_id)
    with waits_cluster.client() as client:
        client.kill(child_id, reason="child not needed", by="operator")
        with pytest.raises(RunFailed) as failure:
            client.wait(parent_id, timeout=30)
    error = failure.value.error

    assert error["type"] == "TaskFailed"
    assert error["step"] == 1
    assert error["cause"]["type"] == "Killed"
    assert child_id in error["cause"]["message"]
    assert "killed by operator: child not needed" in error["cause"]["message"]


def test_child_finishing_while_parent_paused(waits_cluster: Cluster) -> None:
    parent_id = start(waits_cluster, "ParentOfWaiter")
    child_id = wait_for_child_run(waits_cluster, parent_id)
    with waits_cluster.client() as client:
        client.pause(parent_id)
        client.send_event(child_id, "Ping", "from child")
        assert client.wait(child_id, timeout=30)["data"] == "from child"
    # The child's result is recorded in the paused parent, which does not advance.
    wait_until(
        lambda: history_kinds(waits_cluster, parent_id, 1) == ["child_started", "child_completed"],
        15,
        message="the child's result in the paused parent's history",
    )
    status_while_paused = waits_cluster.database.run_status(parent_id)
    with waits_cluster.client() as client:
        client.resume(parent_id)

    assert status_while_paused == "paused"
    assert result_of(waits_cluster, parent_id)["data"] == "from child"


def test_business_id_reused_after_kill(waits_cluster: Cluster) -> None:
    order = order_id()
    first = start(waits_cluster, waits.OrderById, order)
    with waits_cluster.client() as client:
        client.kill(first, reason="order cancelled")
    second = start(waits_cluster, waits.OrderById, order)

    assert second != first
    assert waits_cluster.database.run_status(first) == "killed"
    assert waits_cluster.database.run_status(second) == "running"
