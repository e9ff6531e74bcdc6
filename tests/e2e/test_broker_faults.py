"""Broker faults: cut TCP connections, an unreachable broker, and a RabbitMQ restart.

Engines, agents and clients reach RabbitMQ through ``tests.proxy.TcpProxy``, which cuts
their connections or rejects new ones on request. The load tests check from the database
that every run completes with exactly one result per step and that the outbox empties,
which shows that RabbitMQ confirmed every task message. Each test prints what it measured
(runs, cuts, reconnects and retries seen in the logs, duplicates ignored); ``pytest -s``
shows the lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI
from tests.proxy import TcpProxy
from tests.support import (
    AMQP_URL,
    POSTGRES_ADMIN_URL,
    Cluster,
    cluster_of,
    queue_depth,
    service_answers,
    wait_until,
)
from zenflow import AsyncClient, Client, RequestRejected, TransportError, serializer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# The load: RUNS runs of the ``Steps`` workflow, each STEPS tasks that sleep STEP_SECONDS.
RUNS = 60
STEPS = 5
STEP_SECONDS = 0.01
STEPS_RESULT = sum(range(STEPS))
# Seconds allowed for the runs to finish after the last fault.
RUNS_DEADLINE = 60.0
# The delivery timeout of clients that must give up, in seconds.
SHORT_DELIVERY_TIMEOUT = 1.0
# The slack allowed beyond it: one connection attempt and the interpreter's own delays.
GIVE_UP_SLACK = 3.0
# Seconds allowed for RabbitMQ to stop or start.
RABBITMQCTL_TIMEOUT = 120.0
# The step duration of the restart test's load: long enough that the runs are still going
# when the broker stops, which takes a few seconds.
RESTART_STEP_SECONDS = 0.2


# Tests request the proxies before the cluster, so that the proxies outlive the processes.


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with TcpProxy() as proxy:
        yield proxy


@pytest.fixture
def agent_proxy() -> Iterator[TcpProxy]:
    """A second proxy, for the agent, when the test cuts the engine and the agent apart."""
    with TcpProxy() as proxy:
        yield proxy


@pytest.fixture
def cluster(tmp_path: Path, backend: str, rabbitmq: str) -> Iterator[Cluster]:
    with cluster_of(tmp_path, backend, "crashy") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client_cluster(tmp_path_factory: pytest.TempPathFactory, rabbitmq: str) -> Iterator[Cluster]:
    """An engine and an agent of the ``waits`` app, connected to RabbitMQ directly, shared
    by the client tests, whose behaviour does not depend on the database."""
    folder = tmp_path_factory.mktemp("broker-faults-clients")
    with cluster_of(folder, "sqlite", "waits") as cluster:
        cluster.start_engine()
        cluster.start_agent()
        yield cluster


# Helpers.


def count_results(cluster: Cluster) -> int:
    return int(
        cluster.database.scalar(
            "SELECT COUNT(*) FROM history WHERE kind IN ('task_completed', 'task_failed')"
        )
    )


def count_finished(cluster: Cluster) -> int:
    return int(cluster.database.scalar("SELECT COUNT(*) FROM runs WHERE status <> 'running'"))


def count_log_events(cluster: Cluster, event: str, kind: str | None = None) -> int:
    return sum(
        process.log_text().count(f'"event": "{event}"')
        for process in cluster.processes
        if kind is None or process.args[0] == kind
    )


def wait_for(cluster: Cluster, condition: Callable[[], Any], message: str) -> None:
    """Poll ``condition`` like ``wait_until``, failing with the processes' logs."""
    try:
        wait_until(condition, RUNS_DEADLINE, message=message)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{cluster.logs()}") from None


def start_runs(cluster: Cluster, count: int, seconds: float = STEP_SECONDS) -> list[str]:
    with Client(AMQP_URL, namespace=cluster.namespace) as client:
        return [client.start("Steps", STEPS, seconds) for _ in range(count)]


def wait_for_runs(cluster: Cluster, run_ids: list[str]) -> None:
    wait_for(cluster, lambda: count_finished(cluster) == len(run_ids), "every run to finish")
    wait_for(
        cluster,
        lambda: cluster.database.scalar("SELECT COUNT(*) FROM outbox") == 0,
        "the engine to empty the outbox",
    )


def assert_runs_completed_once(cluster: Cluster, run_ids: list[str]) -> None:
    database = cluster.database
    statuses = {run_id: database.run_status(run_id) for run_id in run_ids}
    assert set(statuses.values()) == {"completed"}, statuses
    for run_id in run_ids:
        encoded = database.scalar("SELECT result FROM runs WHERE id = :id", id=run_id)
        assert serializer.decode(bytes(encoded)) == STEPS_RESULT, run_id
    one_each = {step: 1 for step in range(1, STEPS + 1)}
    for run_id in run_ids:
        assert database.results_per_step(run_id) == one_each, run_id


