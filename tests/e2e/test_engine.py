"""Engine and agent behaviour beyond the happy path: bad values, unknown tasks, logs, locks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, Cluster, Database, Process, cluster_of, wait_until
from zenflow import Client, RunFailed, SerializationError

pytestmark = pytest.mark.e2e


def wait_failed(cluster: Cluster, workflow: str, *args: object) -> dict:
    with cluster.client() as client:
        run_id = client.start(workflow, *args)
        with pytest.raises(RunFailed) as failure:
            client.wait(run_id, timeout=30)
    return failure.value.error


def test_unencodable_argument_fails_at_dispatch(flows_cluster: Cluster) -> None:
    with flows_cluster.client() as client, pytest.raises(SerializationError) as failure:
        client.start("RichValues", {"items": [1, object()]})
    assert "args[0]['items'][1]" in str(failure.value)
    assert "builtins.object" in str(failure.value)


def test_unencodable_task_result_fails_attempt(flows_cluster: Cluster) -> None:
    error = wait_failed(flows_cluster, "TaskReturnsUnencodable")
    assert error["cause"]["type"] == "SerializationError"
    assert "result['bad'][0]" in error["cause"]["message"]


def test_unencodable_task_argument_fails_run(flows_cluster: Cluster) -> None:
    error = wait_failed(flows_cluster, "YieldsUnencodableArgument")
    assert error["type"] == "SerializationError"
    assert "task echo" in error["message"]
    assert "args[0]['when']" in error["message"]


def test_system_exit_in_task_fails_only_its_attempt(flows_cluster: Cluster) -> None:
    with flows_cluster.client() as client:
        run_id = client.start("CatchesTaskExit")
        assert client.wait(run_id, timeout=30) == "caught SystemExit"
        # The agent survived: the next run's tasks still execute.
        assert client.wait(client.start("Sequential", 1), timeout=30) == [2, 3, 3]


def test_system_exit_in_workflow_fails_only_its_run(flows_cluster: Cluster) -> None:
    error = wait_failed(flows_cluster, "ExitsMidway")
    assert error["type"] == "SystemExit"
    with flows_cluster.client() as client:
        assert client.wait(client.start("Sequential", 1), timeout=30) == [2, 3, 3]


def test_oversized_task_result_fails_attempt(flows_cluster: Cluster) -> None:
    error = wait_failed(flows_cluster, "ReturnsBigValue", 17 * 1024 * 1024)
    assert error["cause"]["type"] == "SerializationError"
    assert "the limit is 16777216" in error["cause"]["message"]
    with flows_cluster.client() as client:
        assert client.wait(client.start("ReturnsBigValue", 1000), timeout=30) == 1000


def test_hand_built_call_with_bad_queue_fails_run(flows_cluster: Cluster) -> None:
    error = wait_failed(flows_cluster, "YieldsBadQueue")
    assert error["type"] == "DefinitionError"
    assert "queue" in error["message"]


def test_unregistered_task_gets_error_result(flows_cluster: Cluster) -> None:
    flows_cluster.start_agent("--queue", "orphans")
    error = wait_failed(flows_cluster, "CallsUnregisteredTask")
    message = error["cause"]["message"]
    assert error["cause"]["type"] == "TaskNotRegistered"
    assert "'orphan_task' is not registered" in message
    assert "Double" in message


def test_task_sees_its_context(flows_cluster: Cluster) -> None:
    with flows_cluster.client() as client:
        run_id = client.start("Identity")
        result = client.wait(run_id, timeout=30)
    assert result == {"step": 2, "attempt": 1, "key": f"{run_id}:2"}


def test_log_lines_carry_run_ids(flows_cluster: Cluster) -> None:
    with flows_cluster.client() as client:
        run_id = client.start("Sequential", 1)
        client.wait(run_id, timeout=30)

    def succeeded_lines() -> list[dict[str, object]]:
        agent_log = flows_cluster.processes[1].log_text()
        lines = [json.loads(line) for line in agent_log.splitlines() if run_id in line]
        return [line for line in lines if line["event"] == "task_succeeded"]

    # The agent logs task_succeeded after the result left, so the run may end first.
    succeeded = wait_until(lambda: len(succeeded_lines()) == 3 and succeeded_lines(), 10)
    assert len(succeeded) == 3
    assert all(line["workflow"] == "Sequential" for line in succeeded)
    assert sorted(line["step"] for line in succeeded) == [1, 2, 3]
    assert all(line["attempt"] == 1 for line in succeeded)
    engine_log = flows_cluster.processes[0].log_text()
    engine_lines = [json.loads(line) for line in engine_log.splitlines() if run_id in line]
    events = [line["event"] for line in engine_lines]
    assert events == ["run_started", "run_completed"]
    assert all(line["workflow"] == "Sequential" for line in engine_lines)


def test_workflow_logs_once_across_replay(tmp_path: Path, backend: str, rabbitmq: str) -> None:
    with cluster_of(tmp_path, backend, "flows") as cluster:
        engine = cluster.start_engine()
        cluster.start_agent()
        marker = f"chatty-{os.getpid()}-{backend}"
        with cluster.client() as client:
            run_id = client.start("Chatty", marker)
            wait_until(lambda: marker in engine.log_text(), 30, message="the workflow's log line")
            engine.kill()
            second = cluster.start_engine()
            assert client.wait(run_id, timeout=30) == 2
        second.wait_for_log("run_completed")
        assert marker not in second.log_text()
        assert engine.log_text().count(marker) == 1


def test_second_engine_on_sqlite_refused(tmp_path: Path, rabbitmq: str) -> None:
    with cluster_of(tmp_path, "sqlite", "flows") as cluster:
        cluster.start_engine()
        second = Process(
            ["engine", "--app", "flows"], cluster.env, tmp_path / "second.log", tmp_path
        )
        exit_code = second.popen.wait(timeout=60)
        output = second.log_text()
        second.stop()
    assert exit_code == 3
    assert "another engine" in output
    assert "use PostgreSQL" in output
    assert "Traceback" not in output


def test_two_engines_share_postgresql(tmp_path: Path, rabbitmq: str) -> None:
    pytest.importorskip("psycopg")
    from tests.conftest import require_service
    from tests.support import POSTGRES_ADMIN_URL

    require_service("PostgreSQL", POSTGRES_ADMIN_URL, 5432)
    with cluster_of(tmp_path, "postgresql", "flows") as cluster:
        cluster.start_engine()
        cluster.start_engine()
        cluster.start_agent()
        with cluster.client() as client:
            run_ids = [client.start("Steps", 10) for _ in range(10)]
            results = [client.wait(run_id, timeout=60) for run_id in run_ids]
        assert results == [45] * 10
        for run_id in run_ids:
            counts = cluster.database.results_per_step(run_id)
            assert counts == {step: 1 for step in range(1, 11)}


def test_db_upgrade_from_installed_wheel(tmp_path: Path) -> None:
    """The migrations ship inside the package: no alembic.ini or repository needed."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    target = tmp_path / "site"
    wheels = list(wheel_dir.glob("zenflow-*.whl"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheels[0]),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    database = Database("sqlite", elsewhere)
    env = {**os.environ, "PYTHONPATH": str(target), "ZENFLOW_DATABASE_URL": database.url}
    # The editable install of the repository is on sys.path too, so check which one loads.
    script = (
        "import sys, engine, cli.main\n"
        f"assert engine.__file__.startswith({str(target)!r}), engine.__file__\n"
        "sys.argv = ['zenflow', 'db', 'upgrade']\n"
        "cli.main.main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "upgraded from empty" in result.stdout
    assert database.scalar("SELECT COUNT(*) FROM runs") == 0
    database.drop()


def test_client_unreachable_broker_names_url_without_password() -> None:
    from zenflow import TransportError

    client = Client("amqp://guest:secretpw@127.0.0.1:1/", connect_timeout=2, delivery_timeout=0)
    with pytest.raises(TransportError) as failure:
        client.start("Sequential", 1)
    assert "127.0.0.1:1" in str(failure.value)
    assert "secretpw" not in str(failure.value)
