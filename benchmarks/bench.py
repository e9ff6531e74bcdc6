"""Measure zenflow's step latency and throughput against the raw AMQP floor on one machine,
and how late its timers fire on an idle engine.

Run from the repository root, in the project's virtualenv, with RabbitMQ and PostgreSQL up:

    python benchmarks/bench.py --backend both --json /tmp/bench.json

The floor is what aio-pika and RabbitMQ alone cost for the delivery guarantees of one zenflow
step: a persistent message, with publisher confirms, to a durable queue, consumed with manual
acknowledgement by an echo process that publishes a persistent, confirmed reply to a durable
queue and then acknowledges, as a zenflow agent does. The zenflow figures come from real
``zenflow engine`` and ``zenflow agent`` processes started with the helpers of tests/support.py,
each backend with its own namespace and database, and are printed as ratios to the floor. The
sequential round trip is measured again right before each backend, because other processes
on the machine change latencies within minutes. The timer phase runs last on each backend. It
compares, for each timer, the ``history.created_at`` of its ``timer_fired`` entry with its
``timers.fire_at``.

Every process, queue and database that the script creates is removed when it ends, also on
Ctrl-C, SIGTERM or an error; ``--timeout`` bounds the measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aio_pika  # noqa: E402
import aio_pika.abc  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from tests.support import (  # noqa: E402
    AMQP_URL,
    POSTGRES_ADMIN_URL,
    Cluster,
    Database,
    Process,
    delete_namespace,
    new_namespace,
    service_answers,
)
from zenflow import AsyncClient  # noqa: E402

T = TypeVar("T")

BENCH_APPS = Path(__file__).resolve().parent / "apps"
APP = "bench_app"
CHAIN_WORKFLOW = "Chain"
ONE_STEP_WORKFLOW = "OneStep"
TIMER_WORKFLOW = "OneTimer"
TARGET_RATIO = 3.0
# Product target: on an idle engine a timer fires within this many milliseconds of its due time.
TIMER_TARGET_MS = 1000.0
# Seconds between the starts of the timer runs. Run i waits timer_seconds(i), so the due
# instants are nominally at least 50 ms apart. Each start costs the engine a few ms, so the
# engine is idle most of the time when a timer falls due.
TIMER_START_INTERVAL = 0.05

# The engine consumes with a prefetch of 200 by default (EngineOptions.prefetch); both
# consumers of the floor use the same window.
FLOOR_PREFETCH = 200
# A msgpack task message for a one-argument task is 120 bytes and its result 178 bytes.
FLOOR_PAYLOAD = b"x" * 150

# Phases of one step, each the time between two timestamps that the step's rows store:
# - history.created_at: the engine takes one instant per transaction and writes it into every
#   row of that transaction. So the result of step N and the scheduling of step N+1 share
#   it, and it marks the start of the transaction: after SQLite's BEGIN IMMEDIATE, but before
#   PostgreSQL's BEGIN, which psycopg sends with the first statement.
# - attempts.started_at and finished_at: the agent's time.time() before and after the task
#   call, which includes the hop to its thread pool and back.
# The three phases add up to the step time measured from the history. Each entry is a key,
# the boundaries with the timestamp that each comes from, and what happens in the phase.
PHASES = (
    (
        "engine",
        "transaction starts [history.created_at] -> agent starts the task [attempts.started_at]",
        "the transaction and its commit, hop back to the event loop, task publish, broker, "
        "delivery",
    ),
    (
        "task",
        "-> agent has run the task [attempts.finished_at]",
        "hop to the agent's thread pool and back, the no-op task",
    ),
    (
        "to_engine",
        "-> the engine's next transaction starts [history.created_at of the result]",
        "result publish, broker, delivery, run lock, hop to a database thread, "
        "on SQLite BEGIN IMMEDIATE (the write lock)",
    ),
)
# The first phase, split at the engine's task_completed log line. The engine writes that line
# after the transaction has committed and before it publishes the next task, but at debug
# level only, so at the default info level the split is missing.
ENGINE_SUBPHASES = (
    (
        "transaction",
        "transaction starts -> engine logs task_completed [engine log, debug level]",
        "the transaction and its commit, hop back to the event loop",
    ),
    (
        "to_agent",
        "-> agent starts the task [attempts.started_at]",
        "task publish, broker, delivery",
    ),
)

# Component of a py-spy frame, by the prefix of its file name, which py-spy prints
# relative to the sys.path entry it was found under.
COMPONENTS = (
    ("sqlalchemy/", "SQLAlchemy"),
    ("psycopg", "psycopg"),
    ("aio_pika/", "AMQP client (aio-pika, aiormq, pamqp)"),
    ("aiormq/", "AMQP client (aio-pika, aiormq, pamqp)"),
    ("pamqp/", "AMQP client (aio-pika, aiormq, pamqp)"),
    ("structlog/", "logging (structlog, logging)"),
    ("logging/", "logging (structlog, logging)"),
    ("asyncio/", "asyncio event loop"),
    ("selectors.py", "asyncio event loop"),
    ("concurrent/", "threads and executors"),
    ("threading.py", "threads and executors"),
    ("queue.py", "threads and executors"),
    ("json/", "json"),
    ("msgpack/", "msgpack"),
    ("engine/", "zenflow"),
    ("agent/", "zenflow"),
    ("zenflow/", "zenflow"),
)
DRIVER_CALLS = ("do_execute", "do_executemany", "do_commit", "do_rollback", "do_ping")
PROJECT_FILES = ("engine/", "agent/", "zenflow/")


# Helpers.


class Deadline:
    """The end of the time budget, shared by every wait of the run."""

    def __init__(self, seconds: float) -> None:
        self.total = seconds
        self.end = time.monotonic() + seconds

    def left(self, cap: float) -> float:
        """Return ``cap`` seconds, or the seconds left in the budget if fewer.

        Raises:
            TimeoutError: the budget is spent.
        """
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the benchmark exceeded --timeout {self.total:.0f} s")
        return min(cap, remaining)


def summarize(seconds: list[float]) -> dict[str, float]:
    """Return the mean, median and 95th percentile (nearest rank) in milliseconds."""
    ordered = sorted(seconds)
    if not ordered:
        return {"count": 0}

    def percentile(rank: float) -> float:
        return ordered[max(0, math.ceil(rank / 100 * len(ordered)) - 1)] * 1000

    return {
        "count": len(ordered),
        "mean_ms": statistics.fmean(ordered) * 1000,
        "p50_ms": percentile(50),
        "p95_ms": percentile(95),
    }


def timer_seconds(index: int) -> float:
    """Return the wait of the timer run number ``index``: 1.0 to 4.9 s in steps of 0.1 s."""
    return 1 + (index % 40) / 10


def cpu_seconds(pid: int) -> float | None:
    """Return the user plus system CPU seconds of a process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name: utime and stime are fields 14 and 15.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rabbitmq_pid() -> int | None:
    """Return the pid of the RabbitMQ server (the Erlang VM running rabbit), if local."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"beam.smp" in command and b"rabbit" in command:
            return int(entry.name)
    return None


class CpuMeter:
    """CPU time of named groups of processes between ``start`` and ``stop``."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._before: dict[int, float] = {}

    def start(self) -> None:
        self._before = {}
        for pid in itertools.chain.from_iterable(self.groups.values()):
            seconds = cpu_seconds(pid)
            if seconds is not None:
                self._before[pid] = seconds

    def stop(self, units: int) -> dict[str, float]:
        """Return the CPU milliseconds per unit of work of each group."""
        per_unit = {}
        for name, pids in self.groups.items():
            used = 0.0
            for pid in pids:
                after = cpu_seconds(pid)
                if after is not None and pid in self._before:
                    used += after - self._before[pid]
            per_unit[name] = used * 1000 / units
        return per_unit


