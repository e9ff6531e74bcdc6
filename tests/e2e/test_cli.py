"""The ``zenflow`` command line, run as a subprocess against real RabbitMQ and databases.

Runs are started against one engine and agent per database backend. The engine loads
``flows`` and ``cli_app``, but the agent loads only ``flows``, so ``cli_app.Stuck`` runs stay
waiting on the ``nobody`` queue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apps.cli_app import UNCONSUMED_QUEUE
from tests.conftest import require_service
from tests.support import (
    AMQP_URL,
    APPS,
    POSTGRES_ADMIN_URL,
    REPO,
    ZENFLOW,
    Cluster,
    Database,
    cluster_of,
    wait_until,
)

pytestmark = pytest.mark.e2e

# Exit codes documented at the top of cli/main.py.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIGURATION = 3
EXIT_NOT_FOUND = 5

SECRET = "secretpw"
# Port 1 on loopback is closed, so connecting fails at once with "connection refused".
CLOSED_BROKER_URL = f"amqp://guest:{SECRET}@127.0.0.1:1/"
CLOSED_DATABASE_URL = f"postgresql://postgres:{SECRET}@127.0.0.1:1/nope"

# Wide enough that rich prints each option of a help page on one line.
WIDE_COLUMNS = "250"

DURATION = r"(\d+ ms|\d+\.\d\d s)"


def zenflow(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ZENFLOW, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def environment_without_settings(**overrides: str) -> dict[str, str]:
    """Return os.environ without ZENFLOW_* variables, with the test apps importable."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ZENFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(REPO), os.environ.get("PYTHONPATH", "")])
    env.update(overrides)
    return env


def assert_clear_error(result: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    """Check that a command failed with one ``error:`` line, a documented code and no secret.

    The engine and the agent may also write JSON log lines to stderr before the error line.
    """
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert SECRET not in result.stdout, result.stdout
    assert SECRET not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0]
    assert lines[-1] == errors[0]
    others = [line for line in lines if line != errors[0]]
    if result.args[1] in ("engine", "agent"):
        for line in others:
            assert isinstance(json.loads(line), dict), line
    else:
        assert others == [], result.stderr


def only_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# Help.


def option_line(page: str, option: str) -> str:
    """Return the line of a help page whose first word is ``option``.

    The box border and the ``*`` that marks a required argument do not count as words.
    """
    for line in page.splitlines():
        words = line.strip("│ *").split()
        if words and words[0] == option:
            return line
    raise AssertionError(f"{option} not found in help page:\n{page}")


SHARED_HELP = {
    "--amqp-url": "RabbitMQ URL. Default: $ZENFLOW_AMQP_URL, else amqp://localhost:5672/",
    "--database-url": (
        "History database URL. Default: $ZENFLOW_DATABASE_URL, else sqlite:///zenflow.db."
    ),
    "--namespace": "Prefix of exchange and queue names. Default: ZENFLOW_NAMESPACE, else zenflow.",
    "--app": "Module that defines tasks and workflows; repeat for several. Default: ZENFLOW_APP.",
    "--log-level": "debug, info, warning or error.",
}

