"""Crash recovery: engines and agents killed (SIGKILL) or stopped (SIGTERM) under load.

Every test starts real processes on a fresh database (SQLite and PostgreSQL). It checks,
from the database, that each run completes with exactly one result per step. It also checks
that the engine empties its outbox, which shows that RabbitMQ confirmed every task message
the engine wrote. The counts printed by the tests (kills, duplicate results ignored) show
with ``pytest -s``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Cluster, Database, Process, cluster_of, wait_until
from zenflow import serializer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# The ``Steps`` workflow of the test apps returns the sum of its step indexes.
STEPS = 20
STEPS_RESULT = sum(range(STEPS))
GATED_RESULT = ["before", "gated", "after"]
# Seconds allowed for runs to finish, and for a stopped process to exit.
RUNS_DEADLINE = 90.0
EXIT_DEADLINE = 30.0


@pytest.fixture
def cluster(tmp_path: Path, backend: str, rabbitmq: str) -> Iterator[Cluster]:
    with cluster_of(tmp_path, backend, "crashy") as cluster:
        yield cluster


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    """The file to which each execution of ``gated_echo`` appends its process id."""
    return tmp_path / "journal"


@pytest.fixture
def gate(cluster: Cluster, tmp_path: Path) -> Iterator[Path]:
    """The file that lets ``gated_echo`` finish.

    Teardown creates it before the cluster stops, so a failed test leaves no agent waiting.
    """
    path = tmp_path / "gate"
    yield path
    path.touch()


# Helpers.


def wait_for(
    cluster: Cluster,
    condition: Callable[[], Any],
    message: str,
    timeout: float = RUNS_DEADLINE,
    alive: Process | None = None,
) -> None:
    """Poll ``condition`` like ``wait_until``, failing with the process logs on timeout, or
    at once if the ``alive`` process exits."""

    def check() -> Any:
        if alive is not None and alive.popen.poll() is not None:
            raise AssertionError(
                f"zenflow {alive.args[0]} exited with {alive.popen.returncode} while waiting "
                f"for {message}\n{cluster.logs()}"
            )
        return condition()

    try:
        wait_until(check, timeout, interval=0.05, message=message)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{cluster.logs()}") from None


def start_runs(cluster: Cluster, count: int, workflow: str, *args: object) -> list[str]:
    with cluster.client() as client:
        return [client.start(workflow, *args) for _ in range(count)]


def count_results(database: Database) -> int:
    return int(
        database.scalar(
            "SELECT COUNT(*) FROM history WHERE kind IN ('task_completed', 'task_failed')"
        )
    )


def count_finished(database: Database) -> int:
    return int(database.scalar("SELECT COUNT(*) FROM runs WHERE status <> 'running'"))


def count_ignored_results(database: Database) -> int:
    return int(database.scalar("SELECT COUNT(*) FROM history WHERE kind = 'result_ignored'"))


def count_log_events(cluster: Cluster, kind: str, event: str) -> int:
    return sum(
        process.log_text().count(f'"event": "{event}"')
        for process in cluster.processes
        if process.args[0] == kind
    )


def wait_for_runs(cluster: Cluster, run_ids: list[str], engine: Process) -> None:
    wait_for(
        cluster,
        lambda: count_finished(cluster.database) == len(run_ids),
        f"all {len(run_ids)} runs to finish",
        alive=engine,
    )
    wait_for(
        cluster,
        lambda: cluster.database.scalar("SELECT COUNT(*) FROM outbox") == 0,
        "the engine to empty the outbox",
        timeout=30,
        alive=engine,
    )


def run_result(database: Database, run_id: str) -> Any:
    encoded = database.scalar("SELECT result FROM runs WHERE id = :id", id=run_id)
    return None if encoded is None else serializer.decode(bytes(encoded))


def one_result_per_step(steps: int) -> dict[int, int]:
    return {step: 1 for step in range(1, steps + 1)}


def executions(journal: Path) -> list[str]:
    """Return the process ids recorded by each execution of ``gated_echo``, in order."""
    if not journal.exists():
        return []
    return journal.read_text().split()


def assert_steps_runs_recovered(database: Database, run_ids: list[str]) -> None:
    statuses = {run_id: database.run_status(run_id) for run_id in run_ids}
    assert set(statuses.values()) == {"completed"}, statuses
    for run_id in run_ids:
        assert run_result(database, run_id) == STEPS_RESULT, run_id
    for run_id in run_ids:
        assert database.results_per_step(run_id) == one_result_per_step(STEPS), run_id
    # A redelivered task repeats attempt 1, so each step has one attempt row, completed.
    for run_id in run_ids:
        attempts = database.rows(
            "SELECT step, status FROM attempts WHERE run_id = :id ORDER BY step", id=run_id
        )
        assert [(int(step), status) for step, status in attempts] == [
            (step, "completed") for step in range(1, STEPS + 1)
        ], run_id


def assert_no_error_logged(cluster: Cluster) -> None:
    for process in cluster.processes:
        errors = [line for line in process.log_text().splitlines() if '"level": "error"' in line]
        assert errors == [], process.log_path.name


def report(cluster: Cluster, title: str, began: float, **figures: object) -> None:
    """Print one line of figures for the test report (shown with ``pytest -s``)."""
    database = cluster.database
    figures["ignored_in_history"] = count_ignored_results(database)
    figures["ignored_in_logs"] = count_log_events(cluster, "engine", "duplicate_result_ignored")
    figures["seconds"] = round(time.monotonic() - began, 1)
    line = ", ".join(f"{name}={value}" for name, value in figures.items())
    print(f"\n[{database.backend}] {title}: {line}")


# Engine crashes.


def test_engine_sigkill_mid_load(cluster: Cluster) -> None:
    began = time.monotonic()
    database = cluster.database
    engine = cluster.start_engine()
    cluster.start_agent()
    run_ids = start_runs(cluster, 20, "Steps", STEPS, 0.01)

    wait_for(
        cluster,
        lambda: count_results(database) >= 100,
        "100 step results before the kill",
        alive=engine,
    )
    engine.kill()
    results_at_kill = count_results(database)
    finished_at_kill = count_finished(database)
    assert finished_at_kill < len(run_ids), "every run had finished before the kill"

    engine = cluster.start_engine()
    wait_for_runs(cluster, run_ids, engine)

    assert_steps_runs_recovered(database, run_ids)
    show = cluster.zenflow("runs", "show", run_ids[0])
    assert show.returncode == 0, show.stderr
    assert "timeline" in show.stdout
    assert f"step {STEPS} completed" in show.stdout
    assert f"run completed -> {STEPS_RESULT}" in show.stdout
    assert_no_error_logged(cluster)
    report(
        cluster,
        "engine SIGKILL mid-load",
        began,
        runs=len(run_ids),
        kills=1,
        results_at_kill=results_at_kill,
        finished_at_kill=finished_at_kill,
    )


def test_engine_sigkill_repeatedly(cluster: Cluster) -> None:
    began = time.monotonic()
    database = cluster.database
    engine = cluster.start_engine()
    cluster.start_agent()
    run_ids = start_runs(cluster, 10, "Steps", STEPS, 0.01)
    kills: list[int] = []

    def kill_when(condition: Callable[[], bool], moment: str) -> None:
        nonlocal engine
        wait_for(cluster, condition, moment, alive=engine)
        engine.kill()
        kills.append(count_results(database))
        assert count_finished(database) < len(run_ids), f"every run had finished at {moment}"
        engine = cluster.start_engine()

    kill_when(lambda: count_results(database) >= 20, "20 step results (early)")
    # Killed while it handles the results and the outbox that the previous engine left.
    kill_when(
        lambda: count_results(database) > kills[-1],
        "the restarted engine's first new result (recovery)",
    )
    kill_when(lambda: count_results(database) >= 140, "140 step results (late)")
    wait_for_runs(cluster, run_ids, engine)

    assert_steps_runs_recovered(database, run_ids)
    assert_no_error_logged(cluster)
    report(
        cluster,
        "engine SIGKILL x3",
        began,
        runs=len(run_ids),
        kills=len(kills),
        results_at_kills=kills,
    )


def test_engine_sigterm_exits_cleanly(cluster: Cluster) -> None:
    began = time.monotonic()
    database = cluster.database
    engine = cluster.start_engine()
    cluster.start_agent()
    run_ids = start_runs(cluster, 5, "Steps", STEPS, 0.02)
    wait_for(cluster, lambda: count_results(database) >= 20, "20 step results before SIGTERM")

    stopping = time.monotonic()
    exit_code = engine.stop(timeout=EXIT_DEADLINE)
    stop_seconds = time.monotonic() - stopping
    assert exit_code == 0, engine.log_text()[-3000:]
    assert '"event": "engine_stopped"' in engine.log_text()
    assert count_finished(database) < len(run_ids), "every run had finished before SIGTERM"

    engine = cluster.start_engine()
    wait_for_runs(cluster, run_ids, engine)
    assert_steps_runs_recovered(database, run_ids)
    assert_no_error_logged(cluster)
    report(
        cluster,
        "engine SIGTERM",
        began,
        runs=len(run_ids),
        stop_seconds=round(stop_seconds, 2),
    )


# Agent crashes.


def test_agent_sigkill_redelivers_task(cluster: Cluster, journal: Path, gate: Path) -> None:
    began = time.monotonic()
    database = cluster.database
    engine = cluster.start_engine()
    agent = cluster.start_agent()
    with cluster.client() as client:
        run_id = client.start("Gated", str(journal), str(gate))
    wait_for(cluster, lambda: len(executions(journal)) == 1, "the gated task to start")

    agent.kill()
    replacement = cluster.start_agent()
    wait_for(
        cluster,
        lambda: len(executions(journal)) == 2,
        "RabbitMQ to deliver the gated task to the new agent",
    )
    gate.touch()
    wait_for_runs(cluster, [run_id], engine)

    assert database.run_status(run_id) == "completed"
    assert run_result(database, run_id) == GATED_RESULT
    assert database.results_per_step(run_id) == one_result_per_step(3)
    assert executions(journal) == [str(agent.popen.pid), str(replacement.popen.pid)]
    assert_no_error_logged(cluster)
    report(cluster, "agent SIGKILL", began, kills=1, executions=len(executions(journal)))


def test_agent_sigterm_finishes_task(cluster: Cluster, journal: Path, gate: Path) -> None:
    began = time.monotonic()
    database = cluster.database
    engine = cluster.start_engine()
    agent = cluster.start_agent()
    with cluster.client() as client:
        run_id = client.start("Gated", str(journal), str(gate))
    wait_for(cluster, lambda: len(executions(journal)) == 1, "the gated task to start")

    agent.popen.send_signal(signal.SIGTERM)
    agent.wait_for_log("agent_stopping")
    gate.touch()
    # Process.stop() would send a second SIGTERM, which makes the agent exit at once.
    exit_code = agent.popen.wait(timeout=EXIT_DEADLINE)
    agent.stop()
    assert exit_code == 0, agent.log_text()[-3000:]
    assert '"event": "agent_stopped"' in agent.log_text()
    # The stopping agent published the gated step's result before it exited.
    wait_for(
        cluster,
        lambda: database.results_per_step(run_id).get(2) == 1,
        "the gated step's result in history",
        alive=engine,
    )

    cluster.start_agent()
    wait_for_runs(cluster, [run_id], engine)
    assert database.run_status(run_id) == "completed"
    assert run_result(database, run_id) == GATED_RESULT
    assert database.results_per_step(run_id) == one_result_per_step(3)
    assert executions(journal) == [str(agent.popen.pid)]
    assert_no_error_logged(cluster)
    report(cluster, "agent SIGTERM", began, executions=len(executions(journal)))
