"""Passwords in AMQP and database URLs never reach logs, error messages or command output.

Each case puts a distinctive password in a URL, captures everything the code under test
writes (process output, log records, exception text and tracebacks) and checks that the
password appears nowhere, neither as written in the URL nor percent-decoded. The failures
are real: a closed port on 127.0.0.1, a wrong password for the local RabbitMQ, a database
that does not exist on the local PostgreSQL. Where the connection succeeds (PostgreSQL
trusts every local connection, whatever the password), the processes run a workflow at
debug log level, so that library log lines are captured too.

tests/e2e/test_cli.py checks the error lines of the command line for other failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import traceback
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

from engine.service import EngineOptions
from tests.conftest import require_service
from tests.support import (
    APPS,
    POSTGRES_ADMIN_URL,
    REPO,
    ZENFLOW,
    Cluster,
    Database,
    Process,
    result_of,
    start,
)
from zenflow import AsyncClient, Client
from zenflow.config import Settings
from zenflow.errors import TransportError

pytestmark = pytest.mark.e2e

# Percent-encoded in URLs; a leak could show either form.
PASSWORD = "Zq%40Pw%2Fx7-k9Lm%3A"
SECRETS = (PASSWORD, unquote(PASSWORD), "Pw/x7-k9Lm")


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} found in:\n{text[-3000:]}"


@pytest.fixture(scope="module")
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound, but not listening."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


def wrong_password_url(rabbitmq: str) -> str:
    """The test broker's URL with the right user and a wrong password."""
    head, _, rest = rabbitmq.partition("://")
    user = rest.split("@", 1)[0].split(":", 1)[0]
    host = rest.split("@", 1)[1]
    return f"{head}://{user}:{PASSWORD}@{host}"


