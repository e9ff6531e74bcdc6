"""The asyncio client, built on aio-pika, for async services.

Use it as ``async with AsyncClient() as client: run_id = await client.start(...)``. One
client can be shared by many tasks of the same event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from zenflow import _aio, _tls, protocol, serializer
from zenflow._client_common import (
    DEFAULT_REPLY_TIMEOUT,
    FINISHED_STATUSES,
    PENDING,
    RETRY_DELAY_FIRST,
    RETRY_DELAY_MAX,
    START_GRACE,
    WorkflowRef,
    build_control,
    build_event,
    build_start,
    delivery_failed,
    delivery_timeout_setting,
    login_rejected,
    lookup_request,
    never_created,
    read_reply,
    reply_lost,
    run_outcome,
    start_timeout,
    tls_failure,
    wait_timed_out,
)
from zenflow.config import Settings
from zenflow.errors import RunNotFound, RunTimeout

# Connection errors that another attempt cannot fix.
_LOGIN_ERRORS = (
    aiormq.exceptions.ProbableAuthenticationError,
    aiormq.exceptions.AuthenticationError,
)


class AsyncClient:
    """Start runs and read their state over RabbitMQ from asyncio code.

    Parameters are those of :class:`zenflow.Client`. The connection is robust: after a
    lost connection it reconnects in the background, and a request made meanwhile waits
    for it, up to ``delivery_timeout`` seconds.
    """

    def __init__(
        self,
        amqp_url: str | None = None,
        *,
        namespace: str | None = None,
        connect_timeout: float = 10.0,
        delivery_timeout: float | None = None,
    ) -> None:
        self.settings = Settings.load(amqp_url=amqp_url, namespace=namespace)
        self.topology = protocol.Topology(self.settings.namespace)
        self._connect_timeout = connect_timeout
        self._delivery_timeout = delivery_timeout_setting(delivery_timeout)
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._runs_exchange: aio_pika.abc.AbstractExchange | None = None
        self._reply_queue: aio_pika.abc.AbstractQueue | None = None
        self._replies: dict[str, asyncio.Future[bytes]] = {}
        self._finished: dict[str, asyncio.Future[bytes]] = {}
        self._lock = asyncio.Lock()
        # Set, and replaced by a new event, at each reconnect.
        self._reconnected = asyncio.Event()

    async def connect(self) -> None:
        """Open the connection now instead of at the first request."""
        await self._ensure_connected(self._delivery_deadline())

    def _delivery_deadline(self) -> float:
        return time.monotonic() + self._delivery_timeout

    async def _ensure_connected(self, deadline: float) -> aio_pika.abc.AbstractChannel:
        """Return the channel once it is open, connecting or waiting for a reconnect.

        Raises:
            TransportError: the channel is not open by ``deadline``.
        """
        async with self._lock:
            if self._connection is None:
                await self._open(deadline)
        channel = self._channel
        assert channel is not None
        if channel.is_closed and not await _aio.wait_until_ready(channel, deadline):
            raise delivery_failed(
                self.settings.amqp_url,
                self._delivery_timeout,
                "the connection was lost and is not restored yet",
                connected=False,
                publishing=False,
            )
        return channel

    async def _open(self, deadline: float) -> None:
        """Connect and declare the entry and the reply queue, retrying until ``deadline``."""
        delay = RETRY_DELAY_FIRST
        # The first connection attempt gets the full connect_timeout, later ones what is
        # left of the delivery timeout.
        timeout = self._connect_timeout
        address = _tls.parse(self.settings.amqp_url)
        context = None if address.tls is None else address.tls.context()
        first = True
        while True:
            connection: aio_pika.abc.AbstractRobustConnection | None = None
            try:
                connection = await _aio.connect_robust(
                    address.url, name="zenflow async client", timeout=timeout, ssl_context=context
                )
                await self._set_up(connection)
                self._connection = connection
                connection.reconnect_callbacks.add(self._on_reconnect)
                return
            except _LOGIN_ERRORS as error:
                raise login_rejected(self.settings.amqp_url, _aio.describe(error)) from None
            except _aio.CONNECTION_ERRORS as error:
                if connection is not None:
                    with contextlib.suppress(*_aio.CONNECTION_ERRORS):
                        await connection.close()
                failure = tls_failure(self.settings.amqp_url, error, _aio.describe(error))
                if first and connection is None and failure is not None:
                    raise failure from None
                first = False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise delivery_failed(
                        self.settings.amqp_url,
                        self._delivery_timeout,
                        _aio.describe(error),
                        connected=connection is not None,
                        publishing=False,
                    ) from None
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, RETRY_DELAY_MAX)
            timeout = max(0.1, min(self._connect_timeout, deadline - time.monotonic()))

    async def _set_up(self, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        declared = await _aio.declare_entry(channel, self.topology)
        self._exchange = declared["engine_exchange"]
        self._runs_exchange = declared["runs_exchange"]
        # A robust queue gets a client-made name, so it keeps its name, bindings and
        # consumer when the connection comes back.
        self._reply_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await self._reply_queue.consume(self._on_message, no_ack=True)
        self._channel = channel

    def _on_reconnect(self, _connection: Any) -> None:
        event, self._reconnected = self._reconnected, asyncio.Event()
        event.set()

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            await connection.close()

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if message.type == "run_finished":
            try:
                run_id = str(serializer.decode(message.body).get("run_id"))
            except Exception:
                return
            waiter = self._finished.get(run_id)
        else:
            waiter = self._replies.get(message.correlation_id or "")
        if waiter is not None and not waiter.done():
            waiter.set_result(message.body)

    async def start(
        self,
        workflow: WorkflowRef,
        *args: Any,
        business_id: str | None = None,
        if_running: str = "reject",
        reply_timeout: float | None = None,
        **kwargs: Any,
    ) -> str:
        """Start a run and return its run id; see :meth:`zenflow.Client.start`."""
        request, body = build_start(workflow, args, kwargs, business_id, if_running)
        assert request.run_id is not None
        properties: dict[str, Any] = {
            "delivery_mode": aio_pika.DeliveryMode.PERSISTENT,
            "message_id": request.run_id,
        }
        timeout = start_timeout(request, reply_timeout)
        if timeout is None:
            await self._publish(body, properties)
            return request.run_id
        try:
            reply = await self._call(body, timeout, properties)
        except RunTimeout as error:
            raise RunTimeout(str(error), run_id=request.run_id) from None
        return str(reply.get("run_id") or request.run_id)

    async def send_event(
        self, run: str, name: str, data: Any = None, *, timeout: float = DEFAULT_REPLY_TIMEOUT
    ) -> dict[str, Any]:
        """Send an event to a run; see :meth:`zenflow.Client.send_event`."""
        return await self._call(build_event(run, name, data), timeout, _persistent())

    async def kill(
        self,
        run: str,
        *,
        reason: str | None = None,
        by: str | None = None,
        timeout: float = DEFAULT_REPLY_TIMEOUT,
    ) -> dict[str, Any]:
        """Kill a run; see :meth:`zenflow.Client.kill`."""
        body = build_control("kill", run, by, reason)
        return await self._call(body, timeout, _persistent(), resend=False)

    async def pause(
        self, run: str, *, by: str | None = None, timeout: float = DEFAULT_REPLY_TIMEOUT
    ) -> dict[str, Any]:
        """Pause a run; see :meth:`zenflow.Client.pause`."""
        body = build_control("pause", run, by, None)
        return await self._call(body, timeout, _persistent(), resend=False)

    async def resume(
        self, run: str, *, by: str | None = None, timeout: float = DEFAULT_REPLY_TIMEOUT
    ) -> dict[str, Any]:
        """Resume a paused run; see :meth:`zenflow.Client.resume`."""
        body = build_control("resume", run, by, None)
        return await self._call(body, timeout, _persistent(), resend=False)

    async def retry(
        self, run: str, *, by: str | None = None, timeout: float = DEFAULT_REPLY_TIMEOUT
    ) -> dict[str, Any]:
        """Run a failed run again from where it failed; see :meth:`zenflow.Client.retry`."""
        body = build_control("retry", run, by, None)
        return await self._call(body, timeout, _persistent(), resend=False)

    async def get_run(
        self, run_id: str | None = None, *, business_id: str | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Return the state of a run; see :meth:`zenflow.Client.get_run`."""
        request = protocol.GetRunRequest(run_id=run_id, business_id=business_id)
        reply = await self._call(serializer.encode(request.to_body()), timeout)
        run: dict[str, Any] = reply["run"]
        return run

    async def wait(self, run_id: str, timeout: float | None = None) -> Any:
        """Wait until the run finishes and return its result; see :meth:`zenflow.Client.wait`."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        remaining = 30.0 if deadline is None else max(0.1, deadline - loop.time())
        run_id = await self._run_id_of(run_id, remaining)
        await self._ensure_connected(self._delivery_deadline())
        assert self._reply_queue is not None and self._runs_exchange is not None
        binding = self.topology.run_finished_binding(run_id)
        finished: asyncio.Future[bytes] = loop.create_future()
        self._finished[run_id] = finished
        poll_interval = 1.0
        first_poll = loop.time()
        try:
            await self._bind_reply_queue(binding)
            while True:
                remaining = 30.0 if deadline is None else max(0.1, deadline - loop.time())
                try:
                    run = await self.get_run(run_id, timeout=remaining)
                except RunNotFound:
                    # The query can overtake a start that the engine is still handling.
                    if loop.time() - first_poll > START_GRACE:
                        raise never_created(run_id) from None
                    run = {"run_id": run_id, "status": PENDING}
                if run["status"] in FINISHED_STATUSES:
                    return run_outcome(run)
                wait_for = (
                    poll_interval
                    if deadline is None
                    else min(poll_interval, max(0.0, deadline - loop.time()))
                )
                poll_interval = min(poll_interval * 2, 5.0)
                try:
                    body = await asyncio.wait_for(asyncio.shield(finished), wait_for)
                except TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        raise wait_timed_out(run_id, timeout, run["status"]) from None
                    continue
                return run_outcome(serializer.decode(body))
        finally:
            self._finished.pop(run_id, None)
            if self._channel is not None and not self._channel.is_closed:
                with contextlib.suppress(*_aio.CONNECTION_ERRORS):
                    await self._reply_queue.unbind(self._runs_exchange, binding)

    async def _bind_reply_queue(self, binding: str) -> None:
        """Bind the reply queue to the runs exchange. aio-pika binds it again after each
        reconnect.

        Raises:
            TransportError: the connection broke during the bind and did not come back
                within ``delivery_timeout``.
        """
        assert self._reply_queue is not None and self._runs_exchange is not None
        deadline = self._delivery_deadline()
        while True:
            try:
                await self._reply_queue.bind(self._runs_exchange, binding)
                return
            except _aio.CONNECTION_ERRORS as error:
                if time.monotonic() >= deadline:
                    raise delivery_failed(
                        self.settings.amqp_url,
                        self._delivery_timeout,
                        _aio.describe(error),
                        connected=True,
                        publishing=False,
                    ) from None
            await asyncio.sleep(RETRY_DELAY_FIRST)
            await self._ensure_connected(deadline)

    async def run(
        self,
        workflow: WorkflowRef,
        *args: Any,
        timeout: float | None = None,
        business_id: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Start a run, wait for it and return its result."""
        run_id = await self.start(workflow, *args, business_id=business_id, **kwargs)
        return await self.wait(run_id, timeout=timeout)

    async def _run_id_of(self, reference: str, timeout: float) -> str:
        """Return the run id of a run id or business id; see :meth:`zenflow.Client.wait`."""
        try:
            reply = await self._call(lookup_request(reference), timeout)
        except RunNotFound:
            if protocol.is_run_id(reference):
                return reference
            raise
        return str(reply["run"]["run_id"])

    async def _publish(self, body: bytes, properties: dict[str, Any]) -> None:
        """Publish a request until RabbitMQ confirms it.

        Raises:
            TransportError: RabbitMQ did not confirm it within ``delivery_timeout``.
        """
        deadline = self._delivery_deadline()
        channel = await self._ensure_connected(deadline)
        assert self._exchange is not None
        message = aio_pika.Message(body, content_type=protocol.MSGPACK_CONTENT_TYPE, **properties)
        try:
            await _aio.publish_confirmed(
                channel,
                self._exchange,
                message,
                self.topology.requests_routing_key,
                deadline=deadline,
                on_returned=self._declare_entry_again,
            )
        except _aio.CONNECTION_ERRORS as error:
            raise delivery_failed(
                self.settings.amqp_url,
                self._delivery_timeout,
                _aio.describe(error),
                connected=True,
                publishing=True,
            ) from None

    async def _declare_entry_again(self) -> bool:
        """Declare the requests queue and its binding again after RabbitMQ returned a
        request, because someone deleted them. Return True, so that the request is
        published again."""
        if self._channel is not None:
            with contextlib.suppress(*_aio.CONNECTION_ERRORS):
                await _aio.declare_entry(self._channel, self.topology)
        return True

    async def _call(
        self,
        body: bytes,
        timeout: float,
        properties: dict[str, Any] | None = None,
        *,
        resend: bool = True,
    ) -> dict[str, Any]:
        """Publish a request and wait for the engine's reply; see
        :meth:`zenflow.Client._call`."""
        await self._ensure_connected(self._delivery_deadline())
        assert self._reply_queue is not None
        correlation_id = uuid.uuid4().hex
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._replies[correlation_id] = reply
        request_properties = {
            **(properties or {}),
            "correlation_id": correlation_id,
            "reply_to": self._reply_queue.name,
        }
        loop = asyncio.get_running_loop()
        try:
            reconnected = self._reconnected
            await self._publish(body, request_properties)
            deadline = loop.time() + timeout
            while not reply.done():
                waiter = asyncio.ensure_future(reconnected.wait())
                waited: set[asyncio.Future[Any]] = {reply, waiter}
                try:
                    await asyncio.wait(
                        waited,
                        timeout=max(0.0, deadline - loop.time()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    waiter.cancel()
                if reply.done():
                    break
                if not reconnected.is_set():
                    raise RunTimeout(
                        f"the engine did not reply within {timeout} seconds; is `zenflow "
                        f"engine` running with namespace {self.settings.namespace!r}?"
                    )
                # The reply queue was deleted with the old connection, and declared again
                # with the same name, so a reply sent meanwhile is lost.
                if not resend:
                    raise reply_lost(self.settings.amqp_url, "the connection was restored")
                reconnected = self._reconnected
                await self._publish(body, request_properties)
        finally:
            self._replies.pop(correlation_id, None)
        return read_reply(reply.result())


def _persistent() -> dict[str, Any]:
    return {"delivery_mode": aio_pika.DeliveryMode.PERSISTENT, "message_id": protocol.new_run_id()}
