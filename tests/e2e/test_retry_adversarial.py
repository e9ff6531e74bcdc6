"""Attacks on retries, timeouts, leases and manual retry, with real engines and agents.

Each test runs the tasks of the ``adversarial`` app, which append a line to a trace file at
the start of every attempt, so a test counts executions from outside the store.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_service
from tests.support import (
    POSTGRES_ADMIN_URL,
    Cluster,
    Process,
    cluster_of,
    count_kind,
    history_kinds,
    read_trace,
    result_of,
    send,
    start,
    utc,
    wait_for_kind,
    wait_until,
)
from zenflow import RequestRejected, RunFailed

pytestmark = pytest.mark.e2e

QUEUE = "adversarial"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, rabbitmq: str
) -> Iterator[Cluster]:
    if request.param == "postgresql":
        require_service("PostgreSQL", POSTGRES_ADMIN_URL, 5432)
    folder = tmp_path_factory.mktemp(f"adversarial-{request.param}")
    with cluster_of(folder, str(request.param), "adversarial") as running:
        running.start_engine()
        running.start_agent("--concurrency", "4", "--queue", QUEUE)
        yield running


@pytest.fixture(params=["sqlite", "postgresql"])
def own_cluster(request: pytest.FixtureRequest, tmp_path: Path, rabbitmq: str) -> Iterator[Cluster]:
    """A cluster with an engine and no agent, for tests that start and kill processes."""
    if request.param == "postgresql":
        require_service("PostgreSQL", POSTGRES_ADMIN_URL, 5432)
    with cluster_of(tmp_path, str(request.param), "adversarial") as running:
        running.start_engine()
        yield running


executions = read_trace


def starts(path: Path) -> list[int]:
    """Return the attempt number of each execution that started."""
    return [attempt for _, attempt, _, note in executions(path) if not note]


def attempt_numbers(cluster: Cluster, run_id: str, step: int = 1) -> list[int]:
    rows = cluster.database.rows(
        "SELECT attempt FROM attempts WHERE run_id = :id AND step = :step ORDER BY attempt",
        id=run_id,
        step=step,
    )
    return [row.attempt for row in rows]


def pending_timers(cluster: Cluster, run_id: str) -> int:
    return int(
        cluster.database.scalar(
            "SELECT count(*) FROM timers WHERE run_id = :id AND status = 'pending'", id=run_id
        )
    )


def running_engine(cluster: Cluster) -> Process:
    return next(p for p in cluster.processes if p.args[0] == "engine" and p.popen.poll() is None)


# Dispatched tasks, races and parallel lists.


def test_dispatched_task_retried_after_run_completes(cluster: Cluster, tmp_path: Path) -> None:
    # The dispatched task fails at once and is due again 2 s later. The run completes after
    # 0.5 s, and the retry policy of the dispatched task must still apply.
    flaky, slow = tmp_path / "dispatched.trace", tmp_path / "slow.trace"
    run_id = start(cluster, "dispatch_then_wait", str(flaky), str(slow), 0.5)

    assert result_of(cluster, run_id) == {"value": "slept 0.5 s"}
    assert count_kind(cluster, run_id, "task_retry_scheduled") == 1

    wait_until(lambda: len(starts(flaky)) == 2, 10, message="the dispatched task's retry")


def test_dispatched_task_failing_after_completion_retried(cluster: Cluster, tmp_path: Path) -> None:
    # The run completes at once. Its dispatched task fails 1 s later, with a retry due 1 s
    # after that. The engine records task_retry_scheduled after run_completed, then drops
    # the retry when its timer fires, because the run has finished.
    trace = tmp_path / "late.trace"
    run_id = start(cluster, "dispatch_late", str(trace))

    assert result_of(cluster, run_id) == "done"
    wait_for_kind(cluster, run_id, "task_retry_scheduled")

    wait_until(lambda: len(starts(trace)) == 2, 10, message="the dispatched task's retry")
    assert pending_timers(cluster, run_id) == 0


def test_losing_task_of_first_retried_after_run_completes(cluster: Cluster, tmp_path: Path) -> None:
    # The docstring of wait.first() states that tasks that lost go on. This one fails at
    # once, its retry is due 2 s later, and the timer wins after 0.5 s, which completes the
    # run.
    trace = tmp_path / "loser.trace"
    run_id = start(cluster, "race_with_timer", str(trace), 0.5)

    assert result_of(cluster, run_id) == {"position": 1}

    wait_until(lambda: len(starts(trace)) == 2, 10, message="the losing task's retry")


def test_parallel_task_retries_beside_another(cluster: Cluster, tmp_path: Path) -> None:
    flaky, quick = tmp_path / "parallel.trace", tmp_path / "quick.trace"
    run_id = start(cluster, "parallel_one_retries", str(flaky), str(quick))

    result = result_of(cluster, run_id)

    assert result == {"values": ["ok at attempt 3", "quick"]}
    assert starts(flaky) == [1, 2, 3]
    assert starts(quick) == [1]
    assert cluster.database.results_per_step(run_id) == {1: 1, 2: 1}


# Kill and pause while a retry is due.


def wait_past_retry(cluster: Cluster, run_id: str) -> None:
    """Wait until 1 s after the run's first retry was due."""
    retry_at = utc(
        cluster.database.scalar(
            "SELECT fire_at FROM history WHERE run_id = :id AND kind = 'task_retry_scheduled'",
            id=run_id,
        )
    )
    later = retry_at + dt.timedelta(seconds=1)
    wait_until(lambda: dt.datetime.now(dt.UTC) > later, 10, message=f"{later}")


