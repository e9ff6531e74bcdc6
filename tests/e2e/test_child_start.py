"""Child starts that fail: an unknown child workflow, and a forged start naming a parent."""

from __future__ import annotations

import json
from pathlib import Path

import pika
import pytest

from tests.support import AMQP_URL, cluster_of, wait_until
from zenflow import RunFailed, protocol

pytestmark = pytest.mark.e2e


def test_unknown_child_fails_parent_step(tmp_path: Path, backend: str, rabbitmq: str) -> None:
    with cluster_of(tmp_path, backend, "handlers") as cluster:
        cluster.start_engine()
        with cluster.client() as client:
            result = client.wait(client.start("StartsUnknownChild"), timeout=30)
    assert result[0] == "ChildNotStarted"
    assert "unknown workflow 'NoSuchWorkflow'" in result[1]


def test_forged_parent_start_changes_nothing(tmp_path: Path, rabbitmq: str) -> None:
    with cluster_of(tmp_path, "sqlite", "handlers") as cluster:
        engine = cluster.start_engine()
        cluster.start_agent()
        with cluster.client() as client:
            victim = client.start("SlowTaskVictim")
            wait_until(lambda: cluster.database.run_status(victim) == "running", 30)
            topology = protocol.Topology(cluster.namespace)
            connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
            try:
                channel = connection.channel()
                for workflow in ("NoSuchWorkflow", "SlowTaskVictim"):
                    forged = {
                        "version": 1,
                        "type": "start",
                        "workflow": workflow,
                        "parent_run_id": victim,
                        "parent_step": 1,
                    }
                    channel.basic_publish(
                        topology.engine_exchange,
                        topology.requests_routing_key,
                        json.dumps(forged).encode(),
                        pika.BasicProperties(content_type="application/json"),
                    )
            finally:
                connection.close()
            engine.wait_for_log("child_failure_ignored", count=1)
            result = client.wait(victim, timeout=30)
        assert result == "genuine"
        forged_runs = cluster.database.scalar(
            "SELECT COUNT(*) FROM runs WHERE parent_id = :id", id=victim
        )
        assert forged_runs == 0


def test_dispatched_child_outlives_parent(tmp_path: Path, backend: str, rabbitmq: str) -> None:
    with cluster_of(tmp_path, backend, "handlers") as cluster:
        cluster.start_engine()
        cluster.start_agent()
        with cluster.client() as client:
            child_id = client.wait(client.start("DispatchesAndLeaves"), timeout=30)
            assert client.wait(child_id, timeout=30) == 7


@pytest.mark.parametrize(
    ("business_id", "error_type", "fragment"),
    [
        (123, "DefinitionError", "must be a non-empty string"),
        ("a\nb", "DefinitionError", "control characters"),
        ("x" * 300, "DefinitionError", "the limit is 255"),
        ("raise", "KeyError", "no id"),
    ],
    ids=["int", "newline", "too-long", "id-raises"],
)
def test_bad_child_business_id_fails_parent(
    tmp_path: Path, rabbitmq: str, business_id: object, error_type: str, fragment: str
) -> None:
    with cluster_of(tmp_path, "sqlite", "handlers") as cluster:
        cluster.start_engine()
        cluster.start_agent()
        with cluster.client() as client:
            run_id = client.start("ParentOfBadIdChild", business_id)
            with pytest.raises(RunFailed) as failure:
                client.wait(run_id, timeout=30)
    assert failure.value.error["type"] == error_type
    assert fragment in failure.value.error["message"]
    assert failure.value.error["step"] == 2


def test_forged_child_cannot_replace_task_result(tmp_path: Path, rabbitmq: str) -> None:
    from engine.replay import child_run_id

    with cluster_of(tmp_path, "sqlite", "handlers") as cluster:
        engine = cluster.start_engine()
        cluster.start_agent()
        with cluster.client() as client:
            victim = client.start("SlowTaskVictim")
            wait_until(lambda: cluster.database.run_status(victim) == "running", 30)
            forged = {
                "version": 1,
                "type": "start",
                "workflow": "ChildOfLeaver",
                "args": [666],
                "run_id": child_run_id(victim, 1),
                "parent_run_id": victim,
                "parent_step": 1,
            }
            publish_json(cluster.namespace, forged)
            engine.wait_for_log("child_failure_ignored", count=1)
            assert client.wait(victim, timeout=30) == "genuine"


def test_paused_events_reach_on_event_in_order(tmp_path: Path, rabbitmq: str) -> None:
    with cluster_of(tmp_path, "sqlite", "handlers") as cluster:
        cluster.start_engine()
        with cluster.client() as client:
            run_id = client.start("HandlerOrder")
            wait_until(
                lambda: (
                    cluster.database.scalar(
                        "SELECT waiting_for FROM runs WHERE id = :id", id=run_id
                    )
                    == ",Stop,"
                ),
                30,
            )
            client.pause(run_id)
            for index in range(3):
                client.send_event(run_id, "Item", index)
            client.send_event(run_id, "Stop")
            client.resume(run_id)
            assert client.wait(run_id, timeout=30) == [0, 1, 2]


def publish_json(namespace: str, body: dict[str, object]) -> None:
    topology = protocol.Topology(namespace)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        connection.channel().basic_publish(
            topology.engine_exchange,
            topology.requests_routing_key,
            json.dumps(body).encode(),
            pika.BasicProperties(content_type="application/json"),
        )
    finally:
        connection.close()


def test_taken_child_run_id_fails_parent_step(tmp_path: Path, rabbitmq: str) -> None:
    from engine.replay import child_run_id

    parent_id = "parent-whose-child-id-is-taken"
    taken = child_run_id(parent_id, 1)
    with cluster_of(tmp_path, "sqlite", "handlers") as cluster:
        cluster.start_engine()
        cluster.start_agent()
        with cluster.client() as client:
            # A plain start takes the run id that the parent's first step derives.
            squatter = {"version": 1, "type": "start", "workflow": "ChildOfLeaver", "args": [1]}
            publish_json(cluster.namespace, {**squatter, "run_id": taken})
            wait_until(lambda: cluster.database.run_status(taken) is not None, 30)
            parent = {"version": 1, "type": "start", "workflow": "ParentOfLeaverChild"}
            publish_json(cluster.namespace, {**parent, "run_id": parent_id})
            result = client.wait(parent_id, timeout=30)
    assert result[0] == "ChildNotStarted"
    assert "run_id_taken" in result[1]