HELP_PAGES: dict[tuple[str, ...], dict[str, str]] = {
    (): {
        "engine": "Run the engine",
        "agent": "Run an agent",
        "start": "Start a run of WORKFLOW",
        "runs": "Inspect and control runs.",
        "db": "Manage the history database.",
    },
    ("engine",): {
        "--app": SHARED_HELP["--app"],
        "--amqp-url": SHARED_HELP["--amqp-url"],
        "--database-url": SHARED_HELP["--database-url"],
        "--namespace": SHARED_HELP["--namespace"],
        "--cache-size": "Maximum number of live workflow generators kept in memory.",
        "--max-request-bytes": "Largest accepted start request body, in bytes.",
        "--workers": "Database worker threads.",
        "--log-level": SHARED_HELP["--log-level"],
    },
    ("agent",): {
        "--app": SHARED_HELP["--app"],
        "--queue": "Task queue to consume; repeat for several.",
        "--concurrency": "Tasks run at the same time",
        "--max-deliveries": "Times a task message may reach agents that die or stop",
        "--amqp-url": SHARED_HELP["--amqp-url"],
        "--namespace": SHARED_HELP["--namespace"],
        "--log-level": SHARED_HELP["--log-level"],
    },
    ("start",): {
        "WORKFLOW": "Name of the workflow to start.",
        "ARGS_JSON": "Arguments as JSON",
        "--id": "Business id of the run",
        "--wait": "Wait for the run to finish and print its result.",
        "--timeout": "Seconds to wait",
        "--json": "Print JSON instead of text.",
        "--amqp-url": SHARED_HELP["--amqp-url"],
        "--namespace": SHARED_HELP["--namespace"],
    },
    ("runs",): {
        "list": "List runs, newest first.",
        "show": "Show a run and the timeline of its history",
    },
    ("runs", "list"): {
        "--status": "Show only runs with this status.",
        "--workflow": "Show only runs of this workflow.",
        "--limit": "Maximum number of runs shown, newest first.",
        "--json": "Print a JSON array instead of a table.",
        "--database-url": SHARED_HELP["--database-url"],
    },
    ("runs", "show"): {
        "RUN_ID": "Run id or business id.",
        "--json": "Print the run, history and attempts as JSON.",
        "--database-url": SHARED_HELP["--database-url"],
    },
    ("db",): {"upgrade": "Create or migrate the history database to the latest schema."},
    ("db", "upgrade"): {"--database-url": SHARED_HELP["--database-url"]},
}


@pytest.mark.parametrize("command", list(HELP_PAGES), ids=lambda c: " ".join(c) or "zenflow")
def test_help_lists_options(command: tuple[str, ...], tmp_path: Path) -> None:
    env = environment_without_settings(COLUMNS=WIDE_COLUMNS)
    result = zenflow(*command, "--help", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Usage: zenflow" in result.stdout
    for option, help_text in HELP_PAGES[command].items():
        assert help_text in option_line(result.stdout, option), option


@pytest.mark.parametrize("command", list(HELP_PAGES), ids=lambda c: " ".join(c) or "zenflow")
def test_help_fits_80_columns(command: tuple[str, ...], tmp_path: Path) -> None:
    # Rich (15.0) cuts a word longer than its column and ends it with "…", hiding default URLs.
    env = environment_without_settings(COLUMNS="80")
    result = zenflow(*command, "--help", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout, result.stdout


# Runs recorded by a cluster.


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def cli_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, rabbitmq: str
) -> Iterator[Cluster]:
    """An engine running ``flows`` and ``cli_app`` and an agent running only ``flows``."""
    backend = str(request.param)
    if backend == "postgresql":
        require_service("PostgreSQL", POSTGRES_ADMIN_URL, 5432)
    folder: Path = tmp_path_factory.mktemp(f"cli-{backend}")
    with cluster_of(folder, backend, "flows") as cluster:
        cluster.start_engine("--app", "cli_app")
        cluster.start_agent()
        yield cluster


@dataclasses.dataclass(frozen=True)
class RecordedRuns:
    completed: str
    failed: str
    ordered: str
    business_id: str
    waiting: str


@pytest.fixture(scope="module")
def recorded(cli_cluster: Cluster) -> RecordedRuns:
    """Start one completed, one failed, one business-id and one waiting run."""
    order_id = uuid.uuid4().hex[:8]
    with cli_cluster.client() as client:
        completed = client.start("Sequential", 5)
        assert client.wait(completed, timeout=30) == [10, 11, 11]
        failed = client.start("Uncaught")
        wait_until(
            lambda: cli_cluster.database.run_status(failed) == "failed",
            30,
            message="the Uncaught run to fail",
        )
        ordered = client.start("Ordered", order_id)
        assert client.wait(ordered, timeout=30) == order_id
        waiting = client.start("Stuck", "parked")
    wait_until(
        lambda: cli_cluster.database.scalar(
            "SELECT COUNT(*) FROM history WHERE run_id = :id AND kind = 'task_scheduled'",
            id=waiting,
        ),
        30,
        message="the Stuck run's step to be queued",
    )
    return RecordedRuns(completed, failed, ordered, f"order-{order_id}", waiting)


def table_row(table: str, run_id: str) -> list[str]:
    for line in table.splitlines():
        if line.startswith(run_id):
            return line.split()
    raise AssertionError(f"run {run_id} not in table:\n{table}")


def run_ids(listing: str) -> list[str]:
    return [run["run_id"] for run in json.loads(listing)]


def test_runs_list_table(cli_cluster: Cluster, recorded: RecordedRuns) -> None:
    result = cli_cluster.zenflow("runs", "list")
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header[:2] == ["RUN", "ID"]
    assert "STATUS" in header
    assert "DURATION" in header
    expected = [
        (recorded.completed, "Sequential", "-", "completed"),
        (recorded.failed, "Uncaught", "-", "failed"),
        (recorded.ordered, "Ordered", recorded.business_id, "completed"),
        (recorded.waiting, "Stuck", "-", "running"),
    ]
    for run_id, workflow, business_id, status in expected:
        row = table_row(result.stdout, run_id)
        assert row[1:4] == [workflow, business_id, status], row


def test_runs_list_filters_status(cli_cluster: Cluster, recorded: RecordedRuns) -> None:
    listing = cli_cluster.zenflow("runs", "list", "--status", "failed", "--json")
    assert listing.returncode == 0, listing.stderr
    runs = json.loads(listing.stdout)
    assert {run["status"] for run in runs} == {"failed"}
    assert recorded.failed in run_ids(listing.stdout)


def test_runs_list_filters_workflow(cli_cluster: Cluster, recorded: RecordedRuns) -> None:
    listing = cli_cluster.zenflow("runs", "list", "--workflow", "Ordered", "--json")
    assert listing.returncode == 0, listing.stderr
    runs = json.loads(listing.stdout)
    assert {run["workflow"] for run in runs} == {"Ordered"}
    assert recorded.ordered in run_ids(listing.stdout)


def test_runs_list_limit(cli_cluster: Cluster, recorded: RecordedRuns) -> None:
    table = cli_cluster.zenflow("runs", "list", "--limit", "1")
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.strip().splitlines()) == 2  # the header and one run

    listing = cli_cluster.zenflow("runs", "list", "--limit", "1", "--json")
    assert listing.returncode == 0, listing.stderr
    assert len(json.loads(listing.stdout)) == 1