def test_kill_cancels_a_pending_retry(cluster: Cluster, tmp_path: Path) -> None:
    trace = tmp_path / "kill.trace"
    run_id = start(cluster, "one", "FailsOnceSlowRetry", str(trace))
    wait_for_kind(cluster, run_id, "task_retry_scheduled")

    with cluster.client() as client:
        client.kill(run_id, reason="retry pending")
    wait_past_retry(cluster, run_id)

    assert starts(trace) == [1]
    assert count_kind(cluster, run_id, "task_retried") == 0
    assert pending_timers(cluster, run_id) == 0


def test_pause_holds_a_pending_retry_until_resume(cluster: Cluster, tmp_path: Path) -> None:
    trace = tmp_path / "pause.trace"
    run_id = start(cluster, "one", "FailsOnceSlowRetry", str(trace))
    wait_for_kind(cluster, run_id, "task_retry_scheduled")

    with cluster.client() as client:
        client.pause(run_id)
        wait_past_retry(cluster, run_id)
        # A paused run makes no new decision and sends no new work, as a kill sends none.
        executed_while_paused = len(starts(trace))
        client.resume(run_id)

    assert result_of(cluster, run_id) == {"value": "ok after 2 executions"}
    assert executed_while_paused == 1


# Timeouts of sync tasks that never call heartbeat().


def test_hung_sync_tasks_leave_room_for_new_tasks(own_cluster: Cluster, tmp_path: Path) -> None:
    own_cluster.start_agent("--concurrency", "1", "--queue", QUEUE)
    hung = [tmp_path / f"hung-{n}.trace" for n in range(3)]
    for path in hung:
        run_id = start(own_cluster, "caught", "HangsSync", str(path), 8.0)
        assert result_of(own_cluster, run_id)["error"] == "TaskTimeout"

    quick = tmp_path / "quick.trace"
    began = time.monotonic()
    run_id = start(own_cluster, "caught", "Quick", str(quick))
    result = result_of(own_cluster, run_id, timeout=30)
    elapsed = time.monotonic() - began
    print(f"quick task after 3 hung sync tasks: {elapsed:.2f} s")

    assert result == {"value": "quick"}
    # Each hung thread sleeps 8 s; a free slot runs the quick task at once.
    assert elapsed < 4.0


# A tight retry loop.


def test_tight_retry_loop_does_not_starve_other_runs(cluster: Cluster, tmp_path: Path) -> None:
    began_loop = time.monotonic()
    loop_id = start(cluster, "caught", "TightLoop", str(tmp_path / "loop.trace"))
    wait_until(lambda: count_kind(cluster, loop_id, "task_retried") >= 5, 20)

    latencies = []
    for n in range(5):
        began = time.monotonic()
        run_id = start(cluster, "caught", "Quick", str(tmp_path / f"q{n}.trace"))
        assert result_of(cluster, run_id) == {"value": "quick"}
        latencies.append(time.monotonic() - began)
    print(f"quick runs during a tight retry loop: {[round(x, 2) for x in latencies]} s")

    result = result_of(cluster, loop_id, timeout=120)
    print(f"30 attempts without delay took {time.monotonic() - began_loop:.1f} s")
    assert result["error"] == "RuntimeError"
    assert attempt_numbers(cluster, loop_id) == list(range(1, 31))
    assert max(latencies) < 3.0


# Manual retry.


def failed_run(
    cluster: Cluster, tmp_path: Path, name: str, kind: str = "FailsUntilFile"
) -> tuple[str, Path, Path]:
    trace, unlock = tmp_path / f"{name}.trace", tmp_path / f"{name}.unlock"
    run_id = start(cluster, "one", kind, str(trace), str(unlock))
    with pytest.raises(RunFailed):
        result_of(cluster, run_id)
    return run_id, trace, unlock


