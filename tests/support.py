"""Helpers for tests that run real engine and agent processes against real services.

Every test cluster gets its own namespace (queue and exchange prefix) and its own database,
so tests do not see each other's messages or runs and can run while other clusters exist.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlparse

import pika
import pika.exceptions
from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parent.parent
# The console script installed beside the interpreter that runs the tests.
ZENFLOW = str(Path(sys.executable).with_name("zenflow"))
APPS = Path(__file__).resolve().parent / "apps"
AMQP_URL = os.environ.get("ZENFLOW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
POSTGRES_ADMIN_URL = os.environ.get(
    "ZENFLOW_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, message: str = ""
) -> T:
    """Poll ``condition`` until it returns a truthy value and return that value.

    Raises:
        AssertionError: the deadline passed; the message says what was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message or condition}")
        time.sleep(interval)


def service_answers(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def new_namespace(prefix: str = "zt") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def delete_namespace(namespace: str) -> None:
    """Delete the queues and exchanges of a test namespace from the broker."""
    queues = ["engine.requests", "engine.results"]
    try:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    except pika.exceptions.AMQPError:
        return
    try:
        for name in list_queues(namespace) or [f"{namespace}.{queue}" for queue in queues]:
            channel = connection.channel()
            with contextlib.suppress(pika.exceptions.AMQPError):
                channel.queue_delete(name)
        for exchange in (f"{namespace}.engine", f"{namespace}.runs"):
            channel = connection.channel()
            with contextlib.suppress(pika.exceptions.AMQPError):
                channel.exchange_delete(exchange)
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()


def list_queues(namespace: str) -> list[str]:
    """Return the broker's queues of a namespace (needs rabbitmqctl, which runs as root)."""
    try:
        output = subprocess.run(
            ["rabbitmqctl", "list_queues", "name", "--quiet", "--no-table-headers"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in output.splitlines() if line.startswith(namespace + ".")]


def queue_depth(namespace: str, queue: str) -> int:
    """Return the number of ready messages in a queue of the namespace."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        result = channel.queue_declare(f"{namespace}.{queue}", passive=True)
        return int(result.method.message_count)
    finally:
        connection.close()


class Database:
    """A database for one test cluster: a SQLite file, or a new PostgreSQL database."""

    def __init__(self, backend: str, folder: Path) -> None:
        self.backend = backend
        if backend == "sqlite":
            self.url = f"sqlite:///{folder / 'zenflow.db'}"
            self._admin_database = None
        else:
            name = f"zenflow_test_{uuid.uuid4().hex[:10]}"
            admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            admin.dispose()
            self._admin_database = name
            base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
            self.url = f"{base}/{name}"
        self.engine = create_engine(self.url)

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as connection:
            return connection.execute(text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as connection:
            return list(connection.execute(text(sql), params))

    def run_status(self, run_id: str) -> str | None:
        return self.scalar("SELECT status FROM runs WHERE id = :id", id=run_id)

    def results_per_step(self, run_id: str) -> dict[int, int]:
        """Return how many result entries each step of a run has in history."""
        rows = self.rows(
            "SELECT step, COUNT(*) FROM history WHERE run_id = :id "
            "AND kind IN ('task_completed', 'task_failed') GROUP BY step",
            id=run_id,
        )
        return {int(step): int(count) for step, count in rows}

    def drop(self) -> None:
        self.engine.dispose()
        if self._admin_database is None:
            return
        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(
                text(f'DROP DATABASE IF EXISTS "{self._admin_database}" WITH (FORCE)')
            )
        admin.dispose()


class Process:
    """A ``zenflow`` subprocess whose output goes to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [ZENFLOW, *args],
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, event: str, timeout: float = 30.0, count: int = 1) -> None:
        def seen() -> bool:
            if self.popen.poll() is not None:
                output = self.log_text()[-3000:]
                raise AssertionError(
                    f"zenflow {self.args[0]} exited with {self.popen.returncode}:\n{output}"
                )
            return self.log_text().count(f'"event": "{event}"') >= count

        wait_until(seen, timeout, message=f"{event} in {self.log_path.name}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int:
        """Send SIGTERM and return the exit code; SIGKILL if it does not exit in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self._log.close()
        return self.popen.returncode


class Cluster:
    """Engine and agent processes sharing one namespace and one database."""

    def __init__(self, folder: Path, database: Database, app: str, namespace: str | None = None):
        self.folder = folder
        self.database = database
        self.app = app
        self.namespace = namespace or new_namespace()
        # The broker URL given to processes started from now on, and to clients.
        self.amqp_url = AMQP_URL
        self.processes: list[Process] = []
        self._count = 0

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "ZENFLOW_AMQP_URL": self.amqp_url,
                "ZENFLOW_DATABASE_URL": self.database.url,
                "ZENFLOW_NAMESPACE": self.namespace,
                "ZENFLOW_LOG_LEVEL": env.get("ZENFLOW_TEST_LOG_LEVEL", "info"),
                "PYTHONPATH": os.pathsep.join([str(APPS), str(REPO), env.get("PYTHONPATH", "")]),
            }
        )
        return env

    def zenflow(
        self, *args: str, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a short ``zenflow`` command in the cluster's environment and return its result."""
        return subprocess.run(
            [ZENFLOW, *args],
            env=self.env,
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )

    def migrate(self) -> None:
        result = self.zenflow("db", "upgrade")
        assert result.returncode == 0, result.stderr

    def _spawn(self, kind: str, *extra: str) -> Process:
        self._count += 1
        log_path = self.folder / f"{kind}-{self._count}.log"
        process = Process([kind, "--app", self.app, *extra], self.env, log_path, self.folder)
        self.processes.append(process)
        return process

    def start_engine(self, *extra: str, app: str | None = None) -> Process:
        if app is not None:
            self.app = app
        process = self._spawn("engine", *extra)
        process.wait_for_log("engine_started")
        return process

    def start_agent(self, *extra: str, wait: bool = True) -> Process:
        """Start an agent and, if ``wait``, wait until it consumes its queues."""
        process = self._spawn("agent", *extra)
        if wait:
            process.wait_for_log("agent_started")
        return process

    def client(self) -> Any:
        from zenflow import Client

        return Client(self.amqp_url, namespace=self.namespace)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()
        self.processes.clear()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log_text()[-4000:]}" for p in self.processes)


@contextlib.contextmanager
def cluster_of(folder: Path, backend: str, app: str) -> Iterator[Cluster]:
    """Create a database and a namespace, yield the cluster, and clean everything up."""
    database = Database(backend, folder)
    cluster = Cluster(folder, database, app)
    try:
        cluster.migrate()
        yield cluster
    finally:
        cluster.stop()
        delete_namespace(cluster.namespace)
        database.drop()


# Reading and driving the runs of a cluster.


def utc(value: dt.datetime | str) -> dt.datetime:
    """Return a stored instant (naive UTC, as text in SQLite) as an aware UTC datetime."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.replace(tzinfo=dt.UTC)


def start(cluster: Cluster, workflow: Any, *args: Any, **kwargs: Any) -> str:
    """Start a run of ``workflow`` (a name, class or function) and return its run id."""
    with cluster.client() as client:
        run_id: str = client.start(workflow, *args, **kwargs)
    return run_id


def send(cluster: Cluster, run: str, name: str, data: Any = None) -> dict[str, Any]:
    """Send the event ``name`` to a run, by run id or business id, and return the reply."""
    with cluster.client() as client:
        reply: dict[str, Any] = client.send_event(run, name, data)
    return reply


def result_of(cluster: Cluster, run_id: str, timeout: float = 30.0) -> Any:
    """Wait for the run's result, and fail with the processes' logs if it times out."""
    from zenflow import RunTimeout

    with cluster.client() as client:
        try:
            return client.wait(run_id, timeout=timeout)
        except RunTimeout as error:
            raise AssertionError(f"{error}\n{cluster.logs()}") from None


def history_kinds(cluster: Cluster, run_id: str, step: int | None = None) -> list[str]:
    """Return the kinds of the run's history entries in order, only those of ``step`` if given."""
    sql = "SELECT kind FROM history WHERE run_id = :id"
    if step is None:
        rows = cluster.database.rows(sql + " ORDER BY seq", id=run_id)
    else:
        rows = cluster.database.rows(sql + " AND step = :step ORDER BY seq", id=run_id, step=step)
    return [row[0] for row in rows]


def history_time(cluster: Cluster, run_id: str, kind: str, step: int | None = None) -> dt.datetime:
    """Return when the run's history entry of ``kind`` (at ``step`` if given) was written."""
    sql = "SELECT created_at FROM history WHERE run_id = :id AND kind = :kind"
    if step is None:
        value = cluster.database.scalar(sql, id=run_id, kind=kind)
    else:
        value = cluster.database.scalar(sql + " AND step = :step", id=run_id, kind=kind, step=step)
    assert value is not None, f"run {run_id} has no {kind} entry"
    return utc(value)


def count_kind(cluster: Cluster, run_id: str, kind: str, step: int | None = None) -> int:
    """Count the run's history entries of ``kind``, only those of ``step`` if given."""
    sql = "SELECT COUNT(*) FROM history WHERE run_id = :id AND kind = :kind"
    if step is None:
        count = cluster.database.scalar(sql, id=run_id, kind=kind)
    else:
        count = cluster.database.scalar(sql + " AND step = :step", id=run_id, kind=kind, step=step)
    return int(count)


def wait_for_kind(
    cluster: Cluster, run_id: str, kind: str, count: int = 1, step: int | None = None
) -> None:
    """Wait until the run has at least ``count`` history entries of ``kind`` (at ``step``)."""
    at_step = "" if step is None else f" at step {step}"
    wait_until(
        lambda: count_kind(cluster, run_id, kind, step) >= count,
        20,
        message=f"{count} {kind} entries{at_step} of run {run_id}",
    )


def wait_until_waiting_for(cluster: Cluster, run_id: str, names: list[str]) -> None:
    """Wait until the run waits for events of exactly ``names``, in that order."""
    stored = ",".join(["", *names, ""])
    wait_until(
        lambda: (
            cluster.database.scalar("SELECT waiting_for FROM runs WHERE id = :id", id=run_id)
            == stored
        ),
        30,
        message=f"run {run_id} to wait for {names}",
    )


def wait_for_timer(cluster: Cluster, run_id: str) -> dt.datetime:
    """Wait until the run has a timer row and return its fire instant."""
    rows = wait_until(
        lambda: cluster.database.rows("SELECT fire_at FROM timers WHERE run_id = :id", id=run_id),
        15,
        message=f"a timer of run {run_id}",
    )
    return utc(rows[0][0])


def children_of(cluster: Cluster, parent_id: str) -> list[Any]:
    """Return the child runs of a run as (id, parent_step, workflow, status), by step."""
    return cluster.database.rows(
        "SELECT id, parent_step, workflow, status FROM runs WHERE parent_id = :id "
        "ORDER BY parent_step",
        id=parent_id,
    )


def wait_for_child_run(cluster: Cluster, parent_id: str) -> str:
    """Wait until the run has a child run and return the id of the first, by parent step."""
    rows = wait_until(
        lambda: children_of(cluster, parent_id), 15, message=f"the child run of {parent_id}"
    )
    return str(rows[0][0])


class TraceLine(NamedTuple):
    """One attempt's line in a trace file that a task of tests/apps/failures.py wrote."""

    time: float
    attempt: int
    pid: int
    note: str  # empty at the start of an attempt


def read_trace(path: Path) -> list[TraceLine]:
    """Return the lines of a trace file in the order written; none if it does not exist."""
    if not path.exists():
        return []
    lines = [line.split(" ", 3) for line in path.read_text().splitlines()]
    return [
        TraceLine(float(when), int(attempt), int(pid), note) for when, attempt, pid, note in lines
    ]
