"""Hostile heartbeats and task results on the engine's result queue, and bad `runs retry` input.

Anyone who can publish to the broker can publish to ``<namespace>.engine.results``. These
tests publish heartbeats and results that no agent would send straight to that queue: unknown
runs, wrong attempts, fields of the wrong type, and leases and retry delays that are negative,
NaN, infinite or huge. The engine must reject or bound each one and keep running. It must
drain the queue and still run an ordinary retried task to completion.

The module's engine runs without an agent on the ``failures`` queue, so each forged result is
the only result of its attempt. Only the last check of the flaky task starts an agent, and
stops it again.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from tests.support import (
    AMQP_URL,
    Cluster,
    Process,
    cluster_of,
    count_kind,
    history_kinds,
    queue_depth,
    result_of,
    start,
    utc,
    wait_for_kind,
    wait_until,
)
from zenflow import protocol, serializer
from zenflow.retry import MAX_DELAY

pytestmark = pytest.mark.e2e

# FlakyTwice's policy: five attempts, 200 ms apart.
FLAKY_DELAY = 0.2
# Engine log events that mean a message broke the engine's handling instead of being judged.
ENGINE_ERRORS = ("result_failed", "heartbeat_failed", "request_failed")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, rabbitmq: str) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("retry-hostile")
    with cluster_of(folder, "sqlite", "failures") as running:
        running.start_engine()
        yield running


def engine_of(cluster: Cluster) -> Process:
    return next(p for p in cluster.processes if p.args[0] == "engine")


def log_count(cluster: Cluster, event: str) -> int:
    return engine_of(cluster).log_text().count(f'"event": "{event}"')


def publish(cluster: Cluster, *bodies: dict[str, Any] | bytes) -> None:
    """Publish each body (a map, encoded as msgpack, or raw bytes) to the engine's results."""
    queue = protocol.Topology(cluster.namespace).results_queue
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:
            kind = body.get("type") if isinstance(body, dict) else None
            data = body if isinstance(body, bytes) else serializer.encode(body)
            properties = pika.BasicProperties(
                content_type=protocol.MSGPACK_CONTENT_TYPE,
                type=kind if isinstance(kind, str) else None,
                delivery_mode=2,
            )
            channel.basic_publish("", queue, data, properties, mandatory=True)
    finally:
        connection.close()


def heartbeat(run_id: Any, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "version": 1,
        "type": "task_heartbeat",
        "run_id": run_id,
        "step": 1,
        "attempt": 1,
        "agent": "forger:1",
        "lease": 30.0,
        "details": None,
    }
    body.update(fields)
    return body


def failure(run_id: Any, attempt: int = 1, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "version": 1,
        "type": "task_result",
        "run_id": run_id,
        "step": 1,
        "attempt": attempt,
        "workflow": "attempt",
        "ok": False,
        "value": None,
        "error": {"type": "ConnectionError", "message": f"forged failure {attempt}"},
        "agent": "forger:1",
        "started_at": None,
        "finished_at": None,
    }
    body.update(fields)
    return body


def drained(cluster: Cluster, expected: dict[str, int]) -> None:
    """Wait until the engine logged each event ``expected`` times and the queue is empty."""

    def done() -> bool:
        counts = {event: log_count(cluster, event) for event in expected}
        return counts == expected and queue_depth(cluster.namespace, "engine.results") == 0

    try:
        wait_until(done, 15, message=f"engine log counts {expected} and an empty result queue")
    except AssertionError:
        counts = {event: log_count(cluster, event) for event in expected}
        raise AssertionError(f"engine log counts {counts}, expected {expected}") from None


def assert_engine_healthy(cluster: Cluster) -> None:
    engine = engine_of(cluster)
    assert engine.popen.poll() is None, engine.log_text()[-3000:]
    for event in ENGINE_ERRORS:
        assert log_count(cluster, event) == 0, f"{event} in the engine log"


def assert_no_agent_on_failures(cluster: Cluster) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        queue = protocol.Topology(cluster.namespace).task_queue("failures")
        declared = connection.channel().queue_declare(queue, durable=True)
        assert declared.method.consumer_count == 0
    finally:
        connection.close()


def retry_delays(cluster: Cluster, run_id: str) -> list[tuple[int, float]]:
    """Return (failed attempt, seconds until the next one) of each scheduled retry."""
    rows = cluster.database.rows(
        "SELECT attempt, created_at, fire_at FROM history "
        "WHERE run_id = :id AND kind = 'task_retry_scheduled' ORDER BY seq",
        id=run_id,
    )
    return [
        (int(attempt), (utc(fire_at) - utc(created_at)).total_seconds())
        for attempt, created_at, fire_at in rows
    ]


