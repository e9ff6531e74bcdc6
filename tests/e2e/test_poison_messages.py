"""Poison messages: a task that ends its agent process on every delivery.

An agent counts the deliveries of each task message that ended without a result. After
``--max-deliveries`` of them it moves the message to the dead-letter queue and fails the
task's step with ``PoisonMessage`` instead of running it again (agent/deliveries.py). These
tests restart the agent each time the task kills it, as a process supervisor would.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from tests.support import AMQP_URL, Cluster, Process, cluster_of, utc, wait_until
from zenflow import serializer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_DELIVERIES = 3
# Seconds the crashing task waits before it ends its agent, and the tasks that run beside
# it, each sleeping longer than that, so that they are running when it ends the agent.
CRASH_DELAY = 0.2
SIBLINGS = 3
SIBLING_SECONDS = 0.5
QUICK_RUNS_PER_RESTART = 2
DEADLINE = 60.0


@pytest.fixture
def cluster(tmp_path: Path, rabbitmq: str) -> Iterator[Cluster]:
    with cluster_of(tmp_path, "sqlite", "poison") as cluster:
        yield cluster


def start_agent(cluster: Cluster, wait: bool = True) -> Process:
    """Start an agent. Without ``wait``, return at once, because a redelivered message may
    end the agent before it logs its start."""
    return cluster.start_agent(
        "--max-deliveries", str(MAX_DELIVERIES), "--concurrency", str(SIBLINGS + 1), wait=wait
    )


def executions(journal: Path) -> list[str]:
    """Return the process id recorded by each execution of ``crash``, in order."""
    if not journal.exists():
        return []
    return journal.read_text().split()


def finished_at(cluster: Cluster, run_id: str) -> dt.datetime | None:
    value = cluster.database.scalar("SELECT finished_at FROM runs WHERE id = :id", id=run_id)
    return None if value is None else utc(value)


def run_error(cluster: Cluster, run_id: str) -> dict[str, Any]:
    stored = cluster.database.scalar("SELECT error FROM runs WHERE id = :id", id=run_id)
    assert stored is not None, f"run {run_id} has no error"
    error: dict[str, Any] = json.loads(stored)
    return error


def run_result(cluster: Cluster, run_id: str) -> Any:
    encoded = cluster.database.scalar("SELECT result FROM runs WHERE id = :id", id=run_id)
    return None if encoded is None else serializer.decode(bytes(encoded))


def take_dead_letters(queue: str) -> list[tuple[Any, bytes]]:
    """Consume every message of the dead-letter queue and return their properties and bodies."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        messages = []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return messages
            messages.append((properties, body))
    finally:
        connection.close()


def test_poison_message_is_dead_lettered(cluster: Cluster, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    cluster.start_engine()
    agents = [start_agent(cluster)]
    with cluster.client() as client:
        poison_id = client.start(
            "CrashesAgent", str(journal), CRASH_DELAY, SIBLINGS, SIBLING_SECONDS
        )
    # Batches of quick runs, one started after each agent death, while the crashing task's
    # message is still queued.
    quick: list[list[str]] = []

    def poison_run_settled() -> bool:
        """Restart the agent when it has died, and start quick runs before each restart."""
        if cluster.database.run_status(poison_id) not in (None, "running"):
            return True
        if agents[-1].popen.poll() is None:
            return False
        with cluster.client() as client:
            quick.append([client.start("Quick", len(quick)) for _ in range(QUICK_RUNS_PER_RESTART)])
        agents.append(start_agent(cluster, wait=False))
        return False

    try:
        wait_until(poison_run_settled, DEADLINE, message=f"run {poison_id} to end")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{cluster.logs()}") from None
    quick_ids = [run_id for batch in quick for run_id in batch]
    wait_until(
        lambda: all(finished_at(cluster, run_id) is not None for run_id in quick_ids),
        DEADLINE,
        message="the quick runs to finish",
    )
    print(f"\npoison message: executions={len(executions(journal))}, agents={len(agents)}")

    # Each execution ended its agent; the next delivery after the last went to the
    # dead-letter queue without running the task.
    died = agents[:-1]
    assert len(executions(journal)) == MAX_DELIVERIES
    assert executions(journal) == [str(agent.popen.pid) for agent in died]
    assert [agent.popen.returncode for agent in died] == [1] * MAX_DELIVERIES
    assert agents[-1].popen.poll() is None, "the last agent died"

    # The run failed at its yield with PoisonMessage. The tasks beside the crashing one died
    # with it on its first delivery, then ran alone and completed.
    assert cluster.database.run_status(poison_id) == "failed"
    error = run_error(cluster, poison_id)
    assert error["type"] == "TaskFailed"
    assert error["step"] == 1
    assert error["cause"]["type"] == "PoisonMessage"
    message = error["cause"]["message"]
    assert f"died or stopped {MAX_DELIVERIES} times" in message
    assert f"{cluster.namespace}.dead" in message
    results = {step: 1 for step in range(1, SIBLINGS + 2)}
    assert cluster.database.results_per_step(poison_id) == results
    sibling_statuses = cluster.database.rows(
        "SELECT step, status FROM attempts WHERE run_id = :id AND step > 1 ORDER BY step",
        id=poison_id,
    )
    assert [(int(step), status) for step, status in sibling_statuses] == [
        (step, "completed") for step in range(2, SIBLINGS + 2)
    ]

    # Other tasks on the queue kept flowing: the quick runs started before the last execution
    # of the crashing task finished before its run did.
    assert len(quick) == MAX_DELIVERIES
    for index, run_id in enumerate(quick_ids):
        assert cluster.database.run_status(run_id) == "completed", run_id
        assert run_result(cluster, run_id) == index // QUICK_RUNS_PER_RESTART
    poison_end = finished_at(cluster, poison_id)
    assert poison_end is not None
    for run_id in [run_id for batch in quick[:-1] for run_id in batch]:
        quick_end = finished_at(cluster, run_id)
        assert quick_end is not None
        assert quick_end < poison_end, run_id

    # The message waits in the dead-letter queue with its count and its origin.
    dead = take_dead_letters(f"{cluster.namespace}.dead")
    assert len(dead) == 1
    properties, body = dead[0]
    assert properties.headers["x-zenflow-deliveries"] == MAX_DELIVERIES
    assert properties.headers["x-zenflow-queue"] == f"{cluster.namespace}.tasks.default"
    assert properties.correlation_id == f"{poison_id}:1:1"
    task = serializer.decode(body)
    assert task["task"] == "crash"
    assert task["run_id"] == poison_id