def test_two_manual_retries_at_once_retry_once(cluster: Cluster, tmp_path: Path) -> None:
    # Each attempt takes 1.5 s, so the run is still running when the second request comes.
    run_id, trace, unlock = failed_run(cluster, tmp_path, "twice", "SlowlyFailsUntilFile")

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: cluster.zenflow("runs", "retry", run_id), range(2)))

    codes = sorted(outcome.returncode for outcome in outcomes)
    assert codes == [0, 1], [(o.returncode, o.stdout, o.stderr) for o in outcomes]
    refused = next(outcome for outcome in outcomes if outcome.returncode == 1)
    assert "only a failed run can be retried" in refused.stderr
    wait_until(lambda: count_kind(cluster, run_id, "run_failed") == 2, 20)
    assert count_kind(cluster, run_id, "run_retried") == 1
    assert starts(trace) == [1, 2]
    assert attempt_numbers(cluster, run_id) == [1, 2]


def test_manual_series_counted_after_engine_kill(own_cluster: Cluster, tmp_path: Path) -> None:
    own_cluster.start_agent("--queue", QUEUE)
    run_id, trace, _ = failed_run(own_cluster, tmp_path, "series", "FailsUntilFileWithBackoff")
    assert starts(trace) == [1, 2, 3]

    with own_cluster.client() as client:
        assert client.retry(run_id)["attempt"] == 4
    wait_until(lambda: count_kind(own_cluster, run_id, "task_retry_scheduled") == 3, 10)
    # The engine that replays the run must count the new series from attempt 4.
    running_engine(own_cluster).kill()
    own_cluster.start_engine()

    wait_until(lambda: count_kind(own_cluster, run_id, "run_failed") == 2, 20)
    # The new engine may publish again task messages whose outbox rows the killed engine
    # had not deleted yet; those executions of old attempts are ignored.
    assert sorted(set(starts(trace))) == [1, 2, 3, 4, 5, 6]
    assert attempt_numbers(own_cluster, run_id) == [1, 2, 3, 4, 5, 6]
    assert pending_timers(own_cluster, run_id) == 0


def test_retry_of_workflow_code_failure_fails_again(cluster: Cluster, tmp_path: Path) -> None:
    trace = tmp_path / "code.trace"
    run_id = start(cluster, "code_fails", str(trace))
    with pytest.raises(RunFailed):
        result_of(cluster, run_id)

    retried = cluster.zenflow("runs", "retry", run_id)

    assert retried.returncode == 0, retried.stderr
    wait_until(lambda: count_kind(cluster, run_id, "run_failed") == 2, 20)
    assert cluster.database.run_status(run_id) == "failed"
    assert starts(trace) == [1]  # the task's result is replayed, not run again
    assert cluster.database.results_per_step(run_id) == {1: 1}
    assert pending_timers(cluster, run_id) == 0


def test_retry_of_killed_and_completed_runs_refused(cluster: Cluster, tmp_path: Path) -> None:
    done = start(cluster, "one", "Quick", str(tmp_path / "done.trace"))
    result_of(cluster, done)
    killed = start(cluster, "one", "FailsOnceSlowRetry", str(tmp_path / "killed.trace"))
    wait_for_kind(cluster, killed, "task_retry_scheduled")
    with cluster.client() as client:
        client.kill(killed)

    for run_id, status in ((done, "completed"), (killed, "killed")):
        refused = cluster.zenflow("runs", "retry", run_id)
        assert refused.returncode == 1
        assert f"is {status}; only a failed run can be retried" in refused.stderr


def test_retry_of_failed_child_run_refused(cluster: Cluster, tmp_path: Path) -> None:
    trace, unlock = tmp_path / "child.trace", tmp_path / "child.unlock"
    parent = start(cluster, "parent_of_failing_child", str(trace), str(unlock))
    with pytest.raises(RunFailed):
        result_of(cluster, parent)
    child = cluster.database.scalar("SELECT id FROM runs WHERE parent_id = :id", id=parent)
    assert cluster.database.run_status(child) == "failed"

    refused_parent = cluster.zenflow("runs", "retry", parent)
    assert refused_parent.returncode == 1
    assert "child workflow" in refused_parent.stderr

    # The parent already has the failure, so a retried child would complete with no run
    # waiting for it.
    unlock.write_text("")
    refused_child = cluster.zenflow("runs", "retry", child)
    assert refused_child.returncode == 1, refused_child.stdout
    assert cluster.database.run_status(parent) == "failed"