def lease_timer(cluster: Cluster, run_id: str) -> tuple[dt.datetime, dict[str, Any]] | None:
    rows = cluster.database.rows(
        "SELECT fire_at, detail FROM timers WHERE run_id = :id AND kind = 'lease'", id=run_id
    )
    if not rows:
        return None
    fire_at, detail = rows[0]
    return utc(fire_at), json.loads(detail)


# A msgpack array nested 1000 deep, past the decoder's depth limit.
DEEP_BODY = b"\x91" * 1000 + b"\xc0"


def test_hostile_heartbeats_rejected_or_capped(cluster: Cluster) -> None:
    # Unheard's queue has no agent, so its run waits at attempt 1 for the whole test.
    run_id = start(cluster, "attempt", "Unheard")
    wait_for_kind(cluster, run_id, "task_scheduled")
    rejected_before = log_count(cluster, "result_rejected")
    ignored_before = log_count(cluster, "heartbeat_ignored")

    invalid = [
        heartbeat(run_id, lease=-5.0),
        heartbeat(run_id, lease=0),
        heartbeat(run_id, lease=math.nan),
        heartbeat(run_id, lease=math.inf),
        heartbeat(run_id, lease=-math.inf),
        heartbeat(run_id, lease="3600"),
        heartbeat(run_id, lease=True),
        heartbeat(run_id, lease=None),
        {key: value for key, value in heartbeat(run_id).items() if key != "lease"},
        heartbeat("../../etc/passwd"),
        heartbeat(run_id, step=0),
        heartbeat(run_id, step=2**31),
        heartbeat(run_id, attempt=-1),
        heartbeat(run_id, attempt="1"),
        heartbeat(run_id, version=2),
        heartbeat(12345),
        [heartbeat(run_id)],  # type: ignore[list-item]
        b"\xc1 not msgpack",
        b"",
        DEEP_BODY,
    ]
    # Well formed, but for no attempt that runs.
    unmatched = [
        heartbeat("no-such-run", lease=1e308),
        heartbeat(run_id, attempt=7),
        heartbeat(run_id, attempt=protocol.MAX_COUNTER),
        heartbeat(run_id, step=99),
    ]
    publish(cluster, *invalid, *unmatched)

    drained(
        cluster,
        {
            "result_rejected": rejected_before + len(invalid),
            "heartbeat_ignored": ignored_before + len(unmatched),
        },
    )
    assert lease_timer(cluster, run_id) is None

    # Accepted heartbeats keep odd details short and cut a huge lease to the maximum.
    accepted = [
        heartbeat(run_id, lease=1e308, details=["a", ["b", ["c"]]]),
        heartbeat(run_id, lease=2**64 - 1, details={"rows": list(range(5000))}),
        heartbeat(run_id, lease=1e308, details=b"\x00" * 1000),
        heartbeat(run_id, lease=1e308, details="x" * 200_000),
    ]
    sent_at = dt.datetime.now(dt.UTC)
    publish(cluster, *accepted)

    timer = wait_until(lambda: lease_timer(cluster, run_id), 10, message="the lease timer")
    wait_until(lambda: queue_depth(cluster.namespace, "engine.results") == 0, 10)
    fire_at, detail = timer
    lease = (fire_at - sent_at).total_seconds()
    print(f"lease set by a heartbeat asking for 1e308 s: {lease:.1f} s")
    # The upper bound leaves room for the engine's processing time on a loaded machine.
    assert protocol.MAX_LEASE_SECONDS - 1 <= lease <= protocol.MAX_LEASE_SECONDS + 30
    assert detail["agent"] == "forger:1"
    assert detail["attempt"] == 1
    assert len(detail["details"]) < 1000
    assert cluster.database.run_status(run_id) == "running"
    assert_engine_healthy(cluster)


