"""Child starts that fail: an unknown child workflow, and a forged start naming a parent."""

from __future__ import annotations

import json
from pathlib import Path

import pika
import pytest

from tests.support import AMQP_URL, cluster_of, wait_until
from zenflow import protocol

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
