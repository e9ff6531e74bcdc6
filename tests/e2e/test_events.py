"""Events sent to runs, end to end: delivery, order, timeouts, targets and errors.

An event goes to the run's first wait for its name. Without such a wait, the engine keeps it
in the ``events`` table, in arrival order, for the next wait. The tests read ``history``,
``timers``, ``events`` and ``runs.waiting_for`` to check what the engine stored.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from tests.support import (
    AMQP_URL,
    Cluster,
    cluster_of,
    history_kinds,
    result_of,
    send,
    start,
    utc,
    wait_for_kind,
    wait_for_timer,
    wait_until,
    wait_until_waiting_for,
)
from zenflow import RequestRejected, RunNotFound

pytestmark = pytest.mark.e2e

RESULT_KINDS = (
    "task_completed",
    "task_failed",
    "child_completed",
    "child_failed",
    "timer_fired",
    "event_delivered",
    "event_timed_out",
    "wait_cancelled",
)


def stored_events(cluster: Cluster, run_id: str) -> list[tuple[str, str, int | None]]:
    rows = cluster.database.rows(
        "SELECT name, status, step FROM events WHERE run_id = :id ORDER BY id", id=run_id
    )
    return [(row[0], row[1], row[2]) for row in rows]


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# Data and timeouts.


def test_event_without_data_differs_from_timeout(waits_cluster: Cluster) -> None:
    with_event = start(waits_cluster, "WaitsForEvent", "Ping", 30)
    send(waits_cluster, with_event, "Ping", None)
    timing_out = start(waits_cluster, "WaitsForEvent", "Ping", 0.5)

    assert result_of(waits_cluster, with_event) == {
        "timed_out": False,
        "name": "Ping",
        "data": None,
    }
    assert result_of(waits_cluster, timing_out) == {"timed_out": True}


def test_event_data_round_trips(waits_cluster: Cluster) -> None:
    data = {"amount": 12.5, "at": dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.UTC), "tags": ("a",)}
    run_id = start(waits_cluster, "WaitsForEvent", "Ping", 30)
    send(waits_cluster, run_id, "Ping", data)

    assert result_of(waits_cluster, run_id)["data"] == data


def test_events_sent_during_task_reach_later_waits(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "TwoEventsAfterTask", 1.5)
    first = send(waits_cluster, run_id, "Item", "one")
    second = send(waits_cluster, run_id, "Item", "two")

    assert first["delivered"] is False
    assert second["delivered"] is False
    assert result_of(waits_cluster, run_id) == ["one", "two"]
    assert stored_events(waits_cluster, run_id) == [
        ("Item", "delivered", 2),
        ("Item", "delivered", 3),
    ]


def test_second_wait_after_timeout_times_out_again(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "TimeoutThenWaitAgain", 0.3, 0.3)

    assert result_of(waits_cluster, run_id) == [None, None]
    assert history_kinds(waits_cluster, run_id, 1) == ["event_awaited", "event_timed_out"]
    assert history_kinds(waits_cluster, run_id, 2) == ["event_awaited", "event_timed_out"]


def test_event_after_timeout_goes_to_next_wait(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "TimeoutThenWaitAgain", 0.3, 30)
    wait_for_kind(waits_cluster, run_id, "event_timed_out", step=1)
    wait_until_waiting_for(waits_cluster, run_id, ["Late"])
    reply = send(waits_cluster, run_id, "Late", "after")

    assert reply["delivered"] is True
    assert result_of(waits_cluster, run_id) == [None, "after"]
    assert history_kinds(waits_cluster, run_id, 1) == ["event_awaited", "event_timed_out"]


def test_event_after_timeout_kept_for_later_wait(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "TimeoutTaskThenWait", 0.3, 2.0)
    wait_for_kind(waits_cluster, run_id, "event_timed_out", step=1)
    waiting_during_task = waits_cluster.database.scalar(
        "SELECT waiting_for FROM runs WHERE id = :id", id=run_id
    )
    reply = send(waits_cluster, run_id, "Late", "kept")
    kept = stored_events(waits_cluster, run_id)

    assert waiting_during_task is None
    assert reply["delivered"] is False
    assert kept == [("Late", "pending", None)]
    assert result_of(waits_cluster, run_id) == [None, "kept"]
    assert stored_events(waits_cluster, run_id) == [("Late", "delivered", 3)]


def test_stale_timer_after_event_changes_nothing(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "WaitsForEvent", "Ping", 1.5)
    wait_until_waiting_for(waits_cluster, run_id, ["Ping"])
    reply = send(waits_cluster, run_id, "Ping", "fast")
    result = result_of(waits_cluster, run_id)
    fire_at = utc(
        waits_cluster.database.scalar(
            "SELECT fire_at FROM timers WHERE run_id = :id AND step = 1", id=run_id
        )
    )
    # The timeout's instant must pass for a stale timer to have a chance to fire.
    remaining = (fire_at - dt.datetime.now(dt.UTC)).total_seconds() + 0.5
    time.sleep(max(0.0, remaining))
    timer_status = waits_cluster.database.scalar(
        "SELECT status FROM timers WHERE run_id = :id AND step = 1", id=run_id
    )
    results = [kind for kind in history_kinds(waits_cluster, run_id, 1) if kind in RESULT_KINDS]

    assert reply["delivered"] is True
    assert result == {"timed_out": False, "name": "Ping", "data": "fast"}
    assert timer_status == "cancelled"
    assert results == ["event_delivered"]
    assert waits_cluster.database.run_status(run_id) == "completed"


def test_wait_for_any_of_several_names(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "AnyOfEvents")
    wait_until_waiting_for(waits_cluster, run_id, ["Approved", "Rejected"])
    with waits_cluster.client() as client:
        waiting = client.get_run(run_id)["waiting_for"]
    reply = send(waits_cluster, run_id, "Rejected")

    assert waiting == ["Approved", "Rejected"]
    assert reply["delivered"] is True
    assert result_of(waits_cluster, run_id) == "Rejected"


def test_other_event_name_kept_not_delivered(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "WaitsForEvent", "Ping", 30)
    wait_until_waiting_for(waits_cluster, run_id, ["Ping"])
    other = send(waits_cluster, run_id, "Pong", "ignored")
    send(waits_cluster, run_id, "Ping", "taken")

    assert other["delivered"] is False
    assert result_of(waits_cluster, run_id)["data"] == "taken"
    assert stored_events(waits_cluster, run_id) == [
        ("Pong", "pending", None),
        ("Ping", "delivered", 1),
    ]


# Targets and errors.


def test_event_to_finished_run_rejected(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "WaitsForEvent", "Ping", 30)
    send(waits_cluster, run_id, "Ping", "first")
    result_of(waits_cluster, run_id)
    database = waits_cluster.database
    history_before = database.scalar("SELECT COUNT(*) FROM history WHERE run_id = :id", id=run_id)
    events_before = stored_events(waits_cluster, run_id)

    with waits_cluster.client() as client, pytest.raises(RequestRejected) as rejected:
        client.send_event(run_id, "Ping", "second")

    assert rejected.value.code == "run_finished"
    assert run_id in str(rejected.value)
    assert database.scalar("SELECT COUNT(*) FROM history WHERE run_id = :id", id=run_id) == (
        history_before
    )
    assert stored_events(waits_cluster, run_id) == events_before
    assert database.run_status(run_id) == "completed"


def test_event_to_unknown_run_not_found(waits_cluster: Cluster) -> None:
    missing = f"missing-{uuid.uuid4().hex}"
    with waits_cluster.client() as client, pytest.raises(RunNotFound) as not_found:
        client.send_event(missing, "Ping", None)

    assert missing in str(not_found.value)


def test_event_by_business_id(waits_cluster: Cluster) -> None:
    business_id = unique_name("events")
    run_id = start(waits_cluster, "WaitsForEvent", "Ping", 30, business_id=business_id)
    reply = send(waits_cluster, business_id, "Ping", "by business id")

    assert reply["run_id"] == run_id
    assert result_of(waits_cluster, run_id)["data"] == "by business id"


# Finding waiting runs.


def test_waiting_runs_found_by_waiting_for(waits_cluster: Cluster) -> None:
    name = unique_name("Signal")
    run_id = start(waits_cluster, "WaitsForEvent", name, 30)
    wait_until_waiting_for(waits_cluster, run_id, [name])
    found = waits_cluster.database.rows(
        "SELECT id FROM runs WHERE waiting_for LIKE :pattern", pattern=f"%,{name},%"
    )
    with waits_cluster.client() as client:
        waiting = client.get_run(run_id)["waiting_for"]
    send(waits_cluster, run_id, name)
    result_of(waits_cluster, run_id)
    after = waits_cluster.database.scalar("SELECT waiting_for FROM runs WHERE id = :id", id=run_id)

    assert [row[0] for row in found] == [run_id]
    assert waiting == [name]
    assert after is None


def test_cli_lists_runs_waiting_for_event(waits_cluster: Cluster) -> None:
    help_text = waits_cluster.zenflow("runs", "list", "--help").stdout
    if "--waiting-for" not in help_text:
        pytest.skip("`zenflow runs list` has no --waiting-for option")
    name = unique_name("Signal")
    run_id = start(waits_cluster, "WaitsForEvent", name, 30)
    wait_until_waiting_for(waits_cluster, run_id, [name])
    listed = waits_cluster.zenflow("runs", "list", "--waiting-for", name, "--json")
    send(waits_cluster, run_id, name)

    assert listed.returncode == 0, listed.stderr
    assert [run["run_id"] for run in json.loads(listed.stdout)] == [run_id]


# The public AMQP entry, without zenflow.


class JsonEntry:
    """A plain pika connection that sends JSON requests to the engine's public entry."""

    def __init__(self, namespace: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.reply_queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.exchange = f"{namespace}.engine"

    def request(self, body: dict[str, Any], timeout: float = 15.0) -> tuple[str, Any]:
        """Publish ``body`` as JSON and return the reply's content type and decoded body."""
        return self.reply(self.publish(body), timeout)

    def publish(self, body: dict[str, Any]) -> str:
        """Publish ``body`` as JSON with a reply queue; return its correlation id."""
        correlation_id = str(uuid.uuid4())
        properties = pika.BasicProperties(
            content_type="application/json",
            reply_to=self.reply_queue,
            correlation_id=correlation_id,
            message_id=str(uuid.uuid4()),
            delivery_mode=2,
        )
        self.channel.basic_publish(
            self.exchange, "requests", json.dumps(body).encode(), properties, mandatory=True
        )
        return correlation_id

    def reply(self, correlation_id: str, timeout: float = 30.0) -> tuple[str, Any]:
        """Wait for the reply to a request; return its content type and decoded body."""

        def arrived() -> tuple[str, Any] | None:
            method, received, payload = self.channel.basic_get(self.reply_queue, auto_ack=True)
            if method is None or received.correlation_id != correlation_id:
                return None
            return received.content_type, json.loads(payload)

        received = wait_until(arrived, timeout, message=f"the reply to request {correlation_id}")
        assert received is not None
        return received

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def json_entry(waits_cluster: Cluster) -> Iterator[JsonEntry]:
    entry = JsonEntry(waits_cluster.namespace)
    try:
        yield entry
    finally:
        entry.close()


@pytest.mark.parametrize("field", ["run_id", "business_id", "run"])
def test_json_event_through_public_entry(
    waits_cluster: Cluster, json_entry: JsonEntry, field: str
) -> None:
    business_id = unique_name("json-event")
    run_id = start(waits_cluster, "WaitsForEvent", "Ping", 30, business_id=business_id)
    target = run_id if field == "run_id" else business_id
    data = {"items": [1, 2], "note": "from pika"}
    content_type, reply = json_entry.request(
        {"version": 1, "type": "event", field: target, "name": "Ping", "data": data}
    )

    assert content_type == "application/json"
    assert reply["ok"] is True, reply
    assert reply["run_id"] == run_id
    assert reply["delivered"] is True
    assert result_of(waits_cluster, run_id)["data"] == data


@pytest.mark.parametrize(
    "fields",
    [
        {"run_id": "no-run-has-this-id", "business_id": "BID"},
        {"run_id": "BID"},
    ],
    ids=["run-id-then-business-id", "run-id-as-business-id"],
)
def test_json_event_falls_back_to_business_id(
    waits_cluster: Cluster, json_entry: JsonEntry, fields: dict[str, str]
) -> None:
    business_id = unique_name("fallback")
    run_id = start(waits_cluster, "WaitsForEvent", "Ping", 30, business_id=business_id)
    target = {key: business_id if value == "BID" else value for key, value in fields.items()}
    _, reply = json_entry.request({"version": 1, "type": "event", **target, "name": "Ping"})

    assert reply["ok"] is True, reply
    assert reply["run_id"] == run_id


def test_json_event_to_finished_run_rejected(waits_cluster: Cluster, json_entry: JsonEntry) -> None:
    run_id = start(waits_cluster, "WaitsForEvent", "Ping", 0.2)
    result_of(waits_cluster, run_id)
    _, reply = json_entry.request(
        {"version": 1, "type": "event", "run_id": run_id, "name": "Ping", "data": None}
    )

    assert reply["ok"] is False
    assert reply["error"]["code"] == "run_finished"


# Races between a task, a timer and an event wait (RaceTaskAndTimer).


def step_statuses(cluster: Cluster, run_id: str) -> dict[int, list[str]]:
    rows = cluster.database.rows(
        "SELECT step, kind FROM history WHERE run_id = :id AND step IS NOT NULL ORDER BY seq",
        id=run_id,
    )
    kinds: dict[int, list[str]] = {}
    for step, kind in rows:
        kinds.setdefault(int(step), []).append(kind)
    return kinds


def test_race_won_by_timer_cancels_event_wait(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "RaceTaskAndTimer", 2.0, 0.3)
    result = result_of(waits_cluster, run_id)
    # The task that lost goes on; its result is recorded but not sent to the workflow.
    wait_for_kind(waits_cluster, run_id, "task_completed", step=1)
    kinds = step_statuses(waits_cluster, run_id)
    waiting = waits_cluster.database.scalar(
        "SELECT waiting_for FROM runs WHERE id = :id", id=run_id
    )

    assert result == [1, None]
    assert kinds[2] == ["timer_started", "timer_fired"]
    assert kinds[3] == ["event_awaited", "wait_cancelled"]
    assert kinds[1] == ["task_scheduled", "task_completed"]
    assert waiting is None
    assert waits_cluster.database.run_status(run_id) == "completed"


def test_race_won_by_event_cancels_timer(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "RaceTaskAndTimer", 2.0, 60)
    wait_until_waiting_for(waits_cluster, run_id, ["Cancel"])
    reply = send(waits_cluster, run_id, "Cancel", "stop")
    result = result_of(waits_cluster, run_id)
    timer_status = waits_cluster.database.scalar(
        "SELECT status FROM timers WHERE run_id = :id AND step = 2", id=run_id
    )
    kinds = step_statuses(waits_cluster, run_id)

    assert reply["delivered"] is True
    assert result == [2, "stop"]
    assert timer_status == "cancelled"
    assert kinds[2] == ["timer_started", "wait_cancelled"]
    assert kinds[3] == ["event_awaited", "event_delivered"]


def test_race_won_by_task_cancels_waits(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "RaceTaskAndTimer", 0.1, 60)
    result = result_of(waits_cluster, run_id)
    timer_status = waits_cluster.database.scalar(
        "SELECT status FROM timers WHERE run_id = :id AND step = 2", id=run_id
    )
    kinds = step_statuses(waits_cluster, run_id)

    assert result == [0, "task"]
    assert timer_status == "cancelled"
    assert kinds[2] == ["timer_started", "wait_cancelled"]
    assert kinds[3] == ["event_awaited", "wait_cancelled"]


def test_event_after_race_kept_not_delivered(waits_cluster: Cluster) -> None:
    run_id = start(waits_cluster, "RaceTaskAndTimer", 2.0, 0.2)
    result_of(waits_cluster, run_id)

    with waits_cluster.client() as client, pytest.raises(RequestRejected) as rejected:
        client.send_event(run_id, "Cancel", "too late")

    assert rejected.value.code == "run_finished"


# Engine restarts.


@pytest.fixture
def cluster(tmp_path: Path, backend: str, rabbitmq: str) -> Iterator[Cluster]:
    """A cluster of its own, because the test stops its engine. Events need no agent."""
    with cluster_of(tmp_path, backend, "waits") as cluster:
        cluster.start_engine()
        yield cluster


def test_event_sent_while_engine_down_delivered_after_restart(cluster: Cluster) -> None:
    run_id = start(cluster, "WaitsForEvent", "Ping", 120)
    wait_until_waiting_for(cluster, run_id, ["Ping"])
    engine = cluster.processes[0]
    assert engine.stop() == 0
    entry = JsonEntry(cluster.namespace)
    try:
        # The request waits in the engine's durable queue; the reply comes after the restart.
        sent = entry.publish(
            {"version": 1, "type": "event", "run_id": run_id, "name": "Ping", "data": "queued"}
        )
        cluster.start_engine()
        _, reply = entry.reply(sent)
    finally:
        entry.close()

    assert reply["ok"] is True, reply
    assert reply["delivered"] is True
    assert result_of(cluster, run_id)["data"] == "queued"


# An event and the timeout of its wait at the same instant.

# Seconds after the timeout's instant at which the event is sent. The engine polls for due
# timers every 0.2 s, so the timeout is recorded up to about 0.2 s after its instant.
RACE_OFFSETS = (0.0, 0.03, 0.06, 0.09, 0.12, 0.15, 0.18, 0.21, 0.24)


def test_event_racing_timeout_resolves_wait_once(waits_cluster: Cluster) -> None:
    outcomes: list[tuple[str, bool, Any]] = []
    for offset in RACE_OFFSETS:
        run_id = start(waits_cluster, "WaitsForEvent", "Ping", 0.4, business_id=unique_name("race"))
        fire_at = wait_for_timer(waits_cluster, run_id)
        # The test needs the clock to reach the timeout's instant, at most 0.4 s away.
        delay = (fire_at - dt.datetime.now(dt.UTC)).total_seconds() + offset
        time.sleep(max(0.0, delay))
        try:
            delivered = send(waits_cluster, run_id, "Ping", "racing")["delivered"]
        except RequestRejected as rejected:
            # The timeout came first and ended the run.
            assert rejected.code == "run_finished"
            delivered = False
        outcomes.append((run_id, delivered, result_of(waits_cluster, run_id)))

    # The reply and the workflow agree on who won, and the wait has exactly one result.
    disagreements = [
        (run_id, delivered, result)
        for run_id, delivered, result in outcomes
        if delivered == result["timed_out"]
    ]
    results = {
        run_id: [kind for kind in history_kinds(waits_cluster, run_id, 1) if kind in RESULT_KINDS]
        for run_id, _, _ in outcomes
    }

    assert disagreements == []
    assert [run_id for run_id, kinds in results.items() if len(kinds) != 1] == []
