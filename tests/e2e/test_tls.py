"""amqps:// URLs with TLS options, for the engine, the agent and both clients.

The test broker has no TLS port, and the tests leave its configuration alone. Instead, a
TLS-terminating proxy on 127.0.0.1 forwards to its plain port. The proxy presents a server
certificate for ``zenflow-broker.test`` signed by a test authority, and requires a client
certificate signed by the same authority. ``openssl`` makes the certificates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

from tests.support import (
    AMQP_URL,
    APPS,
    REPO,
    ZENFLOW,
    Cluster,
    Database,
    delete_namespace,
    new_namespace,
    result_of,
    start,
)
from zenflow import AsyncClient, Client
from zenflow.errors import ConfigurationError, TransportError

pytestmark = pytest.mark.e2e

SERVER_NAME = "zenflow-broker.test"


@dataclasses.dataclass(frozen=True)
class Certificates:
    folder: Path

    def path(self, name: str) -> str:
        return str(self.folder / name)


def openssl(folder: Path, *args: str) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=folder, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def make_authority(folder: Path, name: str) -> None:
    openssl(
        folder,
        "req",
        "-x509",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN=zenflow test {name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )


def make_leaf(folder: Path, name: str, authority: str, extensions: str) -> None:
    """Make the key ``<name>.key`` and the certificate ``<name>.pem`` signed by ``authority``."""
    (folder / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectKeyIdentifier=hash\n" + extensions
    )
    openssl(
        folder,
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
    )
    openssl(
        folder,
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{authority}.pem",
        "-CAkey",
        f"{authority}.key",
        "-set_serial",
        f"0x{secrets.token_hex(8)}",
        "-days",
        "2",
        "-out",
        f"{name}.pem",
        "-extfile",
        f"{name}.ext",
    )


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """ca.pem signs server.pem (for zenflow-broker.test) and client.pem; other-ca.pem is an
    unrelated authority."""
    folder = tmp_path_factory.mktemp("tls")
    make_authority(folder, "ca")
    make_authority(folder, "other-ca")
    make_leaf(
        folder, "server", "ca", f"subjectAltName=DNS:{SERVER_NAME}\nextendedKeyUsage=serverAuth\n"
    )
    make_leaf(folder, "client", "ca", "extendedKeyUsage=clientAuth\n")
    return Certificates(folder)


class TlsProxy:
    """A TLS-terminating proxy on 127.0.0.1 that forwards each connection to the broker.

    It runs its own event loop in a thread. ``handshakes`` counts the connections whose TLS
    handshake succeeded, and ``failures`` keeps the errors of those whose handshake failed.
    """

    def __init__(self, context: ssl.SSLContext, target: tuple[str, int]) -> None:
        self.context = context
        self.target = target
        self.handshakes = 0
        self.failures: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tls-proxy", daemon=True)
        self._tasks: set[asyncio.Task[Any]] = set()

    def __enter__(self) -> TlsProxy:
        self._thread.start()
        assert self._started.wait(10), "the TLS proxy did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.set_exception_handler(self._on_loop_error)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    def _stop(self) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        self._loop.call_later(0.1, self._loop.stop)

    def _on_loop_error(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # asyncio reports failed handshakes here, not to the connection handler.
        self.failures.append(str(context.get("exception") or context.get("message")))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            self._tasks.discard(task)
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@pytest.fixture(scope="module")
def proxy(certificates: Certificates, rabbitmq: str) -> Iterator[TlsProxy]:
    context = ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH, cafile=certificates.path("ca.pem")
    )
    context.load_cert_chain(certificates.path("server.pem"), certificates.path("server.key"))
    context.verify_mode = ssl.CERT_REQUIRED
    broker = urlsplit(rabbitmq)
    with TlsProxy(context, (broker.hostname or "127.0.0.1", broker.port or 5672)) as running:
        yield running


def amqps_url(proxy: TlsProxy, certificates: Certificates, **changes: str | None) -> str:
    """The amqps:// URL of the proxy, with the test broker's user and TLS parameters.

    ``changes`` replaces parameters; a None value leaves one out.
    """
    broker = urlsplit(AMQP_URL)
    user = broker.netloc.rsplit("@", 1)[0]
    parameters: dict[str, str | None] = {
        "cafile": certificates.path("ca.pem"),
        "certfile": certificates.path("client.pem"),
        "keyfile": certificates.path("client.key"),
        "server_name": SERVER_NAME,
    }
    parameters.update(changes)
    query = urlencode({key: value for key, value in parameters.items() if value is not None})
    return f"amqps://{user}@127.0.0.1:{proxy.port}{broker.path or '/'}?{query}"


class TlsCluster(Cluster):
    """A cluster whose processes and clients connect through the TLS proxy."""

    def __init__(self, folder: Path, database: Database, app: str, amqp_url: str) -> None:
        super().__init__(folder, database, app)
        self.amqp_url = amqp_url

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env["ZENFLOW_AMQP_URL"] = self.amqp_url
        return env

    def client(self) -> Client:
        return Client(self.amqp_url, namespace=self.namespace)


@pytest.fixture(scope="module")
def tls_cluster(
    proxy: TlsProxy, certificates: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsCluster]:
    folder = tmp_path_factory.mktemp("tls-cluster")
    database = Database("sqlite", folder)
    cluster = TlsCluster(folder, database, "fuzz", amqps_url(proxy, certificates))
    try:
        cluster.migrate()
        cluster.start_engine()
        cluster.start_agent()
        yield cluster
    finally:
        cluster.stop()
        delete_namespace(cluster.namespace)
        database.drop()


def test_workflow_runs_over_tls(tls_cluster: TlsCluster, proxy: TlsProxy) -> None:
    handshakes = proxy.handshakes

    run_id = start(tls_cluster, "Pipeline", 21)
    result = result_of(tls_cluster, run_id)

    async def run_async() -> Any:
        async with AsyncClient(tls_cluster.amqp_url, namespace=tls_cluster.namespace) as client:
            return await client.run("Pipeline", "ab", timeout=30)

    async_result = asyncio.run(run_async())

    assert result == [42, 42]
    assert async_result == ["abab", "abab"]
    # The engine and the agent connected before; start, result_of and AsyncClient now.
    assert proxy.handshakes >= handshakes + 3
    for process in tls_cluster.processes:
        assert "amqps://" not in process.log_text() or "***" in process.log_text()


def test_cli_start_over_tls(tls_cluster: TlsCluster) -> None:
    finished = tls_cluster.zenflow("start", "Pipeline", "[5]", "--wait", "--timeout", "30")

    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.splitlines()[1] == "[10, 10]"


# Failures.


def connect_blocking(url: str, namespace: str) -> None:
    with Client(url, namespace=namespace, connect_timeout=5) as client:
        client.start("Pipeline", 1)


def connect_async(url: str, namespace: str) -> None:
    async def connect() -> None:
        async with AsyncClient(url, namespace=namespace, connect_timeout=5) as client:
            await client.start("Pipeline", 1)

    asyncio.run(connect())


CONNECT = {"Client": connect_blocking, "AsyncClient": connect_async}


@pytest.fixture
def namespace() -> Iterator[str]:
    name = new_namespace()
    try:
        yield name
    finally:
        delete_namespace(name)


@pytest.mark.parametrize("client", CONNECT)
def test_wrong_authority_fails_clearly(
    client: str, proxy: TlsProxy, certificates: Certificates, namespace: str
) -> None:
    url = amqps_url(proxy, certificates, cafile=certificates.path("other-ca.pem"))

    with pytest.raises(TransportError) as failure:
        CONNECT[client](url, namespace)

    message = str(failure.value)
    assert f"cannot connect to RabbitMQ at amqps://guest:***@127.0.0.1:{proxy.port}/" in message
    assert "certificate verify failed" in message
    assert "check that the URL's cafile parameter names the authority" in message


@pytest.mark.parametrize("client", CONNECT)
def test_other_server_name_fails_clearly(
    client: str, proxy: TlsProxy, certificates: Certificates, namespace: str
) -> None:
    """Without server_name, the certificate must name the URL's host, 127.0.0.1."""
    url = amqps_url(proxy, certificates, server_name=None)

    with pytest.raises(TransportError) as failure:
        CONNECT[client](url, namespace)

    message = str(failure.value)
    assert "certificate verify failed" in message
    assert "IP address mismatch" in message
    assert "server_name" in message