def as_datetime(value: Any) -> dt.datetime:
    """Return a stored instant as a naive UTC datetime (SQLite returns text, psycopg datetimes)."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime)
    return value.replace(tzinfo=None)


def epoch_of(value: Any) -> float:
    return as_datetime(value).replace(tzinfo=dt.UTC).timestamp()


def stop_process(popen: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """Send SIGTERM to a process started by this script, then SIGKILL if it does not exit."""
    if popen.poll() is not None:
        return
    popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(timeout=10)


async def poll_until(
    condition: Callable[[], Awaitable[T]], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Await ``condition`` until it returns a truthy value, and return that value.

    Raises:
        TimeoutError: ``timeout`` seconds passed; the message names what was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


# The raw AMQP floor.


async def serve_echo(amqp_url: str, queue_name: str) -> None:
    """Reply to every message of ``queue_name`` as a zenflow agent does, until SIGTERM/SIGINT.

    Each message is consumed with manual acknowledgement. Its body goes back to ``reply_to``
    as a persistent message with publisher confirms, and the request is acknowledged once
    RabbitMQ confirmed the reply.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    connection = await aio_pika.connect(
        amqp_url, client_properties={"connection_name": "zenflow benchmark echo"}
    )
    try:
        publish_channel = await connection.channel(publisher_confirms=True)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=FLOOR_PREFETCH)
        queue = await consume_channel.declare_queue(queue_name, durable=True)

        async def echo(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            assert message.reply_to is not None
            reply = aio_pika.Message(
                message.body,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                correlation_id=message.correlation_id,
            )
            await publish_channel.default_exchange.publish(reply, message.reply_to, mandatory=True)
            await message.ack()

        await queue.consume(echo)
        await stop.wait()
    finally:
        await connection.close()


class FloorClient:
    """Sends requests to the echo process and matches its replies by correlation id."""

    def __init__(
        self, connection: aio_pika.abc.AbstractConnection, requests: str, replies: str
    ) -> None:
        self._connection = connection
        self._requests = requests
        self._replies = replies
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._ids = itertools.count()

    async def open(self) -> None:
        self._publish_channel = await self._connection.channel(publisher_confirms=True)
        consume_channel = await self._connection.channel()
        await consume_channel.set_qos(prefetch_count=FLOOR_PREFETCH)
        replies = await consume_channel.declare_queue(self._replies, durable=True)
        await replies.consume(self._on_reply)

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        waiter = self._waiters.pop(message.correlation_id or "", None)
        await message.ack()
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def round_trip(self, timeout: float = 30.0) -> float:
        """Send one request, wait for its reply and return the seconds taken."""
        correlation_id = str(next(self._ids))
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[correlation_id] = waiter
        message = aio_pika.Message(
            FLOOR_PAYLOAD,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=correlation_id,
            reply_to=self._replies,
        )
        started = time.perf_counter()
        await self._publish_channel.default_exchange.publish(
            message, self._requests, mandatory=True
        )
        await asyncio.wait_for(waiter, timeout)
        return time.perf_counter() - started

    async def pipelined(self, total: int, window: int) -> float:
        """Return round trips per second over ``total`` of them, ``window`` at most in flight."""
        slots = asyncio.Semaphore(window)

        async def one() -> None:
            async with slots:
                await self.round_trip()

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(total)))
        return total / (time.perf_counter() - started)