def test_runs_list_rejects_unknown_status(cli_cluster: Cluster) -> None:
    result = cli_cluster.zenflow("runs", "list", "--status", "sleeping")
    assert result.returncode == EXIT_USAGE
    assert "'sleeping'" in result.stderr
    assert "Traceback" not in result.stderr


def test_runs_list_json_fields(cli_cluster: Cluster, recorded: RecordedRuns) -> None:
    result = cli_cluster.zenflow("runs", "list", "--json")
    assert result.returncode == 0, result.stderr
    runs = {run["run_id"]: run for run in json.loads(result.stdout)}
    fields = {
        "run_id",
        "workflow",
        "business_id",
        "status",
        "args",
        "kwargs",
        "result",
        "error",
        "created_at",
        "updated_at",
        "finished_at",
        "steps",
    }
    for run in runs.values():
        assert fields <= set(run), run

    completed = runs[recorded.completed]
    assert completed["workflow"] == "Sequential"
    assert completed["status"] == "completed"
    assert completed["args"] == [5]
    assert completed["result"] == [10, 11, 11]
    assert completed["error"] is None
    assert completed["steps"] == 3
    created = dt.datetime.fromisoformat(completed["created_at"])
    finished = dt.datetime.fromisoformat(completed["finished_at"])
    assert created <= finished

    failed = runs[recorded.failed]
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "TaskFailed"
    assert failed["error"]["cause"]["message"] == "boom"

    assert runs[recorded.ordered]["business_id"] == recorded.business_id
    assert runs[recorded.waiting]["status"] == "running"
    assert runs[recorded.waiting]["finished_at"] is None


def test_runs_show_timeline(cli_cluster: Cluster, recorded: RecordedRuns) -> None:
    result = cli_cluster.zenflow("runs", "show", recorded.completed)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith(f"run {recorded.completed}\n")
    assert re.search(r"^\s+status\s+completed$", text, re.MULTILINE), text
    assert re.search(r"^\s+input\s+Sequential\(5\)$", text, re.MULTILINE), text
    assert re.search(rf"^\s+finished\s+.* UTC \(took {DURATION}\)$", text, re.MULTILINE), text
    steps = [
        r"step 1 scheduled\s+Double\(5\) on queue 'default'",
        rf"step 1 completed\s+Double -> 10 \(ran {DURATION}, queued {DURATION}, agent ",
        r"step 2 scheduled\s+AsyncAdd\(10, 1\) on queue 'async'",
        rf"step 2 completed\s+AsyncAdd -> 11 \(ran {DURATION}, queued {DURATION}, agent ",
        r"step 3 scheduled\s+echo\(11\) on queue 'default'",
        rf"step 3 completed\s+echo -> 11 \(ran {DURATION}, queued {DURATION}, agent ",
        r"run completed -> \[10, 11, 11\]",
    ]
    for step in steps:
        assert re.search(step, text), f"{step!r} not in:\n{text}"