def assert_no_error_logged(cluster: Cluster) -> None:
    for process in cluster.processes:
        errors = [line for line in process.log_text().splitlines() if '"level": "error"' in line]
        assert errors == [], f"{process.log_path.name}:\n" + "\n".join(errors)


def report(cluster: Cluster, title: str, began: float, **figures: object) -> None:
    """Print one line of figures for the test report (shown with ``pytest -s``)."""
    figures["reconnects_in_logs"] = count_log_events(cluster, "amqp_reconnected")
    figures["task_publishes_retried"] = count_log_events(cluster, "publish_retried", "engine")
    figures["result_publishes_retried"] = count_log_events(cluster, "result_publish_retried")
    figures["redeliveries_skipped"] = count_log_events(cluster, "redelivered_task_skipped")
    figures["duplicates_ignored"] = count_log_events(cluster, "duplicate_result_ignored")
    figures["seconds"] = round(time.monotonic() - began, 1)
    line = ", ".join(f"{name}={value}" for name, value in figures.items())
    print(f"\n[{cluster.database.backend}] {title}: {line}")


class Background:
    """Run a blocking call in a thread; ``result()`` returns its value or raises its error."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function: Callable[[], Any]) -> None:
        try:
            self._value = function()
        except BaseException as error:
            self._error = error

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float = RUNS_DEADLINE) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the call did not return within {timeout} s"
        if self._error is not None:
            raise self._error
        return self._value


def client_call(kind: str, url: str, namespace: str, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call a method of a new Client (``kind`` "sync") or AsyncClient ("async") and close it.

    ``delivery_timeout`` in ``kwargs`` goes to the client, the rest to the method.
    """
    options = {"delivery_timeout": kwargs.pop("delivery_timeout", None)}
    if kind == "sync":
        with Client(url, namespace=namespace, **options) as client:
            return getattr(client, method)(*args, **kwargs)

    async def call() -> Any:
        client = AsyncClient(url, namespace=namespace, **options)
        try:
            return await getattr(client, method)(*args, **kwargs)
        finally:
            await client.close()

    return asyncio.run(call())


# Engine and agent connections cut under load.


def test_cut_every_connection_under_load(proxy: TcpProxy, cluster: Cluster) -> None:
    began = time.monotonic()
    cluster.amqp_url = proxy.amqp_url()
    cluster.start_engine()
    cluster.start_agent()
    run_ids = start_runs(cluster, RUNS)
    total = RUNS * STEPS
    results_at_cuts = []

    for share in (0.2, 0.45, 0.7):
        wait_for(
            cluster,
            lambda share=share: count_results(cluster) >= total * share,
            f"{share:.0%} of the step results",
        )
        assert proxy.cut() >= 2, "the engine or the agent had no open connection"
        results_at_cuts.append(count_results(cluster))
    assert count_finished(cluster) < len(run_ids), "every run had finished before the last cut"
    wait_for_runs(cluster, run_ids)

    assert_runs_completed_once(cluster, run_ids)
    # The engine and the agent each reconnected after each cut.
    assert count_log_events(cluster, "amqp_reconnected", "engine") >= 3
    assert count_log_events(cluster, "amqp_reconnected", "agent") >= 3
    assert_no_error_logged(cluster)
    report(
        cluster,
        "every connection cut 3 times",
        began,
        runs=len(run_ids),
        cuts=proxy.cut_count,
        results_at_cuts=results_at_cuts,
    )


@pytest.mark.parametrize("side", ["engine", "agent"])
def test_cut_one_side_under_load(
    proxy: TcpProxy, agent_proxy: TcpProxy, cluster: Cluster, side: str
) -> None:
    began = time.monotonic()
    cluster.amqp_url = proxy.amqp_url()
    cluster.start_engine()
    cluster.amqp_url = agent_proxy.amqp_url()
    cluster.start_agent()
    cut_proxy = proxy if side == "engine" else agent_proxy
    run_ids = start_runs(cluster, RUNS)

    for share in (0.25, 0.6):
        wait_for(
            cluster,
            lambda share=share: count_results(cluster) >= RUNS * STEPS * share,
            f"{share:.0%} of the step results",
        )
        assert cut_proxy.cut() >= 1, f"the {side} had no open connection"
    assert count_finished(cluster) < len(run_ids), "every run had finished before the cut"
    wait_for_runs(cluster, run_ids)

    assert_runs_completed_once(cluster, run_ids)
    assert count_log_events(cluster, "amqp_reconnected", side) >= 2
    other = "agent" if side == "engine" else "engine"
    assert count_log_events(cluster, "amqp_connection_lost", other) == 0
    assert_no_error_logged(cluster)
    report(cluster, f"{side} connection cut twice", began, runs=len(run_ids), cuts=2)