def measure_floor(
    options: argparse.Namespace, deadline: Deadline, folder: Path, *, pipelined: bool = True
) -> dict[str, Any]:
    """Start the echo process, measure round trips against it, and remove it and its queues.

    Without ``pipelined`` only the sequential round trips are measured.
    """
    namespace = new_namespace("zb")
    requests, replies = f"{namespace}.echo.requests", f"{namespace}.echo.replies"
    log_path = folder / "echo.log"
    with open(log_path, "wb") as log:
        echo = subprocess.Popen(
            [sys.executable, __file__, "--echo-queue", requests],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            return asyncio.run(
                _measure_floor(options, deadline, echo, log_path, requests, replies, pipelined)
            )
        finally:
            try:
                stop_process(echo)
            finally:
                delete_namespace(namespace)


async def _measure_floor(
    options: argparse.Namespace,
    deadline: Deadline,
    echo: subprocess.Popen[bytes],
    echo_log: Path,
    requests: str,
    replies: str,
    pipelined: bool,
) -> dict[str, Any]:
    connection = await aio_pika.connect(
        AMQP_URL, client_properties={"connection_name": "zenflow benchmark client"}
    )
    try:
        assert connection.transport is not None
        server = connection.transport.connection.server_properties
        channel = await connection.channel()
        await channel.declare_queue(requests, durable=True)

        async def echo_consumes() -> bool:
            if echo.poll() is not None:
                output = echo_log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the echo process exited with {echo.returncode}:\n{output}")
            queue = await channel.declare_queue(requests, passive=True)
            return bool(queue.declaration_result.consumer_count)

        await poll_until(echo_consumes, deadline.left(30), "the echo process to consume")
        client = FloorClient(connection, requests, replies)
        await client.open()
        meter = CpuMeter(
            {"client": [os.getpid()], "echo": [echo.pid], "rabbitmq": _pids(rabbitmq_pid())}
        )

        async def sequential() -> list[float]:
            for _ in range(options.warmup):
                await client.round_trip()
            meter.start()
            return [await client.round_trip() for _ in range(options.round_trips)]

        samples = await asyncio.wait_for(sequential(), deadline.left(120))
        report: dict[str, Any] = {
            "rabbitmq_version": str(server.get("version", "unknown")),
            "sequential": summarize(samples),
            "sequential_cpu_ms": meter.stop(options.round_trips),
        }
        if not pipelined:
            return report

        async def measure_pipelined() -> float:
            await client.pipelined(options.window, options.window)
            return await client.pipelined(options.pipelined_messages, options.window)

        report["pipelined"] = {
            "messages": options.pipelined_messages,
            "in_flight": options.window,
            "per_second": await asyncio.wait_for(measure_pipelined(), deadline.left(120)),
        }
        return report
    finally:
        await connection.close()


def _pids(pid: int | None) -> list[int]:
    return [] if pid is None else [pid]


# zenflow.


class BenchCluster(Cluster):
    """A tests.support cluster that loads benchmarks/apps and logs at a chosen level."""

    def __init__(self, folder: Path, database: Database, log_level: str) -> None:
        super().__init__(folder, database, APP, namespace=new_namespace("zb"))
        self.log_level = log_level

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env["PYTHONPATH"] = os.pathsep.join([str(BENCH_APPS), env["PYTHONPATH"]])
        env["ZENFLOW_LOG_LEVEL"] = self.log_level
        return env


@contextlib.contextmanager
def bench_cluster(backend: str, folder: Path, log_level: str) -> Iterator[BenchCluster]:
    """Create a database and a namespace, yield the cluster, and remove all of it after."""
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        database = Database(backend, folder)
        cleanup.callback(database.drop)
        cluster = BenchCluster(folder, database, log_level)
        cleanup.callback(delete_namespace, cluster.namespace)
        cleanup.callback(cluster.stop)
        cluster.migrate()
        yield cluster


def measure_zenflow(
    backend: str,
    options: argparse.Namespace,
    deadline: Deadline,
    folder: Path,
    floor: dict[str, Any],
) -> dict[str, Any]:
    """Measure zenflow on ``backend``, with ratios to a raw round trip measured just before
    and to the pipelined rate of ``floor``."""
    local_floor = measure_floor(options, deadline, folder, pipelined=False)
    with bench_cluster(backend, folder / backend, options.log_level) as cluster:
        engine = cluster.start_engine()
        agent = cluster.start_agent()
        bench = ZenflowBench(cluster, engine, agent, options, deadline)
        report = asyncio.run(
            bench.measure(local_floor["sequential"], floor["pipelined"]["per_second"])
        )
    report["floor"] = local_floor
    return report


class ZenflowBench:
    """The measurements of one backend, against one running engine and agent."""

    def __init__(
        self,
        cluster: BenchCluster,
        engine: Process,
        agent: Process,
        options: argparse.Namespace,
        deadline: Deadline,
    ) -> None:
        self.cluster = cluster
        self.database = cluster.database
        self.engine = engine
        self.agent = agent
        self.options = options
        self.deadline = deadline

    async def measure(
        self, floor_round_trip: dict[str, float], floor_rate: float
    ) -> dict[str, Any]:
        """Return the sequential and throughput figures, with their ratios to the raw round
        trip (``summarize`` output) and to the raw pipelined round trips per second."""
        async with AsyncClient(AMQP_URL, namespace=self.cluster.namespace) as client:
            self.client = client
            # The warm-up run also opens the engine's database connections, which the CPU
            # meter needs to find the PostgreSQL backends.
            await self._run_chain(self.options.steps)
            meter = CpuMeter(await asyncio.to_thread(self._process_groups))
            runs = []
            for _ in range(self.options.repeats):
                meter.start()
                run_id, wall = await self._run_chain(self.options.steps)
                runs.append(
                    {"run_id": run_id, "wall_s": wall, "cpu_ms": meter.stop(self.options.steps)}
                )
            report = await asyncio.to_thread(self._sequential_report, runs)
            floor_ms = floor_round_trip["mean_ms"]
            report["sequential"]["ratio"] = report["sequential"]["step_ms"] / floor_ms
            profile_mode = self.options.profile
            above_target = report["sequential"]["ratio"] > TARGET_RATIO
            if profile_mode == "always" or (profile_mode == "auto" and above_target):
                report["profile"] = await self._profile(meter)
            report["throughput"] = await self._throughput(meter)
            report["throughput"]["ratio"] = report["throughput"]["per_second"] / floor_rate
            if self.options.timers:
                report["timers"] = await self._timer_lateness()
            return report

    def _process_groups(self) -> dict[str, list[int]]:
        groups = {
            "engine": [self.engine.popen.pid],
            "agent": [self.agent.popen.pid],
            "rabbitmq": _pids(rabbitmq_pid()),
        }
        if self.database.backend == "postgresql":
            rows = self.database.rows(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            groups["postgresql"] = [int(pid) for (pid,) in rows]
        return groups

    async def _run_chain(self, steps: int) -> tuple[str, float]:
        """Run a Chain of ``steps`` steps; return its run id and the client's wall seconds."""
        timeout = self.deadline.left(max(60.0, steps * 0.2))
        started = time.perf_counter()
        run_id = await self.client.start(CHAIN_WORKFLOW, steps)
        await self.client.wait(run_id, timeout=timeout)
        return run_id, time.perf_counter() - started

    def _sequential_report(self, runs: list[dict[str, Any]]) -> dict[str, Any]:
        steps = self.options.steps
        phases: dict[str, list[float]] = {key: [] for key, *_ in (*PHASES, *ENGINE_SUBPHASES)}
        logged = self._task_completed_logs({run["run_id"] for run in runs})
        for run in runs:
            run_phases, run["history_s"] = self._step_phases(
                run["run_id"], logged.get(run["run_id"], {})
            )
            for key, values in run_phases.items():
                phases[key].extend(values)
        wall_steps = [run["wall_s"] / steps for run in runs]
        cpu = {
            name: statistics.fmean(run["cpu_ms"][name] for run in runs)
            for name in runs[0]["cpu_ms"]
        }
        return {
            "sequential": {
                "steps": steps,
                "runs": runs,
                "step_ms": statistics.fmean(wall_steps) * 1000,
                "step_ms_per_run": [value * 1000 for value in wall_steps],
                "history_step_ms": statistics.fmean(run["history_s"] for run in runs)
                * 1000
                / steps,
                "phases": {key: summarize(values) for key, values in phases.items()},
                "phase_boundaries": {
                    key: boundaries for key, boundaries, _ in (*PHASES, *ENGINE_SUBPHASES)
                },
                "cpu_ms_per_step": cpu,
            }
        }

    def _task_completed_logs(self, run_ids: set[str]) -> dict[str, dict[int, dt.datetime]]:
        """Return, by run and step, when the engine logged ``task_completed`` for the step before.

        A Chain schedules one step per transaction, and the engine logs that line after the
        transaction committed. It logs it at debug level, so at info level the result is empty.
        """
        logged: dict[str, dict[int, dt.datetime]] = {run_id: {} for run_id in run_ids}
        for line in self.engine.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            steps = logged.get(entry.get("run_id"))
            if steps is None or "timestamp" not in entry:
                continue
            if entry.get("event") == "task_completed" and entry.get("step") is not None:
                steps[int(entry["step"]) + 1] = as_datetime(entry["timestamp"].rstrip("Z"))
        return logged

    def _step_phases(
        self, run_id: str, logged: dict[int, dt.datetime]
    ) -> tuple[dict[str, list[float]], float]:
        """Split each step of a run into PHASES, and return them with the run's duration.

        Steps whose scheduling transaction has a ``task_completed`` log line in ``logged``
        also get the ENGINE_SUBPHASES. Step 1 never does: its transaction is the run's start.
        """
        scheduled: dict[int, dt.datetime] = {}
        completed: dict[int, dt.datetime] = {}
        bounds: dict[str, dt.datetime] = {}
        history = self.database.rows(
            "SELECT kind, step, created_at FROM history WHERE run_id = :id ORDER BY seq",
            id=run_id,
        )
        for kind, step, created_at in history:
            if kind == "task_scheduled":
                scheduled[int(step)] = as_datetime(created_at)
            elif kind == "task_completed":
                completed[int(step)] = as_datetime(created_at)
            elif kind in ("run_started", "run_completed"):
                bounds[kind] = as_datetime(created_at)
        attempts = {
            int(step): (as_datetime(started), as_datetime(finished))
            for step, started, finished in self.database.rows(
                "SELECT step, started_at, finished_at FROM attempts "
                "WHERE run_id = :id AND attempt = 1",
                id=run_id,
            )
        }
        phases: dict[str, list[float]] = {key: [] for key, *_ in (*PHASES, *ENGINE_SUBPHASES)}
        for step in sorted(scheduled):
            agent_started, agent_finished = attempts[step]
            phases["engine"].append((agent_started - scheduled[step]).total_seconds())
            phases["task"].append((agent_finished - agent_started).total_seconds())
            phases["to_engine"].append((completed[step] - agent_finished).total_seconds())
            committed = logged.get(step)
            if committed is not None:
                phases["transaction"].append((committed - scheduled[step]).total_seconds())
                phases["to_agent"].append((agent_started - committed).total_seconds())
        total = (bounds["run_completed"] - bounds["run_started"]).total_seconds()
        return phases, total

    async def _finished_runs(self, workflow: str) -> int:
        return int(
            await asyncio.to_thread(
                self.database.scalar,
                "SELECT COUNT(*) FROM runs WHERE workflow = :workflow "
                "AND status IN ('completed', 'failed')",
                workflow=workflow,
            )
        )

    async def _start_and_wait_all(self, count: int) -> tuple[float, float, float]:
        """Start ``count`` OneStep runs at once and poll the database until all finished.

        Returns the epoch second of the first start, and the seconds until every start was
        confirmed and until the poll saw the last run finished.
        """
        before = await self._finished_runs(ONE_STEP_WORKFLOW)
        first_start = time.time()
        started = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(
                *(self.client.start(ONE_STEP_WORKFLOW, index) for index in range(count))
            ),
            self.deadline.left(60),
        )
        confirmed = time.perf_counter() - started
        await self._wait_finished(ONE_STEP_WORKFLOW, before + count, self.deadline.left(180))
        return first_start, confirmed, time.perf_counter() - started

    async def _wait_finished(self, workflow: str, total: int, timeout: float) -> None:
        """Poll the database until ``total`` runs of ``workflow`` have finished.

        Raises:
            RuntimeError: the engine exited.
            TimeoutError: ``timeout`` seconds passed.
        """

        async def all_finished() -> bool:
            if self.engine.popen.poll() is not None:
                raise RuntimeError(f"the engine exited:\n{self.engine.log_text()[-3000:]}")
            return await self._finished_runs(workflow) >= total

        await poll_until(all_finished, timeout, f"{total} {workflow} runs to finish")

    async def _throughput(self, meter: CpuMeter) -> dict[str, Any]:
        await self._start_and_wait_all(self.options.throughput_warmup)
        meter.start()
        first_start, confirmed, polled = await self._start_and_wait_all(self.options.runs)
        cpu = meter.stop(self.options.runs)
        last_finished, failed = await asyncio.to_thread(self._last_finished)
        elapsed = epoch_of(last_finished) - first_start
        return {
            "runs": self.options.runs,
            "failed": failed,
            "per_second": self.options.runs / elapsed,
            "elapsed_s": elapsed,
            "starts_confirmed_s": confirmed,
            "polled_s": polled,
            "cpu_ms_per_run": cpu,
        }

    async def _timer_lateness(self) -> dict[str, Any]:
        """Start OneTimer runs TIMER_START_INTERVAL apart, wait until all have finished, and
        return the lateness of their timers.

        A timer's lateness is the history.created_at of its ``timer_fired`` entry minus its
        timers.fire_at. The engine's clock sets both.
        """
        count = self.options.timers
        durations = [timer_seconds(index) for index in range(count)]
        before = await self._finished_runs(TIMER_WORKFLOW)
        loop = asyncio.get_running_loop()
        first_start = loop.time()
        for index, seconds in enumerate(durations):
            # Starts follow a fixed schedule, so a slow start delays none of the later ones.
            delay = first_start + index * TIMER_START_INTERVAL - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await asyncio.wait_for(
                self.client.start(TIMER_WORKFLOW, seconds), self.deadline.left(30)
            )
        await self._wait_finished(
            TIMER_WORKFLOW, before + count, self.deadline.left(max(durations) + 60)
        )
        elapsed = loop.time() - first_start

        rows = await asyncio.to_thread(self._timer_rows)
        lateness = [
            (as_datetime(fired_at) - as_datetime(fire_at)).total_seconds()
            for fire_at, fired_at, _ in rows
            if fired_at is not None
        ]
        summary: dict[str, Any] = summarize(lateness)
        if lateness:
            summary["min_ms"] = min(lateness) * 1000
            summary["max_ms"] = max(lateness) * 1000
        unfired = sum(1 for _, fired_at, _ in rows if fired_at is None)
        failed = sum(1 for *_, status in rows if status == "failed")
        met = summary["count"] == count and summary.get("max_ms", math.inf) < TIMER_TARGET_MS
        return {
            "runs": count,
            "start_interval_s": TIMER_START_INTERVAL,
            "wait_s": [min(durations), max(durations)],
            "elapsed_s": elapsed,
            "timers": len(rows),
            "unfired": unfired,
            "failed": failed,
            "lateness": summary,
            "target_max_ms": TIMER_TARGET_MS,
            "met": met,
        }

    def _timer_rows(self) -> list[Any]:
        """Return fire_at, the ``timer_fired`` entry's created_at (None if there is none) and
        the run's status, for every timer of the OneTimer runs."""
        return self.database.rows(
            "SELECT timers.fire_at, history.created_at, runs.status FROM timers "
            "JOIN runs ON runs.id = timers.run_id "
            "LEFT JOIN history ON history.run_id = timers.run_id "
            "AND history.step = timers.step AND history.kind = 'timer_fired' "
            "WHERE runs.workflow = :workflow",
            workflow=TIMER_WORKFLOW,
        )

    def _last_finished(self) -> tuple[Any, int]:
        rows = self.database.rows(
            "SELECT MAX(finished_at), SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) "
            "FROM runs WHERE workflow = :workflow",
            workflow=ONE_STEP_WORKFLOW,
        )
        last_finished, failed = rows[0]
        return last_finished, int(failed or 0)

    async def _profile(self, meter: CpuMeter) -> dict[str, Any]:
        """Sample the engine and the agent with py-spy during one more Chain run."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(py_spy).exists():
            return {"skipped": "py-spy is not installed: pip install py-spy"}
        folder = self.cluster.folder
        targets = {"engine": self.engine.popen.pid, "agent": self.agent.popen.pid}
        samplers: dict[str, tuple[subprocess.Popen[bytes], Path, IO[bytes]]] = {}
        steps = self.options.profile_steps
        try:
            for name, pid in targets.items():
                output = folder / f"py-spy-{name}.txt"
                log: IO[bytes] = open(folder / f"py-spy-{name}.log", "wb")  # noqa: SIM115
                command = [
                    py_spy, "record", "--pid", str(pid), "--rate", str(self.options.profile_rate),
                    "--nonblocking", "--gil", "--threads",
                    "--format", "raw", "--output", str(output),
                ]  # fmt: skip
                popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
                samplers[name] = (popen, output, log)
            meter.start()
            _, wall = await self._run_chain(steps)
            cpu = meter.stop(steps)
        finally:
            for popen, _, log in samplers.values():
                if popen.poll() is None:
                    popen.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(timeout=30)
                stop_process(popen)
                log.close()
        report: dict[str, Any] = {
            "steps": steps,
            "step_ms": wall * 1000 / steps,
            "cpu_ms_per_step": cpu,
        }
        for name, (_, output, _) in samplers.items():
            if not output.exists():
                report[name] = {"skipped": (folder / f"py-spy-{name}.log").read_text()[-500:]}
                continue
            report[name] = summarize_stacks(output)
            samples = report[name].get("samples", 0)
            report[name]["gil_ms_per_step"] = samples * 1000 / self.options.profile_rate / steps
            if self.options.profile_dir:
                target = Path(self.options.profile_dir)
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(output, target / f"{self.database.backend}-{name}.txt")
        return report


# py-spy output.

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def summarize_stacks(path: Path, top: int = 20) -> dict[str, Any]:
    """Aggregate py-spy raw stacks by thread, by component (self time) and by function.

    Percentages are of all samples of the process. With ``--gil`` py-spy samples only the
    thread that holds the GIL, so waits (epoll, locks, the database server) and C code that
    releases the GIL (sqlite3 executing a statement, psycopg waiting for PostgreSQL) do not
    count.
    """
    threads: Counter[str] = Counter()
    components: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        thread, *frames = stack.split(";")
        total += count
        threads[_thread_group(thread)] += count
        if frames:
            components[_component(frames[-1])] += count
        for key in {_function_key(frame) for frame in frames}:
            functions[key] += count
    if not total:
        return {"samples": 0}

    def shares(counter: Counter[str], limit: int | None = None) -> dict[str, float]:
        return {key: 100 * value / total for key, value in counter.most_common(limit)}

    project = Counter(
        {key: value for key, value in functions.items() if "(" in key and _is_project(key)}
    )
    return {
        "samples": total,
        "threads_pct": shares(threads),
        "components_self_pct": shares(components),
        "functions_inclusive_pct": shares(functions, top),
        "project_functions_inclusive_pct": shares(project, top),
    }


def _thread_group(thread: str) -> str:
    name = thread.split(": ", 1)[-1]
    return re.sub(r"_\d+$", "", name)


def _split_frame(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    if match is None:
        return frame, ""
    return match["function"], match["file"]


def _function_key(frame: str) -> str:
    function, file = _split_frame(frame)
    return f"{function} ({file})" if file else function


def _is_project(key: str) -> bool:
    file = key.rsplit("(", 1)[-1]
    return file.startswith(PROJECT_FILES)


def _component(frame: str) -> str:
    function, file = _split_frame(frame)
    if file.startswith("sqlalchemy/engine/default.py") and function.endswith(DRIVER_CALLS):
        return "database driver call (C)"
    for prefix, label in COMPONENTS:
        if file.startswith(prefix):
            return label
    return "other"


# Machine and report.


def machine_info(backends: list[str]) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = Path("/proc/meminfo").read_text()
    memory_kib = re.search(r"^MemTotal:\s*(\d+)", meminfo, re.MULTILINE)
    os_release = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    pretty = re.search(r'^PRETTY_NAME="?([^"\n]+)"?$', os_release, re.MULTILINE)
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model.group(1).strip() if model else platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory_kib.group(1)) / 1024**2, 1) if memory_kib else None,
        "os": f"{pretty.group(1) if pretty else platform.system()} (kernel {platform.release()})",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "load_average_at_start": os.getloadavg(),
        "zenflow_commit": _git_commit(),
    }
    if "postgresql" in backends:
        admin = create_engine(POSTGRES_ADMIN_URL)
        try:
            with admin.connect() as connection:
                settings = {
                    name: connection.execute(text(f"SHOW {name}")).scalar()
                    for name in ("server_version", "fsync", "synchronous_commit")
                }
        finally:
            admin.dispose()
        info["postgresql"] = settings
    return info


def _git_commit() -> str:
    """Return the checked-out commit, with "+changes" when tracked files differ from it."""
    git = ["git", "--no-optional-locks", "-C", str(REPO)]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        changes = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not commit:
        return "unknown"
    return f"{commit}+changes" if changes else commit


def print_report(report: dict[str, Any]) -> None:
    machine = report["machine"]
    floor = report["floor"]
    print()
    print(f"zenflow benchmark, {machine['date']}")
    print(
        f"  {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"{machine['os']}, Python {machine['python']}"
    )
    versions = (
        f"  zenflow {machine['zenflow_commit']}, RabbitMQ {floor['rabbitmq_version']}, "
        f"SQLite {machine['sqlite']}"
    )
    if "postgresql" in machine:
        versions += f", PostgreSQL {machine['postgresql']['server_version']}"
    print(versions)

    load = ", ".join(f"{value:.2f}" for value in machine["load_average_at_start"])
    print(f"  load average at start: {load}")
    if machine["load_average_at_start"][0] > (machine["cores"] or 1) / 2:
        print(
            "  warning: the load average exceeds half the cores, so other processes compete "
            "for the CPUs and every latency below is inflated"
        )

    print()
    sequential = floor["sequential"]
    print("Raw AMQP floor (aio-pika, persistent + publisher confirms, echo in another process)")
    print(
        f"  sequential round trip    mean {sequential['mean_ms']:.2f} ms   "
        f"p50 {sequential['p50_ms']:.2f} ms   p95 {sequential['p95_ms']:.2f} ms   "
        f"({sequential['count']} round trips)"
    )
    pipelined = floor["pipelined"]
    print(
        f"  pipelined throughput     {pipelined['per_second']:,.0f} round trips/s   "
        f"({pipelined['messages']} round trips, {pipelined['in_flight']} in flight)"
    )
    print(f"  CPU per round trip       {_cpu_text(floor['sequential_cpu_ms'])}")

    for backend, result in report["zenflow"].items():
        print()
        print(f"zenflow on {backend}")
        _print_sequential(result["sequential"], result["floor"])
        _print_throughput(result["throughput"])
        if result.get("profile"):
            _print_profile(result["profile"])
        if result.get("timers"):
            _print_timers(result["timers"])
    print()


def _print_sequential(sequential: dict[str, Any], floor: dict[str, Any]) -> None:
    verdict = "met" if sequential["ratio"] <= TARGET_RATIO else "NOT met"
    round_trip = floor["sequential"]
    print(
        f"  raw round trip before    mean {round_trip['mean_ms']:.2f} ms   "
        f"p50 {round_trip['p50_ms']:.2f} ms   p95 {round_trip['p95_ms']:.2f} ms"
    )
    print(
        f"  sequential step          {sequential['step_ms']:.2f} ms   "
        f"= {sequential['ratio']:.1f}x the raw round trip "
        f"(target <= {TARGET_RATIO:.0f}x: {verdict})"
    )
    per_run = ", ".join(f"{value:.2f}" for value in sequential["step_ms_per_run"])
    print(f"    wall / {sequential['steps']} per run      {per_run} ms")
    print(f"    from history             {sequential['history_step_ms']:.2f} ms per step")

    print(
        "    phases of a step, from one timestamp [source] to the next; "
        "the three add up to the step from history:"
    )
    _print_phases(sequential["phases"], PHASES)
    split = sequential["phases"]["transaction"]
    if split["count"]:
        print(f"    the first phase split by the engine's log ({split['count']} steps):")
        _print_phases(sequential["phases"], ENGINE_SUBPHASES)
    else:
        print(
            "    (the first phase is not split, because the engine logs task_completed at "
            "debug level only. --log-level debug splits it and adds the cost of debug logging)"
        )

    cpu_step = sum(sequential["cpu_ms_per_step"].values())
    cpu_floor = sum(floor["sequential_cpu_ms"].values())
    print(
        f"    CPU per step             {_cpu_text(sequential['cpu_ms_per_step'])}; "
        f"total {cpu_step:.2f} ms = {cpu_step / cpu_floor:.1f}x the raw round trip's"
    )


def _print_phases(
    phases: dict[str, dict[str, float]], definitions: tuple[tuple[str, str, str], ...]
) -> None:
    for key, boundaries, contents in definitions:
        phase = phases[key]
        if not phase["count"]:
            continue
        print(f"    {phase['mean_ms']:6.2f} ms mean {phase['p50_ms']:6.2f} ms p50   {boundaries}")
        print(f"    {'':32}{contents}")


def _print_throughput(throughput: dict[str, Any]) -> None:
    print(
        f"  throughput               {throughput['per_second']:,.0f} one-step runs/s   "
        f"= {throughput['ratio']:.3f}x the raw pipelined rate"
    )
    print(
        f"    {throughput['runs']} runs started at once: all starts confirmed after "
        f"{throughput['starts_confirmed_s']:.2f} s, last finished after "
        f"{throughput['elapsed_s']:.2f} s, {throughput['failed']} failed"
    )
    print(f"    CPU per run              {_cpu_text(throughput['cpu_ms_per_run'])}")


def _print_timers(timers: dict[str, Any]) -> None:
    lateness = timers["lateness"]
    verdict = "met" if timers["met"] else "NOT met"
    if lateness["count"]:
        print(
            f"  timer lateness           mean {lateness['mean_ms']:.1f} ms   "
            f"p50 {lateness['p50_ms']:.1f} ms   p95 {lateness['p95_ms']:.1f} ms   "
            f"max {lateness['max_ms']:.1f} ms   "
            f"(target max < {TIMER_TARGET_MS:.0f} ms: {verdict})"
        )
    else:
        print(f"  timer lateness           no timer fired (target: {verdict})")
    shortest, longest = timers["wait_s"]
    print(
        f"    {timers['runs']} runs of one timer ({shortest:.1f} to {longest:.1f} s), started "
        f"{timers['start_interval_s'] * 1000:.0f} ms apart, all finished after "
        f"{timers['elapsed_s']:.1f} s"
    )
    print(
        f"    {lateness['count']} timers fired, min lateness {lateness.get('min_ms', 0):.1f} ms; "
        f"{timers['unfired']} without a timer_fired entry, {timers['failed']} runs failed"
    )
    print(
        "    lateness = history.created_at of timer_fired (start of the firing transaction) "
        "- timers.fire_at"
    )


def _print_profile(profile: dict[str, Any]) -> None:
    if "skipped" in profile:
        print(f"  profile skipped: {profile['skipped']}")
        return
    print(
        f"  profile (py-spy, {profile['steps']}-step chain, "
        f"{profile['step_ms']:.2f} ms per step while sampled)"
    )
    for name in ("engine", "agent"):
        summary = profile.get(name, {})
        if "skipped" in summary or not summary.get("samples"):
            print(f"    {name}: no samples {summary.get('skipped', '')}")
            continue
        cpu_ms = profile["cpu_ms_per_step"].get(name, 0.0)
        print(
            f"    {name}: {cpu_ms:.2f} ms CPU per step, {summary['gil_ms_per_step']:.2f} ms "
            f"holding the GIL ({summary['samples']} samples); shares of the GIL samples, "
            "in ms of CPU:"
        )
        threads = ", ".join(f"{key} {value:.0f}%" for key, value in summary["threads_pct"].items())
        print(f"      threads: {threads}")
        for component, share in summary["components_self_pct"].items():
            print(f"      {share:5.1f}%  {cpu_ms * share / 100:5.2f} ms  {component}")
        print("      project functions, inclusive:")
        for function, share in list(summary["project_functions_inclusive_pct"].items())[:12]:
            print(f"      {share:5.1f}%  {cpu_ms * share / 100:5.2f} ms  {function}")


def _cpu_text(cpu_ms: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2f} ms" for name, value in cpu_ms.items())


# Command line.


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure zenflow's sequential step time and throughput on SQLite and "
        "PostgreSQL, as ratios to a raw aio-pika round trip with the same delivery guarantees, "
        "and how late timers fire on an idle engine.",
    )
    parser.add_argument(
        "--backend",
        choices=("sqlite", "postgresql", "both"),
        default="both",
        help="History database to measure zenflow on (default: both).",
    )
    parser.add_argument("--json", metavar="PATH", help="Also write every figure to this file.")
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=420.0,
        help="Seconds after which the benchmark stops and cleans up (default: 420).",
    )
    parser.add_argument("--echo-queue", help=argparse.SUPPRESS)

    floor = parser.add_argument_group("raw AMQP floor")
    floor.add_argument(
        "--round-trips",
        type=int,
        default=1000,
        help="Sequential raw round trips measured, after --warmup more (default: 1000).",
    )
    floor.add_argument(
        "--warmup", type=int, default=100, help="Raw round trips before measuring (default: 100)."
    )
    floor.add_argument(
        "--pipelined-messages",
        type=int,
        default=5000,
        help="Raw round trips in the pipelined measurement (default: 5000).",
    )
    floor.add_argument(
        "--window",
        type=int,
        default=1000,
        help="Raw round trips in flight in the pipelined measurement (default: 1000).",
    )

    zenflow = parser.add_argument_group("zenflow")
    zenflow.add_argument(
        "--steps", type=int, default=200, help="Steps of the sequential workflow (default: 200)."
    )
    zenflow.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="Measured runs of the sequential workflow, after one warm-up run (default: 3).",
    )
    zenflow.add_argument(
        "--runs",
        type=int,
        default=1000,
        help="One-step runs started at once for the throughput figure (default: 1000).",
    )
    zenflow.add_argument(
        "--throughput-warmup",
        type=int,
        default=50,
        help="One-step runs started and finished before the throughput figure (default: 50).",
    )
    zenflow.add_argument(
        "--timers",
        type=int,
        default=100,
        help="Runs of one timer each (1.0 to 4.9 s) for the timer lateness figure, started "
        f"{TIMER_START_INTERVAL * 1000:.0f} ms apart; 0 skips the phase (default: 100).",
    )
    zenflow.add_argument(
        "--log-level",
        default="info",
        help="ZENFLOW_LOG_LEVEL of the engine and agent (default: info, zenflow's default). "
        "debug also splits a step's first phase at the engine's task_completed log line, and "
        "adds the cost of debug logging to every step.",
    )

    profile = parser.add_argument_group("profile")
    profile.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="Sample the engine and agent with py-spy during one more sequential run: "
        f"auto does so when a step takes more than {TARGET_RATIO:.0f}x the raw round trip "
        "(default: auto).",
    )
    profile.add_argument(
        "--profile-steps",
        type=int,
        default=500,
        help="Steps of the sequential run sampled by py-spy (default: 500).",
    )
    profile.add_argument(
        "--profile-rate",
        type=int,
        default=500,
        help="py-spy samples per second (default: 500).",
    )
    profile.add_argument(
        "--profile-dir",
        metavar="PATH",
        help="Keep py-spy's raw stacks (flamegraph.pl input) in this folder.",
    )

    options = parser.parse_args(argv)
    for name in ("round_trips", "pipelined_messages", "window", "steps", "repeats", "runs"):
        if getattr(options, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more")
    if options.timers < 0:
        parser.error("--timers must be 0 or more")
    return options


def _raise_interrupt(signum: int, _frame: Any) -> None:
    # asyncio.run cancels the pending tasks on the way out and logs each error they raise
    # while their connections close. After an interrupt those reports are noise.
    logging.getLogger("asyncio").disabled = True
    raise KeyboardInterrupt(f"signal {signum}")


def _unreachable_service(backends: list[str]) -> str | None:
    """Return an error message if RabbitMQ, or PostgreSQL when measured, is not reachable."""
    if not service_answers(AMQP_URL, 5672):
        return f"RabbitMQ is not reachable at {AMQP_URL}. Start it or set ZENFLOW_TEST_AMQP_URL"
    if "postgresql" in backends and not service_answers(POSTGRES_ADMIN_URL, 5432):
        return (
            f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}. Start it, set "
            "ZENFLOW_TEST_POSTGRES_URL or pass --backend sqlite"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    options = parse_arguments(arguments)
    if options.echo_queue:
        asyncio.run(serve_echo(AMQP_URL, options.echo_queue))
        return 0

    # SIGINT and SIGTERM unwind as KeyboardInterrupt, so that the cleanup below runs. Setting
    # SIGINT also covers a shell that started the script in the background with SIGINT
    # ignored, and keeps asyncio.run from turning the first Ctrl-C into a task cancellation.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    backends = ["sqlite", "postgresql"] if options.backend == "both" else [options.backend]
    error = _unreachable_service(backends)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 3

    deadline = Deadline(options.timeout)
    report: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/bench.py", *arguments]),
        "options": {key: value for key, value in vars(options).items() if key != "echo_queue"},
        "machine": machine_info(backends),
        "zenflow": {},
    }
    try:
        with tempfile.TemporaryDirectory(prefix="zenflow-bench-") as folder:
            print("measuring the raw AMQP floor...", file=sys.stderr)
            report["floor"] = measure_floor(options, deadline, Path(folder))
            for backend in backends:
                print(f"measuring zenflow on {backend}...", file=sys.stderr)
                report["zenflow"][backend] = measure_zenflow(
                    backend, options, deadline, Path(folder), report["floor"]
                )
    except KeyboardInterrupt:
        print(
            "interrupted: the benchmark's processes, queues and databases were removed",
            file=sys.stderr,
        )
        return 130
    except TimeoutError as error:
        print(
            f"error: timed out ({str(error) or 'a wait reached the end of --timeout'}). The "
            f"benchmark's processes, queues and databases were removed. Raise --timeout "
            f"(now {options.timeout:.0f} s) or lower --runs and --steps on a slow machine",
            file=sys.stderr,
        )
        return 4

    report["machine"]["load_average_at_end"] = os.getloadavg()
    print_report(report)
    if options.json:
        Path(options.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"figures written to {options.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
