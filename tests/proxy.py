"""A TCP proxy on 127.0.0.1 that tests put between zenflow and RabbitMQ to inject faults.

The proxy listens on a free port and forwards each connection to the target, by default
RabbitMQ at 127.0.0.1:5672. A test can cut every open connection (both sides see a TCP
reset, as after a network fault) and can reject new connections for a while, in one of two
ways. Closing the listening socket makes clients get "connection refused", as when the
broker is down. Resetting each new connection at once lets the test count the attempts.

The proxy runs an asyncio loop in a daemon thread, so tests that use blocking clients can
call it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Seconds that a call from the test thread waits for the proxy's loop.
CALL_TIMEOUT = 10.0
BUFFER_BYTES = 65536


class TcpProxy:
    """Forward 127.0.0.1:``port`` to the target, and cut or reject connections on request.

    Counters: ``accepted`` connections forwarded, ``cut_count`` connections closed by
    :meth:`cut`, ``rejected`` connections reset by :meth:`reject_new` with ``reset=True``.
    """

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5672) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = _free_port()
        self.accepted = 0
        self.cut_count = 0
        self.rejected = 0
        self._resetting = False
        self._connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def amqp_url(self, user: str = "guest", password: str = "guest", vhost: str = "") -> str:
        """Return an AMQP URL that reaches the target through this proxy."""
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/{vhost}"

    # Lifecycle.

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and end the proxy's thread."""
        if not self._thread.is_alive():
            return
        self._call(self._close_listener())
        self._call(self._cut_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_TIMEOUT)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Faults.

    def cut(self) -> int:
        """Reset every open connection and return how many were open."""
        return self._call(self._cut_all())

    def reject_new(self, reset: bool = False) -> None:
        """Reject new connections until :meth:`accept_new`: stop listening, so that they
        are refused, or with ``reset`` accept each one and reset it at once."""
        if reset:
            self._resetting = True
        else:
            self._call(self._close_listener())

    def accept_new(self) -> None:
        """Forward new connections again, listening on the same port."""
        self._resetting = False
        self._call(self._listen())

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    # Inside the loop.

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(CALL_TIMEOUT)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._on_client, "127.0.0.1", self.port, reuse_address=True
            )

    async def _close_listener(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _cut_all(self) -> int:
        connections = list(self._connections)
        for connection in connections:
            connection.reset()
        self._connections.clear()
        self.cut_count += len(connections)
        return len(connections)

    async def _on_client(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        if self._resetting:
            self.rejected += 1
            _reset(client_writer)
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            _reset(client_writer)
            return
        connection = _Connection(client_writer, upstream_writer)
        self._connections.add(connection)
        self.accepted += 1
        await asyncio.gather(
            _pump(client_reader, upstream_writer),
            _pump(upstream_reader, client_writer),
        )
        connection.reset()
        self._connections.discard(connection)


class _Connection:
    """The two sockets of one forwarded connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream

    def reset(self) -> None:
        _reset(self.client)
        _reset(self.upstream)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes from ``reader`` to ``writer`` until either side closes."""
    try:
        while data := await reader.read(BUFFER_BYTES):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        _reset(writer)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a socket with a TCP reset (SO_LINGER 0), not an orderly shutdown."""
    if writer.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