def test_hostile_results_rejected_or_bounded(cluster: Cluster, tmp_path: Path) -> None:
    assert_no_agent_on_failures(cluster)
    run_id = start(cluster, "attempt", "FlakyTwice", str(tmp_path / "forged.trace"))
    wait_for_kind(cluster, run_id, "task_scheduled")
    rejected_before = log_count(cluster, "result_rejected")
    ignored_before = log_count(cluster, "result_ignored")

    invalid = [
        failure(run_id, error="boom"),
        failure(run_id, error=None),
        failure(run_id, ok="false"),
        failure(run_id, ok=None),
        failure(run_id, step=0),
        failure(run_id, attempt=0),
        failure(run_id, attempt=2**40),
        failure("run id with spaces"),
        failure(run_id, type="task_results"),
        failure(run_id, version="1"),
        DEEP_BODY,
    ]
    unmatched = [
        failure("no-such-run", retry_delay=1e308),
        failure(run_id, step=99, retry_delay=math.nan),
    ]
    publish(cluster, *invalid, *unmatched)
    drained(
        cluster,
        {
            "result_rejected": rejected_before + len(invalid),
            "result_ignored": ignored_before + len(unmatched),
        },
    )
    assert count_kind(cluster, run_id, "task_retry_scheduled") == 0

    # NaN and infinite delays leave the policy to decide, and a negative one means at once.
    # A non_retryable flag that is not true does not stop the retries.
    forged = [
        failure(run_id, 1, retry_delay=math.nan),
        failure(run_id, 2, retry_delay=math.inf),
        failure(run_id, 3, retry_delay=-5, non_retryable="yes"),
    ]
    for number, body in enumerate(forged, start=1):
        publish(cluster, body)
        wait_for_kind(cluster, run_id, "task_retried", count=number)
    publish(cluster, {**failure(run_id, 4), "ok": True, "value": "forged", "error": None})

    assert result_of(cluster, run_id, timeout=15) == {"value": "forged"}
    delays = retry_delays(cluster, run_id)
    print(f"retry delays after forged results: {delays}")
    assert [attempt for attempt, _ in delays] == [1, 2, 3]
    assert delays[0][1] == pytest.approx(FLAKY_DELAY, abs=0.01)
    assert delays[1][1] == pytest.approx(FLAKY_DELAY, abs=0.01)
    assert delays[2][1] == 0
    assert cluster.database.results_per_step(run_id) == {1: 1}
    assert_engine_healthy(cluster)


def test_huge_retry_delay_capped(cluster: Cluster, tmp_path: Path) -> None:
    assert_no_agent_on_failures(cluster)
    run_id = start(cluster, "attempt", "FlakyTwice", str(tmp_path / "huge.trace"))
    wait_for_kind(cluster, run_id, "task_scheduled")

    publish(cluster, failure(run_id, 1, retry_delay=1e308))
    wait_for_kind(cluster, run_id, "task_retry_scheduled")

    assert retry_delays(cluster, run_id) == [(1, MAX_DELAY.total_seconds())]
    # The same result again is for an attempt that already failed.
    publish(cluster, failure(run_id, 1, retry_delay=0))
    wait_for_kind(cluster, run_id, "result_ignored")
    assert count_kind(cluster, run_id, "task_retried") == 0
    assert cluster.database.run_status(run_id) == "running"
    with cluster.client() as client:
        client.kill(run_id, reason="end of test")
    assert_engine_healthy(cluster)


def test_junk_retry_delay_uses_policy(cluster: Cluster, tmp_path: Path) -> None:
    # The protocol allows seconds, or null to stop. A string is neither.
    assert_no_agent_on_failures(cluster)
    run_id = start(cluster, "attempt", "FlakyTwice", str(tmp_path / "junk.trace"))
    wait_for_kind(cluster, run_id, "task_scheduled")

    publish(cluster, failure(run_id, 1, retry_delay="x"))
    wait_until(
        lambda: {"task_retry_scheduled", "task_failed"} & set(history_kinds(cluster, run_id)),
        10,
        message=f"a retry or the failure of run {run_id}",
    )

    kinds = history_kinds(cluster, run_id)
    assert "task_failed" not in kinds
    assert retry_delays(cluster, run_id) == [(1, pytest.approx(FLAKY_DELAY, abs=0.01))]


def test_engine_survives_burst_then_retries(cluster: Cluster, tmp_path: Path) -> None:
    rejected_before = log_count(cluster, "result_rejected")
    burst: list[dict[str, Any] | bytes] = []
    for number in range(40):
        burst.append(heartbeat(f"burst-{number}", lease=[math.nan, -1, "x", None][number % 4]))
        burst.append(failure(f"burst-{number}", ok=[None, "no", 0, []][number % 4]))
    publish(cluster, *burst)
    drained(cluster, {"result_rejected": rejected_before + len(burst)})
    assert_engine_healthy(cluster)

    agent = cluster.start_agent("--queue", "failures")
    try:
        trace = tmp_path / "flaky.trace"
        run_id = start(cluster, "attempt", "FlakyTwice", str(trace))
        assert result_of(cluster, run_id, timeout=20) == {"value": "succeeded at attempt 3"}
        assert count_kind(cluster, run_id, "task_retried") == 2
        assert len(trace.read_text().splitlines()) == 3
    finally:
        agent.stop()
        cluster.processes.remove(agent)
    assert_engine_healthy(cluster)