# Clients during an outage.


class StartsAroundFault:
    """In a thread and with one client: start a run, wait until the test has injected its
    fault, then run ``plus_one(41)`` and return both run ids and the result."""

    def __init__(self, kind: str, url: str, namespace: str) -> None:
        self.kind = kind
        self.url = url
        self.namespace = namespace
        self.first_started = threading.Event()
        self.fault_injected = threading.Event()
        self.call = Background(self._run)

    def _run(self) -> tuple[str, Any]:
        if self.kind == "async":
            return asyncio.run(self._run_async())
        with Client(self.url, namespace=self.namespace, delivery_timeout=30) as client:
            first = client.start("WaitsForEvent", "Never", 60)
            self.first_started.set()
            self.fault_injected.wait(RUNS_DEADLINE)
            return first, client.run("plus_one", 41)

    async def _run_async(self) -> tuple[str, Any]:
        client = AsyncClient(self.url, namespace=self.namespace, delivery_timeout=30)
        try:
            first = await client.start("WaitsForEvent", "Never", 60)
            self.first_started.set()
            await asyncio.to_thread(self.fault_injected.wait, RUNS_DEADLINE)
            return first, await client.run("plus_one", 41)
        finally:
            await client.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_client_start_waits_for_broker(proxy: TcpProxy, client_cluster: Cluster, kind: str) -> None:
    began = time.monotonic()
    cluster = client_cluster
    starts = StartsAroundFault(kind, proxy.amqp_url(), cluster.namespace)
    assert starts.first_started.wait(20), "the first start did not return"

    assert proxy.cut() == 1
    proxy.reject_new(reset=True)
    starts.fault_injected.set()
    wait_until(lambda: proxy.rejected >= 2, 20, message="2 rejected connection attempts")
    assert not starts.call.done, "the start returned while the broker was unreachable"
    proxy.accept_new()
    first, result = starts.call.result()

    assert result == 42
    assert cluster.database.run_status(first) == "running"
    print(
        f"\n[{kind} client] start during an outage: cuts=1, rejected_attempts={proxy.rejected}, "
        f"seconds={round(time.monotonic() - began, 1)}"
    )


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("method", ["start", "send_event"])
def test_client_gives_up_after_delivery_timeout(proxy: TcpProxy, kind: str, method: str) -> None:
    proxy.reject_new()
    url = proxy.amqp_url(password="secretpw")
    args = ("Steps", 1) if method == "start" else ("some-run", "Go")
    began = time.monotonic()
    with pytest.raises(TransportError) as failure:
        client_call(
            kind, url, "zt-unreachable", method, *args, delivery_timeout=SHORT_DELIVERY_TIMEOUT
        )
    seconds = time.monotonic() - began

    message = str(failure.value)
    assert SHORT_DELIVERY_TIMEOUT <= seconds < SHORT_DELIVERY_TIMEOUT + GIVE_UP_SLACK
    assert f"amqp://guest:***@127.0.0.1:{proxy.port}/" in message
    assert "secretpw" not in message
    assert "delivery_timeout" in message
    assert "Check that the broker is running" in message
    print(f"\n[{kind} client] {method} gave up after {seconds:.2f} s: {message}")


