"""The asyncio client, built on aio-pika, for async services.

Use it as ``async with AsyncClient() as client: run_id = await client.start(...)``. One
client can be shared by many tasks of the same event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import aio_pika
import aio_pika.abc

from zenflow import _aio, protocol, serializer
from zenflow._client_common import (
    DEFAULT_REPLY_TIMEOUT,
    FINISHED_STATUSES,
    PENDING,
    START_GRACE,
    WorkflowRef,
    build_control,
    build_event,
    build_start,
    lookup_request,
    never_created,
    read_reply,
    run_outcome,
    start_timeout,
    wait_timed_out,
)
from zenflow.config import Settings, redact_url
from zenflow.errors import RunNotFound, RunTimeout, TransportError


class AsyncClient:
    """Start runs and read their state over RabbitMQ from asyncio code.

    Parameters are those of :class:`zenflow.Client`.
    """

    def __init__(
        self,
        amqp_url: str | None = None,
        *,
        namespace: str | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.settings = Settings.load(amqp_url=amqp_url, namespace=namespace)
        self.topology = protocol.Topology(self.settings.namespace)
        self._connect_timeout = connect_timeout
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._runs_exchange: aio_pika.abc.AbstractExchange | None = None
        self._reply_queue: aio_pika.abc.AbstractQueue | None = None
        self._replies: dict[str, asyncio.Future[bytes]] = {}
        self._finished: dict[str, asyncio.Future[bytes]] = {}
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        """Open the connection now instead of at the first request."""
        await self._ensure_connected()

    async def _ensure_connected(self) -> aio_pika.abc.AbstractChannel:
        async with self._lock:
            if self._channel is not None and not self._channel.is_closed:
                return self._channel
            self._connection = await _aio.connect(
                self.settings.amqp_url, name="zenflow async client", timeout=self._connect_timeout
            )
            try:
                channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                declared = await _aio.declare_entry(channel, self.topology)
                self._exchange = declared["engine_exchange"]
                self._runs_exchange = declared["runs_exchange"]
                self._reply_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
                await self._reply_queue.consume(self._on_message, no_ack=True)
            except _aio.CONNECTION_ERRORS as error:
                await self.close()
                raise TransportError(
                    f"RabbitMQ at {redact_url(self.settings.amqp_url)} failed: "
                    f"{redact_url(_aio.describe(error))}"
                ) from None
            self._channel = channel
            return channel

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            await connection.close()

    async def __aenter__(self) -> AsyncClient:
        await self._ensure_connected()
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
        return await self._call(body, timeout, _persistent())

    async def pause(
        self, run: str, *, by: str | None = None, timeout: float = DEFAULT_REPLY_TIMEOUT
    ) -> dict[str, Any]:
        """Pause a run; see :meth:`zenflow.Client.pause`."""
        return await self._call(build_control("pause", run, by, None), timeout, _persistent())

    async def resume(
        self, run: str, *, by: str | None = None, timeout: float = DEFAULT_REPLY_TIMEOUT
    ) -> dict[str, Any]:
        """Resume a paused run; see :meth:`zenflow.Client.resume`."""
        return await self._call(build_control("resume", run, by, None), timeout, _persistent())

    async def retry(
        self, run: str, *, by: str | None = None, timeout: float = DEFAULT_REPLY_TIMEOUT
    ) -> dict[str, Any]:
        """Run a failed run again from where it failed; see :meth:`zenflow.Client.retry`."""
        return await self._call(build_control("retry", run, by, None), timeout, _persistent())

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
        await self._ensure_connected()
        assert self._reply_queue is not None and self._runs_exchange is not None
        binding = self.topology.run_finished_binding(run_id)
        finished: asyncio.Future[bytes] = loop.create_future()
        self._finished[run_id] = finished
        poll_interval = 1.0
        first_poll = loop.time()
        try:
            await self._reply_queue.bind(self._runs_exchange, binding)
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
        await self._ensure_connected()
        assert self._exchange is not None
        message = aio_pika.Message(body, content_type=protocol.MSGPACK_CONTENT_TYPE, **properties)
        try:
            await self._exchange.publish(
                message, self.topology.requests_routing_key, mandatory=True
            )
        except _aio.CONNECTION_ERRORS as error:
            raise TransportError(
                f"RabbitMQ at {redact_url(self.settings.amqp_url)} did not confirm the request: "
                f"{redact_url(_aio.describe(error))}"
            ) from None

    async def _call(
        self, body: bytes, timeout: float, properties: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        await self._ensure_connected()
        assert self._reply_queue is not None
        correlation_id = uuid.uuid4().hex
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._replies[correlation_id] = reply
        try:
            await self._publish(
                body,
                {
                    **(properties or {}),
                    "correlation_id": correlation_id,
                    "reply_to": self._reply_queue.name,
                },
            )
            try:
                data = await asyncio.wait_for(reply, timeout)
            except TimeoutError:
                raise RunTimeout(
                    f"the engine did not reply within {timeout} seconds; is `zenflow engine` "
                    f"running with namespace {self.settings.namespace!r}?"
                ) from None
        finally:
            self._replies.pop(correlation_id, None)
        return read_reply(data)


def _persistent() -> dict[str, Any]:
    return {"delivery_mode": aio_pika.DeliveryMode.PERSISTENT, "message_id": protocol.new_run_id()}
