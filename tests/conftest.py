"""Shared fixtures: real RabbitMQ and PostgreSQL, skipped locally when absent, failing in CI."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import AMQP_URL, POSTGRES_ADMIN_URL, Cluster, cluster_of, service_answers

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_service(name: str, url: str, port: int) -> None:
    if service_answers(url, port):
        return
    message = f"{name} does not answer at {url}"
    if IN_CI:
        pytest.fail(message + " (required in CI)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def rabbitmq() -> str:
    require_service("RabbitMQ", AMQP_URL, 5672)
    return AMQP_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql":
        require_service("PostgreSQL", POSTGRES_ADMIN_URL, 5432)
    return str(request.param)


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "sqlite-replay"])
def flows_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, rabbitmq: str
) -> Iterator[Cluster]:
    """An engine and an agent running the ``flows`` test app, one set per database.

    ``sqlite-replay`` runs the engine without a generator cache, so every step of every run
    is a replay of its history.
    """
    backend, _, variant = str(request.param).partition("-")
    if backend == "postgresql":
        require_service("PostgreSQL", POSTGRES_ADMIN_URL, 5432)
    folder: Path = tmp_path_factory.mktemp(f"flows-{request.param}")
    with cluster_of(folder, backend, "flows") as cluster:
        cluster.start_engine(*(["--cache-size", "0"] if variant == "replay" else []))
        cluster.start_agent()
        yield cluster


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def waits_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, rabbitmq: str
) -> Iterator[Cluster]:
    """An engine and an agent running the ``waits`` test app, one set per database.

    The agent runs 8 tasks at a time, so that the parallel steps of the app run at once.
    """
    backend = str(request.param)
    if backend == "postgresql":
        require_service("PostgreSQL", POSTGRES_ADMIN_URL, 5432)
    folder: Path = tmp_path_factory.mktemp(f"waits-{backend}")
    with cluster_of(folder, backend, "waits") as cluster:
        cluster.start_engine()
        cluster.start_agent("--concurrency", "8")
        yield cluster


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def waits_replay_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, rabbitmq: str
) -> Iterator[Cluster]:
    """Like ``waits_cluster``, with an engine without a generator cache, so that every step
    of every run is a replay of its history."""
    backend = str(request.param)
    if backend == "postgresql":
        require_service("PostgreSQL", POSTGRES_ADMIN_URL, 5432)
    folder: Path = tmp_path_factory.mktemp(f"waits-replay-{backend}")
    with cluster_of(folder, backend, "waits") as cluster:
        cluster.start_engine("--cache-size", "0")
        cluster.start_agent("--concurrency", "8")
        yield cluster
