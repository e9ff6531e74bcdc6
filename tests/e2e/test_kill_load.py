"""Kill load: engines and agents killed with SIGKILL at random moments while 300 runs go on.

Each round starts a real engine and one or two real agents, and starts 300 runs of
``Mixed``: sequential and parallel tasks on two queues, and a short timer. It then kills
the engine, an agent or both with SIGKILL, again and again, and starts new ones in their
place. A ``random.Random(seed)`` picks the process to kill and how many history entries the
runs must add before the kill. So a kill lands at a different point of the load every time,
sometimes right after a restart. The seed of a failing round replays the same choices,
though not the same timing.

At the end, the store must show every run completed with its expected result, one result
per step and none lost. ``test_crash_recovery.py`` kills at chosen points of a simpler load;
this module covers random points under a mixed load. Each round prints its figures, which
show with ``pytest -s``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.apps.kill_load import expected_mixed
from tests.support import Cluster, Process, cluster_of, wait_until
from zenflow import serializer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUNS = 300
# Seconds each task sleeps, and the timer of each run.
TASK_SECONDS = 0.005
TIMER_SECONDS = 0.3
# Kills stop after this many, or after this many seconds of load, whichever comes first.
MAX_KILLS = 16
CHAOS_SECONDS = 20.0
# Seconds allowed for the runs to progress to the next kill, and to finish after the last.
PROGRESS_DEADLINE = 30.0
FINISH_DEADLINE = 60.0
# Steps of a ``Mixed`` run: 1 to 4, 6 and 7 are tasks, 5 is the timer.
TASK_STEPS = (1, 2, 3, 4, 6, 7)
TIMER_STEP = 5
AGENT_CONCURRENCY = "8"


@dataclasses.dataclass
class Chaos:
    """The processes of a round, and the counts of what was done to them."""

    cluster: Cluster
    rng: random.Random
    engine: Process
    agents: list[Process]
    engine_kills: int = 0
    agent_kills: int = 0
    # Kill moments after which history grew before the next one (or the end), with the
    # restarted processes alive.
    recoveries: int = 0
    kill_points: list[int] = dataclasses.field(default_factory=list)

    @property
    def kills(self) -> int:
        return self.engine_kills + self.agent_kills


@pytest.fixture
def cluster(tmp_path: Path, backend: str, rabbitmq: str) -> Iterator[Cluster]:
    with cluster_of(tmp_path, backend, "kill_load") as cluster:
        yield cluster


# Reading the store.


def history_size(cluster: Cluster) -> int:
    return int(cluster.database.scalar("SELECT COUNT(*) FROM history"))


def count_finished(cluster: Cluster) -> int:
    return int(cluster.database.scalar("SELECT COUNT(*) FROM runs WHERE status <> 'running'"))


def run_result(cluster: Cluster, run_id: str) -> Any:
    encoded = cluster.database.scalar("SELECT result FROM runs WHERE id = :id", id=run_id)
    return None if encoded is None else serializer.decode(bytes(encoded))


def steps_of_kind(cluster: Cluster, run_id: str, kinds: tuple[str, ...]) -> list[int]:
    names = ", ".join(f"'{kind}'" for kind in kinds)
    rows = cluster.database.rows(
        f"SELECT step FROM history WHERE run_id = :id AND kind IN ({names}) ORDER BY step",
        id=run_id,
    )
    return [int(row[0]) for row in rows]


def log_records(cluster: Cluster, kind: str, event: str) -> list[dict[str, Any]]:
    """Return the JSON log records of ``event`` written by every process of ``kind``."""
    marker = f'"event": "{event}"'
    records = []
    for process in cluster.processes:
        if process.args[0] != kind:
            continue
        for line in process.log_text().splitlines():
            if marker in line:
                records.append(json.loads(line))
    return records


def error_lines(cluster: Cluster) -> list[str]:
    return [
        f"{process.log_path.name}: {line}"
        for process in cluster.processes
        for line in process.log_text().splitlines()
        if '"level": "error"' in line
    ]


# Driving the round.


def start_runs(cluster: Cluster) -> dict[str, int]:
    """Start the runs of the round and return each run's number by run id."""
    numbers = {}
    with cluster.client() as client:
        for number in range(RUNS):
            run_id = client.start("Mixed", number, TASK_SECONDS, TIMER_SECONDS)
            numbers[run_id] = number
    return numbers


