"""Workflows run end to end by real engine and agent processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.apps import flows
from tests.support import Cluster, wait_until
from zenflow import AsyncClient, RunFailed

pytestmark = pytest.mark.e2e


def run(cluster: Cluster, workflow: str, *args: object, **kwargs: object) -> object:
    with cluster.client() as client:
        run_id = client.start(workflow, *args, **kwargs)
        return client.wait(run_id, timeout=30)


def test_sequential_steps_return_results(flows_cluster: Cluster) -> None:
    assert run(flows_cluster, "Sequential", 5) == [10, 11, 11]


def test_branching_follows_results(flows_cluster: Cluster) -> None:
    assert run(flows_cluster, "Branching", 10) == ("big", "big branch")
    assert run(flows_cluster, "Branching", 2) == ("small", 104)


def test_parallel_list_returns_all_results(flows_cluster: Cluster) -> None:
    result = run(flows_cluster, "Parallel", 5)
    assert result == {"doubled": [0, 2, 4, 6, 8], "pair": [3, "x"]}


def test_task_failure_caught_and_workflow_continues(flows_cluster: Cluster) -> None:
    result = run(flows_cluster, "CatchAndContinue")
    assert result == {
        "recovered": "recovered from ValueError: card declined",
        "traceback_has_frame": True,
    }


def test_uncaught_task_failure_fails_run(flows_cluster: Cluster) -> None:
    with flows_cluster.client() as client:
        run_id = client.start("Uncaught")
        with pytest.raises(RunFailed) as failure:
            client.wait(run_id, timeout=30)
        stored = client.get_run(run_id)
    error = failure.value.error
    assert error["type"] == "TaskFailed"
    assert error["step"] == 2
    assert error["cause"]["type"] == "ValueError"
    assert error["cause"]["message"] == "boom"
    assert "raise ValueError" in error["cause"]["traceback"]
    assert stored["status"] == "failed"


def test_workflow_without_yield_completes(flows_cluster: Cluster) -> None:
    assert run(flows_cluster, "NeverYields", 7) == {"value": 7}
    assert run(flows_cluster, "ReturnsBeforeYield") == "early"


def test_yield_from_helper_generator(flows_cluster: Cluster) -> None:
    assert run(flows_cluster, "YieldFrom") == 24


def test_dispatch_does_not_wait(flows_cluster: Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "dispatched"
    result = run(flows_cluster, "DispatchAndGo", str(marker))
    assert result == {"detached": None, "value": "after dispatch"}
    wait_until(marker.exists, 15, message="the dispatched task to run")


def test_dispatched_task_result_is_recorded(flows_cluster: Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "dispatched"
    with flows_cluster.client() as client:
        run_id = client.start("DispatchAndGo", str(marker))
        client.wait(run_id, timeout=30)
    database = flows_cluster.database
    wait_until(
        lambda: database.results_per_step(run_id).get(1) == 1,
        15,
        message="the dispatched step's result in history",
    )
    kinds = [
        row[0]
        for row in database.rows(
            "SELECT kind FROM history WHERE run_id = :id AND step = 1 ORDER BY seq", id=run_id
        )
    ]
    assert kinds == ["task_dispatched", "task_completed"]


def test_function_workflow_by_decorator(flows_cluster: Cluster) -> None:
    with flows_cluster.client() as client:
        run_id = client.start(flows.function_flow, 4)
        assert client.wait(run_id, timeout=30) == 8


def test_workflow_class_dispatch_by_class(flows_cluster: Cluster) -> None:
    with flows_cluster.client() as client:
        run_id = flows.Ordered("A-17").dispatch(client=client)
        assert client.wait(run_id, timeout=30) == "A-17"
        stored = client.get_run(business_id="order-A-17")
    assert stored["business_id"] == "order-A-17"


def test_rich_values_round_trip(flows_cluster: Cluster) -> None:
    payload = flows.rich_payload()
    result = run(flows_cluster, "RichValues", payload)
    assert result == payload
    assert isinstance(result["pair"], tuple)
    assert isinstance(result["raw"], bytes)


@pytest.mark.parametrize(
    ("workflow", "expected"),
    [
        ("YieldsNonCommand", "42 of type int, which is not a command"),
        ("YieldsGenerator", "use `yield from helper(...)`"),
        ("ReturnsGenerator", "return (yield from helper(...))"),
    ],
)
def test_invalid_yield_fails_with_hint(
    flows_cluster: Cluster, workflow: str, expected: str
) -> None:
    with flows_cluster.client() as client:
        run_id = client.start(workflow)
        with pytest.raises(RunFailed) as failure:
            client.wait(run_id, timeout=30)
    assert expected in failure.value.error["message"]


def test_async_client_starts_and_waits(flows_cluster: Cluster) -> None:
    async def main() -> object:
        async with AsyncClient(namespace=flows_cluster.namespace) as client:
            run_ids = await asyncio.gather(*(client.start("Sequential", n) for n in range(3)))
            return await asyncio.gather(*(client.wait(run_id, timeout=30) for run_id in run_ids))

    results = asyncio.run(main())
    assert results == [[0, 1, 1], [2, 3, 3], [4, 5, 5]]


def test_every_step_has_one_result(flows_cluster: Cluster) -> None:
    with flows_cluster.client() as client:
        run_id = client.start("Parallel", 4)
        client.wait(run_id, timeout=30)
    counts = flows_cluster.database.results_per_step(run_id)
    assert sorted(counts) == [1, 2, 3, 4, 5, 6]
    assert set(counts.values()) == {1}
