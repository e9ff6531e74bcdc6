"""The CLI's run control: events, kill, pause, resume, and the listings that find runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.main import EXIT_FAILED, EXIT_NOT_FOUND
from tests.support import Cluster, cluster_of, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def waits(tmp_path_factory: pytest.TempPathFactory, rabbitmq: str) -> Iterator[Cluster]:
    folder: Path = tmp_path_factory.mktemp("cli-control")
    with cluster_of(folder, "sqlite", "waits") as cluster:
        cluster.start_engine()
        cluster.start_agent("--concurrency", "8")
        yield cluster


def run_ok(cluster: Cluster, *args: str) -> str:
    result = cluster.zenflow(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def waiting_for(cluster: Cluster, run_id: str) -> str | None:
    value: str | None = cluster.database.scalar(
        "SELECT waiting_for FROM runs WHERE id = :id", id=run_id
    )
    return value


def test_event_command_delivers_json_data(waits: Cluster) -> None:
    run_id = run_ok(waits, "start", "WaitsForEvent", '["Paid", 60]').strip()
    wait_until(lambda: waiting_for(waits, run_id) == ",Paid,", 30)
    listed = json.loads(run_ok(waits, "runs", "list", "--waiting-for", "Paid", "--json"))
    assert run_id in [run["run_id"] for run in listed]

    output = run_ok(waits, "runs", "event", run_id, "Paid", '{"amount": 12}')
    assert f"delivered to run {run_id}" in output
    wait_until(lambda: waits.database.run_status(run_id) == "completed", 30)
    shown = run_ok(waits, "runs", "show", run_id)
    assert "event 'Paid' received: {'amount': 12}" in shown
    assert "event 'Paid' delivered to the wait" in shown


def test_event_before_wait_is_kept(waits: Cluster) -> None:
    run_id = run_ok(waits, "start", "TwoEventsAfterTask", "[6.0]").strip()
    first = run_ok(waits, "runs", "event", run_id, "Item", '"one"')
    assert "kept for run" in first
    run_ok(waits, "runs", "event", run_id, "Item", '"two"')
    wait_until(lambda: waits.database.run_status(run_id) == "completed", 30)
    result = json.loads(run_ok(waits, "runs", "show", run_id, "--json"))["result"]
    assert result == ["one", "two"]


def test_event_invalid_json_exits_with_usage(waits: Cluster) -> None:
    result = waits.zenflow("runs", "event", "some-run", "Paid", "{not json")
    assert result.returncode == 2
    assert "invalid DATA_JSON" in result.stderr


def test_event_unknown_run_exits_not_found(waits: Cluster) -> None:
    result = waits.zenflow("runs", "event", "no-such-run", "Paid")
    assert result.returncode == EXIT_NOT_FOUND, result.stderr
    assert "'no-such-run'" in result.stderr
    assert "Traceback" not in result.stderr


def test_kill_records_reason_and_who(waits: Cluster) -> None:
    run_id = run_ok(waits, "start", "WaitsForEvent", '["Never", 600]').strip()
    wait_until(lambda: waiting_for(waits, run_id) == ",Never,", 30)
    output = run_ok(waits, "runs", "kill", run_id, "--reason", "customer cancelled")
    assert output.strip() == f"run {run_id} is killed"
    shown = run_ok(waits, "runs", "show", run_id)
    assert "status       killed" in shown
    assert "customer cancelled" in shown
    pending = waits.database.scalar(
        "SELECT COUNT(*) FROM timers WHERE run_id = :id AND status = 'pending'", id=run_id
    )
    assert pending == 0

    again = waits.zenflow("runs", "kill", run_id)
    assert again.returncode == EXIT_FAILED
    assert "killed, so nothing changed" in again.stderr


def test_pause_and_resume_by_business_id(waits: Cluster) -> None:
    run_id = run_ok(waits, "start", "OrderById", '["CLI-1"]', "--id", "order-CLI-1").strip()
    wait_until(lambda: waiting_for(waits, run_id) == ",Done,", 30)
    assert run_ok(waits, "runs", "pause", "order-CLI-1").strip() == f"run {run_id} is paused"
    paused = json.loads(run_ok(waits, "runs", "list", "--status", "paused", "--json"))
    assert run_id in [run["run_id"] for run in paused]

    # An event sent while paused is recorded; the workflow takes it once resumed.
    run_ok(waits, "runs", "event", "order-CLI-1", "Done", '"finished"')
    assert waits.database.run_status(run_id) == "paused"
    twice = waits.zenflow("runs", "pause", "order-CLI-1")
    assert twice.returncode == EXIT_FAILED
    assert "already paused" in twice.stderr

    # The event already resolved the wait, so resuming runs the workflow to its end.
    resumed = run_ok(waits, "runs", "resume", "order-CLI-1")
    assert resumed.strip() == f"run {run_id} is completed"
    listed = json.loads(run_ok(waits, "runs", "list", "--business-id", "order-CLI-1", "--json"))
    assert [run["run_id"] for run in listed] == [run_id]


def test_start_if_running_returns_existing(waits: Cluster) -> None:
    first = run_ok(waits, "start", "OrderById", '["CLI-2"]', "--id", "order-CLI-2").strip()
    rejected = waits.zenflow("start", "OrderById", '["CLI-2"]', "--id", "order-CLI-2")
    assert rejected.returncode == EXIT_FAILED
    assert "business_id_in_use" in rejected.stderr
    assert first in rejected.stderr
    same = run_ok(
        waits,
        "start",
        "OrderById",
        '["CLI-2"]',
        "--id",
        "order-CLI-2",
        "--if-running",
        "return_existing",
    )
    assert same.strip() == first
    run_ok(waits, "runs", "kill", first)


def test_children_listed_under_parent(waits: Cluster) -> None:
    run_id = run_ok(waits, "start", "Parent", "[1]", "--wait").splitlines()[0]
    children = json.loads(run_ok(waits, "runs", "list", "--parent", run_id, "--json"))
    assert sorted(child["workflow"] for child in children) == ["Child", "Child", "FailingChild"]
    shown = run_ok(waits, "runs", "show", run_id)
    assert "\nchildren\n" in shown
    child_view = run_ok(waits, "runs", "show", children[0]["run_id"])
    assert f"parent       {run_id}" in child_view


def test_client_waits_by_business_id(waits: Cluster) -> None:
    with waits.client() as client:
        run_id = client.start("OrderById", "W-1", business_id="order W/1")
        client.send_event("order W/1", "Done", "by id")
        assert client.wait("order W/1", timeout=30) == "by id"
        assert client.get_run(run_id)["status"] == "completed"
