"""Long tasks: the hand-over to the engine's lease, a hung agent, and RabbitMQ's ack timeout.

An agent acknowledges the delivery of an attempt that runs longer than ``--ack-after`` and
keeps it alive with heartbeats instead. These tests run such attempts with real processes:
one on an agent that hangs (SIGSTOP, which RabbitMQ does not notice), and one that runs
several times longer than a lowered ``consumer_timeout``.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_service
from tests.support import (
    POSTGRES_ADMIN_URL,
    Cluster,
    Process,
    cluster_of,
    count_kind,
    read_trace,
    result_of,
    start,
    wait_until,
)

pytestmark = pytest.mark.e2e


def executions(path: Path) -> list[tuple[int, int, str]]:
    """Return (attempt, pid, note) of each line of a trace file."""
    return [(line.attempt, line.pid, line.note) for line in read_trace(path)]


@pytest.fixture(params=["sqlite", "postgresql"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path, rabbitmq: str) -> Iterator[Cluster]:
    if request.param == "postgresql":
        require_service("PostgreSQL", POSTGRES_ADMIN_URL, 5432)
    with cluster_of(tmp_path, str(request.param), "failures") as running:
        running.start_engine()
        yield running


def test_hung_agent_lease_expires(cluster: Cluster, tmp_path: Path) -> None:
    # One slot, handed over: the hung agent takes no further message, such as attempt 2.
    hung = cluster.start_agent("--ack-after", "0.5", "--lease", "2", "--concurrency", "1")
    trace = tmp_path / "long.trace"
    run_id = start(cluster, "attempt", "Long", str(trace), 4.0)
    hung.wait_for_log("task_handed_over")
    hung.popen.send_signal(signal.SIGSTOP)
    try:
        # RabbitMQ keeps the hung agent's connection, so only the lease's expiry reveals it.
        healthy = cluster.start_agent("--ack-after", "0.5", "--lease", "2")
        result = result_of(cluster, run_id, timeout=30)
    finally:
        hung.popen.send_signal(signal.SIGCONT)

    assert result["value"].startswith("ran 4.0 s")
    assert count_kind(cluster, run_id, "task_retried") == 1
    failed = cluster.database.scalar(
        "SELECT error FROM attempts WHERE run_id = :id AND attempt = 1", id=run_id
    )
    assert "TaskLeaseExpired" in failed
    assert "stopped sending heartbeats" in failed
    # The hung agent wakes up, finishes attempt 1 and reports it; the engine ignores it.
    wait_until(lambda: count_kind(cluster, run_id, "result_ignored") == 1, 20)
    assert cluster.database.results_per_step(run_id) == {1: 1}
    attempts_by_pid = {(attempt, pid) for attempt, pid, note in executions(trace) if not note}
    assert attempts_by_pid == {(1, hung.popen.pid), (2, healthy.popen.pid)}
    print(f"lease expiry: attempts {sorted(attempts_by_pid)}; stale result ignored")


# RabbitMQ's delivery acknowledgement timeout, lowered for one test.


def rabbitmq_setting(name: str, value: int) -> None:
    subprocess.run(
        ["rabbitmqctl", "eval", f"application:set_env(rabbit, {name}, {value})."],
        check=True,
        capture_output=True,
        timeout=60,
    )


@contextlib.contextmanager
def short_consumer_timeout() -> Iterator[None]:
    """Lower consumer_timeout to 5 s, checked every second, for channels opened meanwhile."""
    try:
        rabbitmq_setting("consumer_timeout", 5000)
        rabbitmq_setting("channel_tick_interval", 1000)
        yield
    finally:
        rabbitmq_setting("consumer_timeout", 1800000)
        rabbitmq_setting("channel_tick_interval", 60000)


def run_long_task(cluster: Cluster, trace: Path, *agent_options: str) -> tuple[Process, str]:
    agent = cluster.start_agent(*agent_options)
    return agent, start(cluster, "attempt", "Long", str(trace), 15.0)


@pytest.mark.serial
@pytest.mark.slow
def test_task_past_ack_timeout_runs_once(tmp_path: Path, rabbitmq: str) -> None:
    with cluster_of(tmp_path, "sqlite", "failures") as cluster, short_consumer_timeout():
        cluster.start_engine()
        trace = tmp_path / "once.trace"
        agent, run_id = run_long_task(cluster, trace, "--ack-after", "1")

        result = result_of(cluster, run_id, timeout=60)

        assert result["value"] == "ran 15.0 s as execution 1"
        assert [note for *_, note in executions(trace)] == ["", "done"]
        assert "PRECONDITION_FAILED" not in agent.log_text()
        assert cluster.database.results_per_step(run_id) == {1: 1}


@pytest.mark.serial
@pytest.mark.slow
def test_no_hand_over_means_redelivery(tmp_path: Path, rabbitmq: str) -> None:
    """The control case: it shows that the lowered timeout is in force during these tests."""
    with cluster_of(tmp_path, "sqlite", "failures") as cluster, short_consumer_timeout():
        cluster.start_engine()
        trace = tmp_path / "twice.trace"
        agent, run_id = run_long_task(cluster, trace, "--ack-after", "1500")

        wait_until(lambda: len(executions(trace)) >= 2, 30, message="a second execution")
        assert executions(trace)[1][0] == 1  # the same attempt, delivered again
        agent.kill()