@pytest.mark.parametrize("client", CONNECT)
def test_verify_false_accepts_any_certificate(
    client: str, proxy: TlsProxy, certificates: Certificates, namespace: str
) -> None:
    url = amqps_url(proxy, certificates, cafile=certificates.path("other-ca.pem"), server_name=None)

    CONNECT[client](url + "&verify=false", namespace)


@pytest.mark.parametrize("client", CONNECT)
def test_missing_client_certificate_rejected(
    client: str, proxy: TlsProxy, certificates: Certificates, namespace: str
) -> None:
    url = amqps_url(proxy, certificates, certfile=None, keyfile=None)

    with pytest.raises(TransportError) as failure:
        CONNECT[client](url, namespace)

    message = str(failure.value)
    assert f"amqps://guest:***@127.0.0.1:{proxy.port}/" in message
    assert "give the certfile and keyfile parameters" in message


@pytest.mark.parametrize("client", CONNECT)
def test_unreadable_authority_file_named(
    client: str, proxy: TlsProxy, certificates: Certificates, namespace: str
) -> None:
    missing = certificates.path("missing-ca.pem")
    url = amqps_url(proxy, certificates, cafile=missing)

    with pytest.raises(ConfigurationError) as failure:
        CONNECT[client](url, namespace)

    assert f"cannot load the TLS cafile {missing!r}" in str(failure.value)


@pytest.mark.parametrize("command", [["agent", "--app", "fuzz"], ["start", "Pipeline"]])
def test_processes_report_wrong_authority(
    command: list[str], proxy: TlsProxy, certificates: Certificates, tmp_path: Path
) -> None:
    env = dict(os.environ)
    env["ZENFLOW_AMQP_URL"] = amqps_url(
        proxy, certificates, cafile=certificates.path("other-ca.pem")
    )
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(REPO), os.environ.get("PYTHONPATH", "")])

    finished = subprocess.run(
        [ZENFLOW, *command], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )

    assert finished.returncode == 3, finished.stderr
    assert "certificate verify failed" in finished.stderr
    assert "cafile" in finished.stderr