def test_runs_show_failed_run(cli_cluster: Cluster, recorded: RecordedRuns) -> None:
    result = cli_cluster.zenflow("runs", "show", recorded.failed)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert re.search(r"^\s+status\s+failed$", text, re.MULTILINE), text
    assert re.search(
        r"^\s+error\s+TaskFailed: task Fail failed with ValueError: boom$", text, re.MULTILINE
    ), text
    assert re.search(rf"step 2 failed\s+Fail: ValueError: boom \(ran {DURATION}", text), text
    assert "run failed: TaskFailed" in text
    assert "\ntraceback of the workflow\n" in text
    assert 'yield Fail("boom")' in text


def test_runs_show_task_traceback(cli_cluster: Cluster, recorded: RecordedRuns) -> None:
    # The frame that raised inside the task is where a reader starts debugging.
    result = cli_cluster.zenflow("runs", "show", recorded.failed)
    assert result.returncode == 0, result.stderr
    assert "raise ValueError(self.message)" in result.stdout


def test_runs_show_by_business_id(cli_cluster: Cluster, recorded: RecordedRuns) -> None:
    result = cli_cluster.zenflow("runs", "show", recorded.business_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"run {recorded.ordered}\n")
    assert re.search(rf"^\s+business id\s+{recorded.business_id}$", result.stdout, re.MULTILINE)


def test_runs_show_json(cli_cluster: Cluster, recorded: RecordedRuns) -> None:
    result = cli_cluster.zenflow("runs", "show", "--json", recorded.failed)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["run_id"] == recorded.failed
    assert document["status"] == "failed"
    kinds = [entry["kind"] for entry in document["history"]]
    assert kinds == [
        "run_started",
        "task_scheduled",
        "task_completed",
        "task_scheduled",
        "task_failed",
        "run_failed",
    ]
    assert document["history"][2]["value"] == 2
    attempts = document["attempts"]
    assert [(a["step"], a["task"], a["status"]) for a in attempts] == [
        (1, "Double", "completed"),
        (2, "Fail", "failed"),
    ]
    assert attempts[1]["error"]["message"] == "boom"
    assert "raise ValueError" in attempts[1]["error"]["traceback"]


def test_runs_show_waiting_run(cli_cluster: Cluster, recorded: RecordedRuns) -> None:
    result = cli_cluster.zenflow("runs", "show", recorded.waiting)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert re.search(r"^\s+status\s+running$", text, re.MULTILINE), text
    assert "\nwaiting for\n" in text
    assert re.search(
        rf"^\s+step 1 task Unconsumed attempt 1 queued on '{UNCONSUMED_QUEUE}' since .* UTC; "
        "no agent has reported it yet$",
        text,
        re.MULTILINE,
    ), text


def test_runs_show_unknown_run(cli_cluster: Cluster) -> None:
    result = cli_cluster.zenflow("runs", "show", "no-such-run")
    assert_clear_error(result, EXIT_NOT_FOUND, "'no-such-run'")


# Starting runs.


def test_start_wait_prints_result(cli_cluster: Cluster) -> None:
    result = cli_cluster.zenflow("start", "Sequential", "[5]", "--wait")
    assert result.returncode == 0, result.stderr
    run_id, value = result.stdout.strip().splitlines()
    assert json.loads(value) == [10, 11, 11]
    assert cli_cluster.database.run_status(run_id) == "completed"


def test_start_prints_run_id(cli_cluster: Cluster) -> None:
    result = cli_cluster.zenflow("start", "Sequential", "[1]")
    assert result.returncode == 0, result.stderr
    run_id = only_line(result.stdout)
    wait_until(
        lambda: cli_cluster.database.run_status(run_id) == "completed",
        30,
        message=f"run {run_id} to complete",
    )