def test_retry_refused_while_business_id_taken(cluster: Cluster, tmp_path: Path) -> None:
    key = f"order-{random.randrange(10**9)}"
    trace, unlock = tmp_path / "keyed.trace", tmp_path / "keyed.unlock"
    first = start(cluster, "Keyed", key, str(trace), str(unlock))
    with pytest.raises(RunFailed):
        result_of(cluster, first)
    holder = start(cluster, "KeyHolder", key)
    wait_for_kind(cluster, holder, "event_awaited")

    with cluster.client() as client, pytest.raises(RequestRejected) as rejected:
        client.retry(first)

    assert rejected.value.code == "business_id_taken"
    assert cluster.database.run_status(first) == "failed"
    assert count_kind(cluster, first, "run_retried") == 0
    assert starts(trace) == [1]
    send(cluster, holder, "release")
    assert result_of(cluster, holder) == "released"


def test_bulk_retry_honours_limit(own_cluster: Cluster, tmp_path: Path) -> None:
    own_cluster.start_agent("--concurrency", "4", "--queue", QUEUE)
    runs = [failed_run(own_cluster, tmp_path, f"bulk{n}")[0] for n in range(3)]

    retried = own_cluster.zenflow("runs", "retry", "--workflow", "one", "--limit", "2", "--yes")

    assert retried.returncode == 0, retried.stderr
    assert "2 failed runs of workflow one to retry" in retried.stdout
    wait_until(lambda: sum(count_kind(own_cluster, r, "run_failed") for r in runs) == 5, 20)
    assert sorted(count_kind(own_cluster, r, "run_retried") for r in runs) == [0, 1, 1]


# SIGKILL of engines and agents.


def test_engine_kills_during_backoff_lose_nothing(own_cluster: Cluster, tmp_path: Path) -> None:
    own_cluster.start_agent("--concurrency", "8", "--queue", QUEUE)
    rng = random.Random(4711)
    traces = [tmp_path / f"load-{n}.trace" for n in range(50)]
    runs = [start(own_cluster, "one", "FailsTwiceQuickly", str(path)) for path in traces]

    deadline = time.monotonic() + 8.0
    kills = 0
    while time.monotonic() < deadline and kills < 5:
        time.sleep(rng.uniform(0.2, 1.2))
        running_engine(own_cluster).kill()
        kills += 1
        own_cluster.start_engine()

    for run_id in runs:
        assert result_of(own_cluster, run_id, timeout=60) == {"value": "ok at attempt 3"}
    for run_id in runs:
        assert own_cluster.database.results_per_step(run_id) == {1: 1}, run_id
        assert attempt_numbers(own_cluster, run_id) == [1, 2, 3], run_id
        assert pending_timers(own_cluster, run_id) == 0, run_id
    print(f"{kills} engine kills over {len(runs)} runs")


def test_agent_killed_after_hand_over_retried_once(own_cluster: Cluster, tmp_path: Path) -> None:
    doomed = own_cluster.start_agent(
        "--ack-after", "0.5", "--lease", "2", "--concurrency", "1", "--queue", QUEUE
    )
    trace = tmp_path / "lease.trace"
    run_id = start(own_cluster, "caught", "LongBeats", str(trace), 3.0)
    doomed.wait_for_log("task_handed_over")
    doomed.popen.send_signal(signal.SIGKILL)
    doomed.popen.wait(10)
    healthy = own_cluster.start_agent("--ack-after", "0.5", "--lease", "2", "--queue", QUEUE)

    result: Any = result_of(own_cluster, run_id, timeout=30)

    assert result == {"value": "execution 2"}
    assert count_kind(own_cluster, run_id, "task_retried") == 1
    assert attempt_numbers(own_cluster, run_id) == [1, 2]
    pids = {pid for _, _, pid, note in executions(trace) if not note}
    assert pids == {doomed.popen.pid, healthy.popen.pid}


def test_engine_killed_while_lease_pending(own_cluster: Cluster, tmp_path: Path) -> None:
    agent = own_cluster.start_agent(
        "--ack-after", "0.5", "--lease", "2", "--concurrency", "1", "--queue", QUEUE
    )
    trace = tmp_path / "engine-lease.trace"
    run_id = start(own_cluster, "caught", "LongBeats", str(trace), 4.0)
    agent.wait_for_log("task_handed_over")
    wait_until(lambda: pending_timers(own_cluster, run_id) == 1, 10)
    running_engine(own_cluster).kill()
    # Down for longer than the lease: the agent's heartbeats wait in the results queue.
    time.sleep(3.0)
    own_cluster.start_engine()

    result = result_of(own_cluster, run_id, timeout=30)

    assert result["value"].startswith("execution")
    print(f"after an engine kill during a lease: {result}, {history_kinds(own_cluster, run_id)}")
    assert own_cluster.database.results_per_step(run_id) == {1: 1}
    # The agent sent heartbeats all along; only the engine was down.
    assert count_kind(own_cluster, run_id, "task_retried") == 0
    assert result == {"value": "execution 1"}