def test_client_rejects_invalid_delivery_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    from zenflow import ConfigurationError

    with pytest.raises(ConfigurationError, match="invalid delivery_timeout -1"):
        Client(AMQP_URL, delivery_timeout=-1)
    with pytest.raises(ConfigurationError, match="invalid delivery_timeout -1"):
        AsyncClient(AMQP_URL, delivery_timeout=-1)
    monkeypatch.setenv("ZENFLOW_DELIVERY_TIMEOUT", "soon")
    with pytest.raises(ConfigurationError, match="invalid ZENFLOW_DELIVERY_TIMEOUT"):
        Client(AMQP_URL)
    monkeypatch.setenv("ZENFLOW_DELIVERY_TIMEOUT", "2.5")
    assert Client(AMQP_URL)._delivery_timeout == 2.5
    assert Client(AMQP_URL, delivery_timeout=0)._delivery_timeout == 0


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_client_connection_cut_before_reply(
    proxy: TcpProxy, client_cluster: Cluster, kind: str
) -> None:
    """A confirmed request whose reply the cut lost: the client sends an event again, which
    the engine applies once. A kill, which the engine does not deduplicate, is not sent
    again: the client raises TransportError, and the engine applies the first copy."""
    cluster = client_cluster
    namespace = cluster.namespace
    waiting, killed = (
        client_call(kind, AMQP_URL, namespace, "start", "WaitsForEvent", "Go") for _ in range(2)
    )
    for run_id in (waiting, killed):
        wait_until(lambda run_id=run_id: cluster.database.run_status(run_id) == "running", 20)

    # With the engine stopped, the requests wait in their queue and no reply comes.
    stop_engine(cluster)
    try:
        url = proxy.amqp_url()
        event = Background(
            lambda: client_call(kind, url, namespace, "send_event", waiting, "Go", {"n": 1})
        )
        kill = Background(lambda: client_call(kind, url, namespace, "kill", killed))
        wait_until(
            lambda: queue_depth(namespace, "engine.requests") == 2,
            20,
            message="the event and kill requests in the requests queue",
        )
        assert proxy.cut() == 2
    finally:
        cluster.start_engine()

    assert event.result()["run_id"] == waiting
    assert client_call("sync", AMQP_URL, namespace, "wait", waiting, timeout=20) == {
        "timed_out": False,
        "name": "Go",
        "data": {"n": 1},
    }
    received = cluster.database.scalar(
        "SELECT COUNT(*) FROM history WHERE run_id = :id AND kind = 'event_received'", id=waiting
    )
    assert received == 1

    with pytest.raises(TransportError, match="read the run's state with get_run"):
        kill.result()
    wait_until(lambda: cluster.database.run_status(killed) == "killed", 20)
    with pytest.raises(RequestRejected, match="it is killed"):
        client_call("sync", AMQP_URL, namespace, "kill", killed)
    duplicates = count_log_events(cluster, "event_duplicate_ignored", "engine")
    print(f"\n[{kind} client] requests across a cut: duplicate_events_ignored={duplicates}")


def stop_engine(cluster: Cluster) -> None:
    engine = next(process for process in cluster.processes if process.args[0] == "engine")
    assert engine.stop() == 0, engine.log_text()[-3000:]
    cluster.processes.remove(engine)


# RabbitMQ restart.


def rabbitmqctl(*args: str) -> None:
    subprocess.run(
        ["rabbitmqctl", *args], check=True, capture_output=True, timeout=RABBITMQCTL_TIMEOUT
    )


def require_rabbitmqctl() -> None:
    if shutil.which("rabbitmqctl") is not None:
        return
    if IN_CI:
        pytest.fail("rabbitmqctl is not installed (required in CI)")
    pytest.skip("rabbitmqctl is not installed")


def available_backends() -> list[str]:
    if service_answers(POSTGRES_ADMIN_URL, 5432) or IN_CI:
        return ["sqlite", "postgresql"]
    return ["sqlite"]


@pytest.mark.serial
def test_rabbitmq_restart_under_load(tmp_path: Path, rabbitmq: str) -> None:
    """One restart for both databases at once: each restart disturbs every other user of
    the broker, and the database plays no part in reconnecting."""
    require_rabbitmqctl()
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        clusters = []
        for backend in available_backends():
            folder = tmp_path / backend
            folder.mkdir()
            cluster = stack.enter_context(cluster_of(folder, backend, "crashy"))
            cluster.start_engine()
            cluster.start_agent()
            clusters.append(cluster)
        run_ids = {
            cluster.namespace: start_runs(cluster, RUNS, RESTART_STEP_SECONDS)
            for cluster in clusters
        }
        for cluster in clusters:
            wait_for(cluster, lambda c=cluster: count_results(c) >= RUNS, "the first results")

        dispatches = []
        stopping = time.monotonic()
        try:
            rabbitmqctl("stop_app")
            for cluster in clusters:
                finished = count_finished(cluster)
                assert finished < RUNS, f"every run had finished before the restart: {finished}"
                dispatches.append(
                    Background(
                        lambda c=cluster: client_call(
                            "sync",
                            AMQP_URL,
                            c.namespace,
                            "start",
                            "Steps",
                            STEPS,
                            0.0,
                            delivery_timeout=RABBITMQCTL_TIMEOUT,
                        )
                    )
                )
            assert not any(dispatch.done for dispatch in dispatches)
        finally:
            rabbitmqctl("start_app")
            rabbitmqctl("await_startup")
        outage_seconds = round(time.monotonic() - stopping, 1)

        for cluster, dispatch in zip(clusters, dispatches, strict=True):
            run_ids[cluster.namespace].append(dispatch.result())
        for cluster in clusters:
            ids = run_ids[cluster.namespace]
            wait_for_runs(cluster, ids)
            assert_runs_completed_once(cluster, ids)
            assert count_log_events(cluster, "amqp_reconnected", "engine") >= 1
            assert count_log_events(cluster, "amqp_reconnected", "agent") >= 1
            assert_no_error_logged(cluster)
            report(
                cluster,
                "RabbitMQ restart",
                began,
                runs=len(ids),
                started_during_outage=1,
                outage_seconds=outage_seconds,
            )