def test_start_json(cli_cluster: Cluster) -> None:
    result = cli_cluster.zenflow("start", "Sequential", "[5]", "--wait", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["status"] == "completed"
    assert document["result"] == [10, 11, 11]
    assert cli_cluster.database.run_status(document["run_id"]) == "completed"


def test_start_json_without_wait(cli_cluster: Cluster) -> None:
    result = cli_cluster.zenflow("start", "Sequential", "[1]", "--json")
    assert result.returncode == 0, result.stderr
    run_id = json.loads(result.stdout)["run_id"]
    wait_until(
        lambda: cli_cluster.database.run_status(run_id) == "completed",
        30,
        message=f"run {run_id} to complete",
    )


def test_start_sets_business_id(cli_cluster: Cluster) -> None:
    business_id = f"custom-{uuid.uuid4().hex[:8]}"
    result = cli_cluster.zenflow("start", "Ordered", '["B-2"]', "--id", business_id, "--wait")
    assert result.returncode == 0, result.stderr
    run_id, value = result.stdout.strip().splitlines()
    assert json.loads(value) == "B-2"
    stored = cli_cluster.database.scalar("SELECT business_id FROM runs WHERE id = :id", id=run_id)
    assert stored == business_id


def test_start_keyword_arguments(cli_cluster: Cluster) -> None:
    order_id = uuid.uuid4().hex[:8]
    arguments = json.dumps({"order_id": order_id})
    result = cli_cluster.zenflow("start", "Ordered", arguments, "--wait", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["result"] == order_id
    stored = cli_cluster.database.scalar(
        "SELECT business_id FROM runs WHERE id = :id", id=document["run_id"]
    )
    assert stored == f"order-{order_id}"


def test_start_failed_run_exits_1(cli_cluster: Cluster) -> None:
    result = cli_cluster.zenflow("start", "Uncaught", "--wait")
    assert_clear_error(result, EXIT_FAILED, "ValueError: boom")
    assert "TaskFailed" in result.stderr


def test_start_failed_run_json(cli_cluster: Cluster) -> None:
    result = cli_cluster.zenflow("start", "Uncaught", "--wait", "--json")
    assert result.returncode == EXIT_FAILED
    document = json.loads(result.stdout)
    assert document["status"] == "failed"
    assert document["error"]["type"] == "TaskFailed"
    assert document["error"]["cause"]["message"] == "boom"
    assert cli_cluster.database.run_status(document["run_id"]) == "failed"


def test_start_unknown_workflow(cli_cluster: Cluster) -> None:
    result = cli_cluster.zenflow("start", "NoSuchWorkflow", "--wait")
    assert_clear_error(result, EXIT_FAILED, "unknown_workflow")
    assert "'NoSuchWorkflow'" in result.stderr
    assert result.stdout == ""


def test_start_invalid_arguments(cli_cluster: Cluster) -> None:
    result = cli_cluster.zenflow("start", "Sequential", "[5, 6]", "--wait")
    assert_clear_error(result, EXIT_FAILED, "invalid_arguments")


# Configuration precedence.


def test_database_flag_beats_variable(
    cli_cluster: Cluster, recorded: RecordedRuns, tmp_path: Path
) -> None:
    other = Database("sqlite", tmp_path)
    try:
        env = cli_cluster.env
        env["ZENFLOW_DATABASE_URL"] = other.url
        upgrade = zenflow("db", "upgrade", env=env, cwd=tmp_path)
        assert upgrade.returncode == 0, upgrade.stderr

        from_variable = zenflow("runs", "list", env=env, cwd=tmp_path)
        assert from_variable.returncode == 0, from_variable.stderr
        assert from_variable.stdout.strip() == "no runs"

        flag = ["--database-url", cli_cluster.database.url]
        from_flag = zenflow("runs", "list", *flag, env=env, cwd=tmp_path)
        assert from_flag.returncode == 0, from_flag.stderr
        assert recorded.completed in from_flag.stdout
    finally:
        other.drop()


def test_database_variable_beats_default(
    cli_cluster: Cluster, recorded: RecordedRuns, tmp_path: Path
) -> None:
    default_env = environment_without_settings()
    upgrade = zenflow("db", "upgrade", env=default_env, cwd=tmp_path)
    assert upgrade.returncode == 0, upgrade.stderr
    assert "sqlite:///zenflow.db" in upgrade.stdout
    assert (tmp_path / "zenflow.db").is_file()

    from_default = zenflow("runs", "list", env=default_env, cwd=tmp_path)
    assert from_default.returncode == 0, from_default.stderr
    assert from_default.stdout.strip() == "no runs"

    env = environment_without_settings(ZENFLOW_DATABASE_URL=cli_cluster.database.url)
    from_variable = zenflow("runs", "list", env=env, cwd=tmp_path)
    assert from_variable.returncode == 0, from_variable.stderr
    assert recorded.completed in from_variable.stdout


def test_amqp_flag_beats_variable(cli_cluster: Cluster) -> None:
    env = cli_cluster.env
    env["ZENFLOW_AMQP_URL"] = CLOSED_BROKER_URL
    env["ZENFLOW_DELIVERY_TIMEOUT"] = "0"  # one connection attempt, not 15 seconds of them
    from_variable = zenflow("start", "Sequential", "[1]", env=env, cwd=cli_cluster.folder)
    assert_clear_error(from_variable, EXIT_CONFIGURATION, "cannot connect to RabbitMQ")

    flag = ["--amqp-url", AMQP_URL]
    from_flag = zenflow(
        "start", "Sequential", "[1]", "--wait", *flag, env=env, cwd=cli_cluster.folder
    )
    assert from_flag.returncode == 0, from_flag.stderr


def test_amqp_variable_beats_default(cli_cluster: Cluster, tmp_path: Path) -> None:
    # The default URL names localhost:5672, so only the variable can point at the closed port.
    env = environment_without_settings(
        ZENFLOW_AMQP_URL=CLOSED_BROKER_URL,
        ZENFLOW_NAMESPACE=cli_cluster.namespace,
        ZENFLOW_DELIVERY_TIMEOUT="0",
    )
    result = zenflow("start", "Sequential", "[1]", env=env, cwd=tmp_path)
    assert_clear_error(result, EXIT_CONFIGURATION, "127.0.0.1:1")


def test_namespace_flag_beats_variable(cli_cluster: Cluster) -> None:
    env = cli_cluster.env
    env["ZENFLOW_NAMESPACE"] = "bad/namespace"
    from_variable = zenflow("start", "Sequential", "[1]", env=env, cwd=cli_cluster.folder)
    assert_clear_error(from_variable, EXIT_CONFIGURATION, "invalid namespace 'bad/namespace'")

    flag = ["--namespace", cli_cluster.namespace]
    from_flag = zenflow(
        "start", "Sequential", "[1]", "--wait", *flag, env=env, cwd=cli_cluster.folder
    )
    assert from_flag.returncode == 0, from_flag.stderr


# Clear errors. ZENFLOW_AMQP_URL names a closed port, so no case can reach the real broker.


@pytest.fixture
def error_env() -> dict[str, str]:
    # Clients make one connection attempt instead of retrying for 15 seconds.
    return environment_without_settings(
        ZENFLOW_AMQP_URL=CLOSED_BROKER_URL, ZENFLOW_DELIVERY_TIMEOUT="0"
    )


@pytest.fixture
def migrated_url(tmp_path: Path, error_env: dict[str, str]) -> str:
    url = f"sqlite:///{tmp_path / 'migrated.db'}"
    result = zenflow("db", "upgrade", "--database-url", url, env=error_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return url


def test_start_unreachable_broker(error_env: dict[str, str], tmp_path: Path) -> None:
    result = zenflow(
        "start", "Sequential", "[1]", "--amqp-url", CLOSED_BROKER_URL, env=error_env, cwd=tmp_path
    )
    assert_clear_error(result, EXIT_CONFIGURATION, "cannot connect to RabbitMQ")
    assert "127.0.0.1:1" in result.stderr


def test_engine_unreachable_broker(
    error_env: dict[str, str], tmp_path: Path, migrated_url: str
) -> None:
    result = zenflow(
        "engine",
        "--app",
        "flows",
        "--amqp-url",
        CLOSED_BROKER_URL,
        "--database-url",
        migrated_url,
        env=error_env,
        cwd=tmp_path,
    )
    assert_clear_error(result, EXIT_CONFIGURATION, "cannot connect to RabbitMQ")
    assert "127.0.0.1:1" in result.stderr


def test_agent_unreachable_broker(error_env: dict[str, str], tmp_path: Path) -> None:
    result = zenflow(
        "agent", "--app", "flows", "--amqp-url", CLOSED_BROKER_URL, env=error_env, cwd=tmp_path
    )
    assert_clear_error(result, EXIT_CONFIGURATION, "cannot connect to RabbitMQ")
    assert "127.0.0.1:1" in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["runs", "list"],
        ["runs", "show", "some-run"],
        ["db", "upgrade"],
        ["engine", "--app", "flows"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_unreachable_database(
    command: list[str], error_env: dict[str, str], tmp_path: Path
) -> None:
    result = zenflow(*command, "--database-url", CLOSED_DATABASE_URL, env=error_env, cwd=tmp_path)
    assert_clear_error(result, EXIT_CONFIGURATION, "postgresql://postgres:***@127.0.0.1:1/nope")
    assert "Connection refused" in result.stderr


@pytest.mark.parametrize(
    "command",
    [["runs", "list"], ["runs", "show", "some-run"], ["engine", "--app", "flows"]],
    ids=lambda c: " ".join(c[:2]),
)
def test_unmigrated_database(command: list[str], error_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE unrelated (id INTEGER)")
    url = f"sqlite:///{path}"
    result = zenflow(*command, "--database-url", url, env=error_env, cwd=tmp_path)
    assert_clear_error(result, EXIT_CONFIGURATION, "run `zenflow db upgrade`")
    assert "not migrated" in result.stderr


@pytest.mark.parametrize("command", [["runs", "list"], ["engine", "--app", "flows"]])
def test_missing_sqlite_file(command: list[str], error_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    result = zenflow(*command, "--database-url", f"sqlite:///{path}", env=error_env, cwd=tmp_path)
    assert_clear_error(result, EXIT_CONFIGURATION, "run `zenflow db upgrade`")
    assert "does not exist" in result.stderr
    assert not path.exists()


def test_unmigrated_postgresql(error_env: dict[str, str], tmp_path: Path) -> None:
    require_service("PostgreSQL", POSTGRES_ADMIN_URL, 5432)
    database = Database("postgresql", tmp_path)
    try:
        result = zenflow(
            "runs", "list", "--database-url", database.url, env=error_env, cwd=tmp_path
        )
        assert_clear_error(result, EXIT_CONFIGURATION, "run `zenflow db upgrade`")
    finally:
        database.drop()


def test_missing_sqlite_folder(error_env: dict[str, str], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'missing' / 'zenflow.db'}"
    result = zenflow("runs", "list", "--database-url", url, env=error_env, cwd=tmp_path)
    assert_clear_error(result, EXIT_CONFIGURATION, "does not exist")


@pytest.mark.parametrize("command", ["engine", "agent"])
def test_app_module_not_found(command: str, error_env: dict[str, str], tmp_path: Path) -> None:
    result = zenflow(command, "--app", "does_not_exist", env=error_env, cwd=tmp_path)
    assert_clear_error(result, EXIT_CONFIGURATION, "'does_not_exist' not found")


@pytest.mark.parametrize("command", ["engine", "agent"])
def test_app_module_raises_at_import(
    command: str, error_env: dict[str, str], tmp_path: Path
) -> None:
    # The message carries a URL with a password, which the error line must redact.
    (tmp_path / "broken_app.py").write_text(
        f'raise RuntimeError("no settings for amqp://guest:{SECRET}@127.0.0.1:1/")\n'
    )
    result = zenflow(command, "--app", "broken_app", env=error_env, cwd=tmp_path)
    assert_clear_error(result, EXIT_CONFIGURATION, "'broken_app' failed to import")
    assert "RuntimeError: no settings for" in result.stderr


@pytest.mark.parametrize("command", ["engine", "agent"])
def test_app_module_missing(command: str, error_env: dict[str, str], tmp_path: Path) -> None:
    result = zenflow(command, env=error_env, cwd=tmp_path)
    assert_clear_error(result, EXIT_CONFIGURATION, "--app MODULE")


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ("[1,", "invalid ARGS_JSON '[1,'"),
        ("42", "expected a JSON array of positional arguments or an object"),
        ('"text"', "expected a JSON array of positional arguments or an object"),
    ],
)
def test_start_invalid_json(
    arguments: str, fragment: str, error_env: dict[str, str], tmp_path: Path
) -> None:
    result = zenflow("start", "Sequential", arguments, env=error_env, cwd=tmp_path)
    assert_clear_error(result, EXIT_USAGE, fragment)


@pytest.mark.parametrize(
    "command",
    [["start", "Sequential"], ["agent", "--app", "flows"], ["engine", "--app", "flows"]],
    ids=lambda c: c[0],
)
def test_invalid_namespace(
    command: list[str], error_env: dict[str, str], tmp_path: Path, migrated_url: str
) -> None:
    env = dict(error_env, ZENFLOW_DATABASE_URL=migrated_url)
    result = zenflow(*command, "--namespace", "bad/namespace", env=env, cwd=tmp_path)
    assert_clear_error(result, EXIT_CONFIGURATION, "invalid namespace 'bad/namespace'")


def test_invalid_amqp_url(error_env: dict[str, str], tmp_path: Path) -> None:
    url = f"http://guest:{SECRET}@127.0.0.1:1/"
    result = zenflow("start", "Sequential", "--amqp-url", url, env=error_env, cwd=tmp_path)
    assert_clear_error(result, EXIT_CONFIGURATION, "invalid AMQP URL")


@pytest.mark.parametrize(
    "command", [["runs", "list"], ["db", "upgrade"], ["engine", "--app", "flows"]], ids=" ".join
)
def test_invalid_database_url(
    command: list[str], error_env: dict[str, str], tmp_path: Path
) -> None:
    result = zenflow(*command, "--database-url", "notadb://x", env=error_env, cwd=tmp_path)
    assert_clear_error(result, EXIT_CONFIGURATION, "'notadb'")


@pytest.mark.parametrize(
    ("command", "fragment"),
    [
        # Two slashes in place of three: SQLAlchemy parses it, then its SQLite dialect rejects it.
        (["runs", "list", "--database-url", "sqlite://zenflow.db"], "sqlite://zenflow.db"),
        (["db", "upgrade", "--database-url", "sqlite://zenflow.db"], "sqlite://zenflow.db"),
        (
            ["runs", "list", "--database-url", f"postgresql://postgres:{SECRET}@127.0.0.1:x/db"],
            "invalid database URL",
        ),
        (
            ["start", "Sequential", "--amqp-url", f"amqp://guest:{SECRET}@127.0.0.1:x/"],
            "invalid AMQP URL",
        ),
    ],
    ids=["sqlite two slashes", "db upgrade sqlite two slashes", "database port", "amqp port"],
)
def test_malformed_url(
    command: list[str], fragment: str, error_env: dict[str, str], tmp_path: Path
) -> None:
    result = zenflow(*command, env=error_env, cwd=tmp_path)
    assert_clear_error(result, EXIT_CONFIGURATION, fragment)


# Migrations.


def test_db_upgrade_sqlite(error_env: dict[str, str], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    first = zenflow("db", "upgrade", "--database-url", url, env=error_env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert re.fullmatch(
        rf"database {re.escape(url)} upgraded from empty to revision \w+\n", first.stdout
    ), first.stdout

    second = zenflow("db", "upgrade", "--database-url", url, env=error_env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert re.fullmatch(
        rf"database {re.escape(url)} is up to date \(revision \w+\)\n", second.stdout
    ), second.stdout


def test_db_upgrade_postgresql(error_env: dict[str, str], tmp_path: Path) -> None:
    require_service("PostgreSQL", POSTGRES_ADMIN_URL, 5432)
    database = Database("postgresql", tmp_path)
    try:
        # The test server uses trust authentication on 127.0.0.1, so it never checks the password.
        url = database.url.replace("://postgres@", f"://postgres:{SECRET}@")
        redacted_url = database.url.replace("://postgres@", "://postgres:***@")
        first = zenflow("db", "upgrade", "--database-url", url, env=error_env, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        assert f"database {redacted_url} upgraded from empty to revision" in first.stdout
        assert SECRET not in first.stdout + first.stderr

        second = zenflow("db", "upgrade", "--database-url", url, env=error_env, cwd=tmp_path)
        assert second.returncode == 0, second.stderr
        assert f"database {redacted_url} is up to date" in second.stdout
        assert SECRET not in second.stdout + second.stderr

        listing = zenflow("runs", "list", "--database-url", url, env=error_env, cwd=tmp_path)
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.strip() == "no runs"
    finally:
        database.drop()
