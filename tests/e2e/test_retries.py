"""Retry policies, timeouts, heartbeats and manual retry, end to end.

Each task of the ``failures`` app appends a line to a trace file at the start of every
attempt, so these tests count executions from outside the store. They then check the store:
the attempts table, the history and the one result per step.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_service
from tests.support import (
    POSTGRES_ADMIN_URL,
    Cluster,
    cluster_of,
    count_kind,
    history_kinds,
    queue_depth,
    read_trace,
    result_of,
    start,
    utc,
    wait_for_kind,
    wait_until,
)
from zenflow import RunFailed

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, rabbitmq: str
) -> Iterator[Cluster]:
    if request.param == "postgresql":
        require_service("PostgreSQL", POSTGRES_ADMIN_URL, 5432)
    folder = tmp_path_factory.mktemp(f"retries-{request.param}")
    with cluster_of(folder, str(request.param), "failures") as running:
        running.start_engine()
        running.start_agent("--concurrency", "4", "--queue", "failures")
        yield running


def executions(path: Path) -> list[tuple[float, int, str]]:
    """Return (time, attempt, note) of each line of a trace file."""
    return [(line.time, line.attempt, line.note) for line in read_trace(path)]


def starts(path: Path) -> list[tuple[float, int]]:
    return [(when, attempt) for when, attempt, note in executions(path) if not note]


def attempt_rows(cluster: Cluster, run_id: str) -> list[dict[str, object]]:
    rows = cluster.database.rows(
        "SELECT attempt, status, error, started_at, finished_at FROM attempts "
        "WHERE run_id = :id ORDER BY attempt",
        id=run_id,
    )
    return [row._asdict() for row in rows]


def assert_one_result_per_step(cluster: Cluster, run_id: str) -> None:
    counts = cluster.database.results_per_step(run_id)
    assert counts and set(counts.values()) == {1}, counts


# Retry policies.


def test_backoff_delays_then_final_failure(cluster: Cluster, tmp_path: Path) -> None:
    trace = tmp_path / "always.trace"
    run_id = start(cluster, "attempt", "AlwaysFails", str(trace))

    result = result_of(cluster, run_id, timeout=40)

    assert result == {"error": "RuntimeError", "message": "failure number 4"}
    assert [attempt for _, attempt in starts(trace)] == [1, 2, 3, 4]
    rows = attempt_rows(cluster, run_id)
    assert [row["attempt"] for row in rows] == [1, 2, 3, 4]
    assert {row["status"] for row in rows} == {"failed"}
    # Each attempt starts at least its delay after the previous one failed.
    gaps = [
        (utc(later["started_at"]) - utc(earlier["finished_at"])).total_seconds()
        for earlier, later in zip(rows, rows[1:], strict=False)
    ]
    print(f"gaps between attempts: {[round(gap, 3) for gap in gaps]} s (delays 1, 2, 4 s)")
    for gap, delay in zip(gaps, [1, 2, 4], strict=True):
        assert gap >= delay
    assert count_kind(cluster, run_id, "task_retry_scheduled") == 3
    assert count_kind(cluster, run_id, "task_retried") == 3
    assert count_kind(cluster, run_id, "task_failed") == 1
    assert_one_result_per_step(cluster, run_id)


def test_runs_show_lists_attempts(cluster: Cluster, tmp_path: Path) -> None:
    run_id = start(cluster, "attempt", "FlakyTwice", str(tmp_path / "show.trace"))
    result_of(cluster, run_id)

    shown = cluster.zenflow("runs", "show", run_id)

    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    failed = [line for line in lines if "failed: FlakyTwice: ConnectionError" in line]
    assert len(failed) == 2
    assert "attempt 1 failed" in failed[0]
    assert "flaky failure number 1" in failed[0]
    assert "retry in 200 ms" in failed[0]
    assert any("step 1 attempt 2 sent for FlakyTwice" in line for line in lines)
    assert any("completed  FlakyTwice" in line and "attempt 3" in line for line in lines)


def test_unconsumed_queue_waits_durably(
    cluster: Cluster,
) -> None:
    run_id = start(cluster, "attempt", "Unheard")
    wait_for_kind(cluster, run_id, "task_scheduled")

    shown = cluster.zenflow("runs", "show", run_id)

    assert "step 1 task Unheard attempt 1 queued on 'unheard' since" in shown.stdout
    assert "no agent has reported it yet" in shown.stdout
    wait_until(lambda: queue_depth(cluster.namespace, "tasks.unheard") == 1, 10)
    cluster.start_agent("--queue", "unheard")
    assert result_of(cluster, run_id) == {"value": "heard at last"}


def test_flaky_task_succeeds_third_attempt(cluster: Cluster, tmp_path: Path) -> None:
    trace = tmp_path / "flaky.trace"
    run_id = start(cluster, "attempt", "FlakyTwice", str(trace))

    assert result_of(cluster, run_id) == {"value": "succeeded at attempt 3"}
    assert len(starts(trace)) == 3
    assert [row["status"] for row in attempt_rows(cluster, run_id)] == [
        "failed",
        "failed",
        "completed",
    ]
    assert_one_result_per_step(cluster, run_id)


@pytest.mark.parametrize("kind", ["Declined", "BadInput"])
def test_non_retryable_error_not_retried(cluster: Cluster, tmp_path: Path, kind: str) -> None:
    trace = tmp_path / f"{kind}.trace"
    run_id = start(cluster, "attempt", kind, str(trace))

    result = result_of(cluster, run_id)

    assert result["error"] in ("NonRetryableError", "KeyError")
    assert len(starts(trace)) == 1
    assert count_kind(cluster, run_id, "task_retry_scheduled") == 0
    assert_one_result_per_step(cluster, run_id)


def test_task_decides_retry_delay(cluster: Cluster, tmp_path: Path) -> None:
    trace = tmp_path / "decides.trace"
    run_id = start(cluster, "attempt", "DecidesItsDelay", str(trace))

    assert result_of(cluster, run_id)["error"] == "TimeoutError"
    times = [when for when, _ in starts(trace)]
    # Two attempts, not the policy's five, and 0.7 s apart, not the policy's 30 s.
    assert len(times) == 2
    assert 0.7 <= times[1] - times[0] < 10
    assert_one_result_per_step(cluster, run_id)


def test_retry_due_during_engine_downtime(cluster: Cluster, tmp_path: Path) -> None:
    trace = tmp_path / "down.trace"
    run_id = start(cluster, "attempt", "AlwaysFails", str(trace))
    wait_for_kind(cluster, run_id, "task_retry_scheduled")
    engine = next(p for p in cluster.processes if p.args[0] == "engine" and p.popen.poll() is None)
    engine.kill()
    # The second attempt was due 1 s after the first failure; the engine is down for 2 s.
    first_retry_at = utc(
        cluster.database.scalar(
            "SELECT fire_at FROM history WHERE run_id = :id AND kind = 'task_retry_scheduled'",
            id=run_id,
        )
    )
    wait_until(lambda: dt.datetime.now(dt.UTC) > first_retry_at + dt.timedelta(seconds=1), 10)
    assert len(starts(trace)) == 1
    cluster.start_engine()

    assert result_of(cluster, run_id, timeout=40)["error"] == "RuntimeError"
    # The restarted engine may publish the first attempt's message again, because the killed
    # engine had not yet cleared its outbox row. The result of that execution is ignored.
    assert sorted({attempt for _, attempt in starts(trace)}) == [1, 2, 3, 4]
    assert [row["attempt"] for row in attempt_rows(cluster, run_id)] == [1, 2, 3, 4]
    assert_one_result_per_step(cluster, run_id)


# Timeouts and heartbeats.


def test_async_timeout_cancels_and_retries(cluster: Cluster, tmp_path: Path) -> None:
    trace = tmp_path / "slow-async.trace"
    run_id = start(cluster, "attempt", "SlowAsync", str(trace))

    result = result_of(cluster, run_id)

    assert result["error"] == "TaskTimeout"
    assert "timeout of 0.5 s" in result["message"]
    assert len(starts(trace)) == 2
    wait_until(lambda: [n for *_, n in executions(trace) if n == "cancelled"] == ["cancelled"] * 2)
    assert_one_result_per_step(cluster, run_id)


def test_sync_timeout_stops_at_heartbeat(cluster: Cluster, tmp_path: Path) -> None:
    trace = tmp_path / "slow-sync.trace"
    run_id = start(cluster, "attempt", "SlowSync", str(trace))

    assert result_of(cluster, run_id)["error"] == "TaskTimeout"
    wait_until(lambda: executions(trace)[-1][2] == "cancelled", 10)


def test_missing_heartbeat_fails_attempt(cluster: Cluster, tmp_path: Path) -> None:
    trace = tmp_path / "silent.trace"
    run_id = start(cluster, "attempt", "Silent", str(trace))

    result = result_of(cluster, run_id)

    assert result["error"] == "TaskHeartbeatTimeout"
    assert "zenflow.heartbeat()" in result["message"]


# Manual retry.


def test_manual_retry_resumes_failed_step(cluster: Cluster, tmp_path: Path) -> None:
    trace, unlock = tmp_path / "manual.trace", tmp_path / "unlock"
    run_id = start(cluster, "must_succeed", "FailsUntilFile", str(trace), str(unlock))
    with pytest.raises(RunFailed):
        result_of(cluster, run_id)
    assert len(starts(trace)) == 2

    # Still locked: the retry gets the policy's two attempts again, then fails again.
    retried = cluster.zenflow("runs", "retry", run_id)
    assert retried.returncode == 0, retried.stderr
    assert "step 1 runs again as attempt 3, the first of a new series" in retried.stdout
    wait_until(lambda: count_kind(cluster, run_id, "run_failed") == 2, 20)
    assert [attempt for _, attempt in starts(trace)] == [1, 2, 3, 4]

    unlock.write_text("")
    with cluster.client() as client:
        reply = client.retry(run_id)
    assert reply["attempt"] == 5

    assert result_of(cluster, run_id) == {"value": "unlocked"}
    assert [attempt for _, attempt in starts(trace)] == [1, 2, 3, 4, 5]
    kinds = history_kinds(cluster, run_id)
    assert kinds.count("task_failed_retried") == 2
    assert kinds.count("run_retried") == 2
    assert kinds[0] == "run_started" and kinds[-1] == "run_completed"
    assert len(attempt_rows(cluster, run_id)) == 5
    assert_one_result_per_step(cluster, run_id)


def test_retry_of_unfailed_run_rejected(cluster: Cluster, tmp_path: Path) -> None:
    run_id = start(cluster, "attempt", "FlakyTwice", str(tmp_path / "ok.trace"))
    result_of(cluster, run_id)

    refused = cluster.zenflow("runs", "retry", run_id)

    assert refused.returncode == 1
    assert "only a failed run can be retried" in refused.stderr


def test_bulk_retry_asks_first(cluster: Cluster, tmp_path: Path) -> None:
    unlock = tmp_path / "unlock-all"
    runs = [
        start(cluster, "must_succeed", "FailsUntilFile", str(tmp_path / f"{n}.trace"), str(unlock))
        for n in range(3)
    ]
    for run_id in runs:
        with pytest.raises(RunFailed):
            result_of(cluster, run_id)

    declined = cluster.zenflow("runs", "retry", "--workflow", "must_succeed", input="n\n")
    assert declined.returncode == 1
    assert "3 failed runs of workflow must_succeed to retry" in declined.stdout
    assert count_kind(cluster, runs[0], "run_retried") == 0

    unlock.write_text("")
    accepted = cluster.zenflow(
        "runs", "retry", "--workflow", "must_succeed", "--status", "failed", input="y\n"
    )
    assert accepted.returncode == 0, accepted.stderr
    for run_id in runs:
        assert result_of(cluster, run_id) == {"value": "unlocked"}
        assert count_kind(cluster, run_id, "task_failed_retried") == 1
        assert_one_result_per_step(cluster, run_id)
    print(f"bulk retry: {len(runs)} failed runs retried, each completed with one result")