def test_agent_reports_task_with_hostile_policy(cluster: Cluster, tmp_path: Path) -> None:
    # TaskMessage.from_body accepts any map as the retry policy. With one slot, an attempt
    # that the agent neither reports nor acknowledges would block every later task.
    agent = cluster.start_agent("--queue", "failures", "--concurrency", "1")
    try:
        topology = protocol.Topology(cluster.namespace)
        forged = protocol.TaskMessage(
            run_id="forged-policy-run",
            workflow="attempt",
            step=1,
            attempt=1,
            task="FlakyTwice",
            args=(str(tmp_path / "forged-policy.trace"),),
            kwargs={},
            retry={"attempts": 3, "non_retryable": 5},
        )
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            properties = pika.BasicProperties(
                content_type=protocol.MSGPACK_CONTENT_TYPE,
                reply_to=topology.results_queue,
                correlation_id=forged.correlation_id,
                type="task",
            )
            channel.basic_publish(
                "",
                topology.task_queue("failures"),
                serializer.encode(forged.to_body()),
                properties,
                mandatory=True,
            )
        finally:
            connection.close()

        def forged_result_ignored() -> bool:
            lines = engine_of(cluster).log_text().splitlines()
            return any("result_ignored" in line and forged.run_id in line for line in lines)

        # The engine has no such run, so it logs the agent's result as ignored.
        wait_until(forged_result_ignored, 10, message="the agent's result for the forged task")
        run_id = start(cluster, "attempt", "FlakyTwice", str(tmp_path / "after.trace"))
        assert result_of(cluster, run_id, timeout=15) == {"value": "succeeded at attempt 3"}
    finally:
        agent.stop()
        cluster.processes.remove(agent)


# `zenflow runs retry` with bad input. Exit codes (cli/main.py): 1 rejected by the engine,
# 2 invalid command line, 5 run not found.


INVALID_COMMAND_LINES = [
    ((), "give either RUN or --workflow NAME"),
    (("some-run", "--workflow", "attempt"), "give either RUN or --workflow NAME"),
    (
        ("--workflow", "attempt", "--status", "completed"),
        "invalid --status completed: only failed runs can be retried",
    ),
    (("--workflow", "attempt", "--status", "lost"), "'lost' is not one of"),
    (("--workflow", "attempt", "--limit", "0"), "--limit"),
]


def test_runs_retry_usage_errors(cluster: Cluster) -> None:
    # The commands are independent, so they run side by side to save their start-up time.
    with concurrent.futures.ThreadPoolExecutor(len(INVALID_COMMAND_LINES)) as pool:
        runs = [
            pool.submit(cluster.zenflow, "runs", "retry", *args)
            for args, _ in INVALID_COMMAND_LINES
        ]
        outputs = [run.result() for run in runs]

    for (args, message), completed in zip(INVALID_COMMAND_LINES, outputs, strict=True):
        assert completed.returncode == 2, (args, completed.stderr)
        assert message in completed.stderr, (args, completed.stderr)
        assert completed.stdout == "", (args, completed.stdout)


def test_runs_retry_unknown_run(cluster: Cluster) -> None:
    completed = cluster.zenflow("runs", "retry", "no-such-run-4711")

    assert completed.returncode == 5, completed.stderr
    assert "no run has the id or business id 'no-such-run-4711'" in completed.stderr
    assert completed.stdout == ""


def test_runs_retry_running_run(cluster: Cluster) -> None:
    run_id = start(cluster, "attempt", "Unheard")
    wait_for_kind(cluster, run_id, "task_scheduled")

    completed = cluster.zenflow("runs", "retry", run_id)

    assert completed.returncode == 1, completed.stderr
    assert "invalid_state" in completed.stderr
    assert f"run {run_id} is running; only a failed run can be retried" in completed.stderr
    assert count_kind(cluster, run_id, "run_retried") == 0


def test_runs_retry_no_failed_runs(cluster: Cluster) -> None:
    completed = cluster.zenflow("runs", "retry", "--workflow", "no_such_workflow", "--yes")

    assert completed.returncode == 0, completed.stderr
    assert "no failed runs of workflow no_such_workflow" in completed.stdout