def wait_for_progress(
    cluster: Cluster, goal: int, alive: list[Process], timeout: float = PROGRESS_DEADLINE
) -> bool:
    """Wait until history has ``goal`` entries or every run finished, and return whether
    every run finished."""

    def reached() -> str:
        for process in alive:
            if process.popen.poll() is not None:
                raise AssertionError(
                    f"{process.log_path.name} exited with {process.popen.returncode} "
                    f"before the test killed it\n{cluster.logs()}"
                )
        if count_finished(cluster) == RUNS:
            return "finished"
        return "progressed" if history_size(cluster) >= goal else ""

    try:
        outcome = wait_until(
            reached, timeout, message=f"{goal} history entries or all runs finished"
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\n{cluster.logs()}") from None
    return outcome == "finished"


def kill_and_restart(chaos: Chaos) -> None:
    """Kill the engine, one agent or both, chosen at random, and start new ones in their
    place once the killed ones have exited."""
    cluster = chaos.cluster
    draw = chaos.rng.random()
    kill_engine = draw < 0.55
    kill_agent = draw >= 0.45
    index = chaos.rng.randrange(len(chaos.agents))
    if kill_engine:
        chaos.engine.kill()
        chaos.engine_kills += 1
    if kill_agent:
        chaos.agents[index].kill()
        chaos.agent_kills += 1
    if kill_engine:
        chaos.engine = cluster.start_engine()
    if kill_agent:
        chaos.agents[index] = cluster.start_agent("--concurrency", AGENT_CONCURRENCY)


def entries_before_next_kill(rng: random.Random) -> int:
    """Draw the number of history entries the runs add before the next kill.

    One kill in four comes within 10 entries, which is often while the restarted engine
    publishes the outbox that the killed one left, or while agents take redelivered tasks.
    """
    if rng.random() < 0.25:
        return rng.randint(0, 10)
    return rng.randint(10, 400)


def run_chaos(chaos: Chaos) -> None:
    began = time.monotonic()
    while chaos.kills < MAX_KILLS and time.monotonic() - began < CHAOS_SECONDS:
        before = history_size(chaos.cluster)
        goal = before + entries_before_next_kill(chaos.rng)
        if wait_for_progress(chaos.cluster, goal, [chaos.engine, *chaos.agents]):
            return
        chaos.kill_points.append(history_size(chaos.cluster))
        if chaos.kills > 0 and chaos.kill_points[-1] > before:
            chaos.recoveries += 1
        kill_and_restart(chaos)


def wait_for_finish(cluster: Cluster, chaos: Chaos) -> None:
    # No history reaches this size, so the wait ends only when every run finished.
    wait_for_progress(cluster, 10**9, [chaos.engine, *chaos.agents], FINISH_DEADLINE)
    final_size = history_size(cluster)
    if chaos.kills > 0 and final_size > chaos.kill_points[-1]:
        chaos.recoveries += 1

    def outbox_empty() -> bool:
        return cluster.database.scalar("SELECT COUNT(*) FROM outbox") == 0

    try:
        wait_until(outbox_empty, 30, message="the engine to empty the outbox")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{cluster.logs()}") from None


# Checking the store.


def assert_runs_completed(cluster: Cluster, numbers: dict[str, int]) -> None:
    rows = cluster.database.rows("SELECT id, status FROM runs")
    statuses = {str(run_id): status for run_id, status in rows}
    assert sorted(statuses) == sorted(numbers), "runs in the store differ from those started"
    failed = {run_id: status for run_id, status in statuses.items() if status != "completed"}
    assert failed == {}, failed
    for run_id, number in numbers.items():
        assert run_result(cluster, run_id) == expected_mixed(number), run_id


def assert_one_result_per_step(cluster: Cluster, run_ids: list[str]) -> None:
    one_each = {step: 1 for step in TASK_STEPS}
    for run_id in run_ids:
        assert cluster.database.results_per_step(run_id) == one_each, run_id
    for run_id in run_ids:
        assert steps_of_kind(cluster, run_id, ("timer_fired",)) == [TIMER_STEP], run_id


def assert_no_step_lost(cluster: Cluster, run_ids: list[str]) -> None:
    every_step = sorted([*TASK_STEPS, TIMER_STEP])
    for run_id in run_ids:
        scheduled = steps_of_kind(cluster, run_id, ("task_scheduled", "timer_started"))
        assert scheduled == every_step, run_id
    # A redelivered or republished task repeats attempt 1, so each task step has one
    # attempt row, completed.
    for run_id in run_ids:
        attempts = cluster.database.rows(
            "SELECT step, status FROM attempts WHERE run_id = :id ORDER BY step", id=run_id
        )
        assert [(int(step), status) for step, status in attempts] == [
            (step, "completed") for step in TASK_STEPS
        ], run_id
    pending_timers = cluster.database.scalar("SELECT COUNT(*) FROM timers WHERE status = 'pending'")
    assert pending_timers == 0


def report(cluster: Cluster, chaos: Chaos, seed: int, began: float) -> None:
    """Print the round's figures (shown with ``pytest -s``)."""
    database = cluster.database
    figures = {
        "seed": seed,
        "agents": len(chaos.agents),
        "runs": RUNS,
        "kill_moments": len(chaos.kill_points),
        "engine_kills": chaos.engine_kills,
        "agent_kills": chaos.agent_kills,
        "recoveries": chaos.recoveries,
        "history_at_kills": chaos.kill_points,
        "outbox_republished": sum(
            record["messages"] for record in log_records(cluster, "engine", "outbox_republished")
        ),
        "tasks_redelivered": len(log_records(cluster, "agent", "task_redelivered")),
        "duplicates_logged": len(log_records(cluster, "engine", "duplicate_result_ignored")),
        "result_ignored_in_history": int(
            database.scalar("SELECT COUNT(*) FROM history WHERE kind = 'result_ignored'")
        ),
        "seconds": round(time.monotonic() - began, 1),
    }
    line = ", ".join(f"{name}={value}" for name, value in figures.items())
    print(f"\n[{database.backend}] kill load: {line}")


# The rounds.


def kill_load_round(cluster: Cluster, seed: int, agents: int) -> None:
    began = time.monotonic()
    engine = cluster.start_engine()
    started_agents = [
        cluster.start_agent("--concurrency", AGENT_CONCURRENCY) for _ in range(agents)
    ]
    chaos = Chaos(cluster, random.Random(seed), engine, started_agents)
    numbers = start_runs(cluster)

    run_chaos(chaos)
    wait_for_finish(cluster, chaos)

    report(cluster, chaos, seed, began)
    run_ids = sorted(numbers)
    assert chaos.engine_kills > 0, "the round killed no engine"
    assert chaos.agent_kills > 0, "the round killed no agent"
    assert_runs_completed(cluster, numbers)
    assert_one_result_per_step(cluster, run_ids)
    assert_no_step_lost(cluster, run_ids)
    assert error_lines(cluster) == []


class TestKillLoadSqlite:
    @pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
    @pytest.mark.parametrize(("seed", "agents"), [(101, 1), (202, 2)])
    def test_runs_survive_random_kills(self, cluster: Cluster, seed: int, agents: int) -> None:
        kill_load_round(cluster, seed, agents)


class TestKillLoadPostgresql:
    @pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
    @pytest.mark.parametrize(("seed", "agents"), [(303, 2)])
    def test_runs_survive_random_kills(self, cluster: Cluster, seed: int, agents: int) -> None:
        kill_load_round(cluster, seed, agents)
