"""on_event handlers: which events they get, tasks they run, and their replay after restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import Cluster, cluster_of, wait_until
from zenflow import RunFailed

pytestmark = pytest.mark.e2e


def completed_charges(cluster: Cluster, run_id: str) -> list[object]:
    """Return the values of the handler's tasks, in the order history recorded them."""
    from zenflow import serializer

    rows = cluster.database.rows(
        "SELECT payload FROM history WHERE run_id = :id AND kind = 'task_completed' "
        "AND name = 'echo_later' ORDER BY seq",
        id=run_id,
    )
    values = [serializer.decode(row.payload) for row in rows]
    return [value for value in values if value != "warm-up"]


def test_handler_tasks_replay_after_restart(tmp_path: Path, backend: str, rabbitmq: str) -> None:
    with cluster_of(tmp_path, backend, "handlers") as cluster:
        engine = cluster.start_engine()
        cluster.start_agent("--concurrency", "4")
        with cluster.client() as client:
            run_id = client.start("Ledger")
            client.send_event(run_id, "Note", "a")
            client.send_event(run_id, "Charge", 5)
            client.send_event(run_id, "Charge", 7)
            wait_until(lambda: len(completed_charges(cluster, run_id)) == 2, 30)
            before = cluster.database.rows(
                "SELECT seq, kind, step, name FROM history WHERE run_id = :id ORDER BY seq",
                id=run_id,
            )

            # Every step now replays the handlers from history, in the recorded order.
            engine.stop()
            cluster.start_engine("--cache-size", "0")
            reply = client.send_event(run_id, "Stop", "done")
            result = client.wait(run_id, timeout=30)

        assert reply["delivered"] is True
        assert result["stop"] == "done"
        assert result["seen"] == [["Note", "a"], ["Charge", 5], ["Charge", 7]]
        assert result["charged"] == completed_charges(cluster, run_id)
        after = cluster.database.rows(
            "SELECT seq, kind, step, name FROM history WHERE run_id = :id ORDER BY seq",
            id=run_id,
        )
        assert after[: len(before)] == before
        kinds = [row.kind for row in after]
        assert kinds.count("event_handled") == 3
        assert "run_failed" not in kinds


def test_waited_event_skips_handler(tmp_path: Path, rabbitmq: str) -> None:
    with cluster_of(tmp_path, "sqlite", "handlers") as cluster:
        cluster.start_engine()
        cluster.start_agent()
        with cluster.client() as client:
            run_id = client.start("Ledger")
            wait_until(
                lambda: (
                    cluster.database.scalar(
                        "SELECT waiting_for FROM runs WHERE id = :id", id=run_id
                    )
                    == ",Stop,"
                ),
                30,
            )
            client.send_event(run_id, "Stop", 1)
            result = client.wait(run_id, timeout=30)
        assert result == {"seen": [], "charged": [], "stop": 1}


def test_handler_error_fails_run(tmp_path: Path, rabbitmq: str) -> None:
    with cluster_of(tmp_path, "sqlite", "handlers") as cluster:
        cluster.start_engine()
        with cluster.client() as client:
            run_id = client.start("FailingHandler")
            client.send_event(run_id, "Ping", None)
            with pytest.raises(RunFailed) as failure:
                client.wait(run_id, timeout=30)
        assert failure.value.error["type"] == "ValueError"
        assert failure.value.error["message"] == "cannot handle Ping"
        assert failure.value.error["on_event"] == "Ping"