def environment(**settings: str) -> dict[str, str]:
    """os.environ without ZENFLOW_* variables, with the test apps importable and ``settings``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ZENFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(REPO), os.environ.get("PYTHONPATH", "")])
    env.update(settings)
    return env


def run_all(
    commands: list[list[str]], env: dict[str, str], cwd: Path
) -> list[tuple[list[str], str]]:
    """Run ``zenflow`` commands at the same time; return each command with its output,
    stdout and stderr together."""
    processes = [
        subprocess.Popen(
            [ZENFLOW, *command],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for command in commands
    ]
    outputs = []
    for command, process in zip(commands, processes, strict=True):
        try:
            output, _ = process.communicate(timeout=60)
        finally:
            process.kill()
        outputs.append((command, output))
    return outputs


@pytest.fixture(scope="module")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file to copy: one engine at a time may use a SQLite database."""
    path = tmp_path_factory.mktemp("secrets") / "zenflow.db"
    upgrade = subprocess.run(
        [ZENFLOW, "db", "upgrade", "--database-url", f"sqlite:///{path}"],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    return path


def sqlite_copy(migrated: Path, folder: Path, name: str) -> str:
    path = folder / f"{name}.db"
    shutil.copyfile(migrated, path)
    return f"sqlite:///{path}"


# Processes and the command line.


def test_processes_hide_password_of_broker(
    rabbitmq: str, closed_port: int, migrated_sqlite: Path, tmp_path: Path
) -> None:
    """The broker's port is closed (set by flags), or it refuses the password (set by
    ZENFLOW_AMQP_URL)."""
    closed = f"amqp://guest:{PASSWORD}@127.0.0.1:{closed_port}/"
    env = environment(ZENFLOW_LOG_LEVEL="debug")
    by_flag = ["--amqp-url", closed]
    commands = [
        [
            "engine",
            "--app",
            "fuzz",
            *by_flag,
            "--database-url",
            sqlite_copy(migrated_sqlite, tmp_path, "a"),
        ],
        ["agent", "--app", "fuzz", *by_flag],
        ["start", "Pipeline", "[1]", *by_flag],
        ["runs", "kill", "some-run", *by_flag],
    ]
    by_variable = dict(env, ZENFLOW_AMQP_URL=wrong_password_url(rabbitmq))
    by_variable["ZENFLOW_DATABASE_URL"] = sqlite_copy(migrated_sqlite, tmp_path, "b")
    variable_commands = [
        ["engine", "--app", "fuzz"],
        ["agent", "--app", "fuzz"],
        ["start", "Pipeline", "[1]"],
        ["runs", "event", "some-run", "Go"],
    ]

    outputs = run_all(commands, env, tmp_path) + run_all(variable_commands, by_variable, tmp_path)

    for command, output in outputs:
        assert_no_secret(output)
        assert "guest:***@127.0.0.1" in output, (command, output)
        refused = "cannot connect to RabbitMQ" in output or "rejected the connection" in output
        assert refused, (command, output)
    assert all("ACCESS_REFUSED" in output for _command, output in outputs[len(commands) :])


def test_commands_hide_password_of_database(closed_port: int, tmp_path: Path) -> None:
    require_service("PostgreSQL", POSTGRES_ADMIN_URL, 5432)
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("://postgres@", f"://postgres:{PASSWORD}@")
    closed = base.replace(":5432", f":{closed_port}") + "/zenflow"
    missing = f"{base}/no_such_database_for_zenflow"
    malformed = base.replace(":5432", ":port") + "/zenflow"
    commands = [
        ["db", "upgrade", "--database-url", closed],
        ["runs", "list", "--database-url", closed],
        ["engine", "--app", "fuzz", "--database-url", closed],
        ["db", "upgrade", "--database-url", missing],
        ["engine", "--app", "fuzz", "--database-url", missing],
        ["runs", "show", "some-run", "--database-url", malformed],
    ]

    outputs = run_all(commands, environment(ZENFLOW_LOG_LEVEL="debug"), tmp_path)

    for command, output in outputs:
        assert_no_secret(output)
        assert "postgres:***@127.0.0.1" in output, (command, output)


def test_help_hides_configured_passwords(tmp_path: Path) -> None:
    env = environment(
        ZENFLOW_AMQP_URL=f"amqp://guest:{PASSWORD}@127.0.0.1:5672/",
        ZENFLOW_DATABASE_URL=f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/zenflow",
        COLUMNS="250",
    )
    commands = [
        ["--help"],
        ["engine", "--help"],
        ["agent", "--help"],
        ["start", "--help"],
        ["runs", "list", "--help"],
        ["db", "upgrade", "--help"],
    ]

    outputs = run_all(commands, env, tmp_path)

    for command, output in outputs:
        assert "Usage" in output, (command, output)
        assert_no_secret(output)


def test_running_processes_hide_password_of_database(rabbitmq: str, tmp_path: Path) -> None:
    """PostgreSQL trusts local connections, so the processes run with the password in their
    URL, and log at debug level: library log lines must not show it either."""
    require_service("PostgreSQL", POSTGRES_ADMIN_URL, 5432)
    database = Database("postgresql", tmp_path)
    cluster = Cluster(tmp_path, database, "fuzz")
    cluster.database.url = database.url.replace("://postgres@", f"://postgres:{PASSWORD}@")
    processes: list[Process] = []
    try:
        cluster.migrate()
        env = cluster.env
        env["ZENFLOW_LOG_LEVEL"] = "debug"
        processes = [
            Process(["engine", "--app", "fuzz"], env, tmp_path / "engine.log", tmp_path),
            Process(["agent", "--app", "fuzz"], env, tmp_path / "agent.log", tmp_path),
        ]
        cluster.processes = list(processes)
        processes[0].wait_for_log("engine_started")
        processes[1].wait_for_log("agent_started")

        run_id = start(cluster, "Pipeline", 4)
        assert result_of(cluster, run_id) == [8, 8]
        listing = cluster.zenflow("runs", "show", run_id)
    finally:
        cluster.stop()
        database.drop()

    assert listing.returncode == 0, listing.stderr
    assert_no_secret(listing.stdout + listing.stderr)
    for process in processes:
        assert "debug" in process.log_text()
        assert_no_secret(process.log_text())
    assert "postgres:***@127.0.0.1" in processes[0].log_text()


# Clients.


@pytest.fixture
def captured_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Log records of every logger at debug level, pika's and aiormq's included."""
    with caplog.at_level(logging.DEBUG):
        yield caplog


def failure_text(error: BaseException) -> str:
    """The message, repr and traceback of an error, with its chained errors."""
    return "\n".join([str(error), repr(error), *traceback.format_exception(error)])


def client_urls(rabbitmq: str, closed_port: int) -> list[str]:
    return [f"amqp://guest:{PASSWORD}@127.0.0.1:{closed_port}/", wrong_password_url(rabbitmq)]


def test_client_errors_hide_password(
    rabbitmq: str, closed_port: int, captured_logs: pytest.LogCaptureFixture
) -> None:
    for url in client_urls(rabbitmq, closed_port):
        client = Client(url, connect_timeout=5)
        with pytest.raises(TransportError) as failure:
            client.start("Pipeline", 1)
        client.close()

        assert "guest:***@127.0.0.1" in str(failure.value)
        assert_no_secret(failure_text(failure.value))
        assert_no_secret(repr(client.settings))
    assert_no_secret(captured_logs.text)


def test_async_client_errors_hide_password(
    rabbitmq: str, closed_port: int, captured_logs: pytest.LogCaptureFixture
) -> None:
    async def connect(url: str) -> BaseException:
        client = AsyncClient(url, connect_timeout=5)
        try:
            with pytest.raises(TransportError) as failure:
                await client.start("Pipeline", 1)
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        return failure.value

    for url in client_urls(rabbitmq, closed_port):
        error = asyncio.run(connect(url))

        assert "guest:***@127.0.0.1" in str(error)
        assert_no_secret(failure_text(error))
    assert_no_secret(captured_logs.text)


def test_settings_repr_hides_passwords() -> None:
    settings = Settings.load(
        amqp_url=f"amqps://guest:{PASSWORD}@127.0.0.1:5671/",
        database_url=f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/zenflow",
        environ={},
    )

    for text in (repr(settings), str(settings), repr(EngineOptions(settings=settings))):
        assert_no_secret(text)
        assert "guest:***@127.0.0.1" in text
        assert "postgres:***@127.0.0.1" in text
    assert PASSWORD in settings.amqp_url
