"""The agent process: executes tasks from its queues and publishes their results.

Sync tasks run in a thread pool and async tasks on the event loop, so the AMQP connection
keeps sending heartbeats while a long or CPU-bound task runs. The prefetch count equals the
concurrency, shared by all the agent's queues, so an agent never keeps a message that it
cannot start at once.

A task message is acknowledged only after its result was confirmed by RabbitMQ. If the
agent dies before that, RabbitMQ delivers the message again and the task runs again; the
engine ignores the second result for the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import os
import socket
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions
import structlog

from agent.deliveries import DEFAULT_MAX_DELIVERIES, DeliveryGuard
from zenflow import _aio, protocol, serializer
from zenflow.config import Settings
from zenflow.context import TaskContext, set_current_task
from zenflow.errors import ConfigurationError, SerializationError
from zenflow.registry import Registry, TaskDefinition
from zenflow.task import validate_queue_name

log = structlog.get_logger("agent")


@dataclasses.dataclass(frozen=True)
class AgentOptions:
    """Settings of one agent process."""

    settings: Settings
    queues: tuple[str, ...] = ()  # empty: every queue of the registered tasks
    concurrency: int = 8
    max_deliveries: int = DEFAULT_MAX_DELIVERIES

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigurationError(
                f"invalid concurrency {self.concurrency}: use 1 or more tasks at a time"
            )
        if self.max_deliveries < 1:
            raise ConfigurationError(
                f"invalid max deliveries {self.max_deliveries}: use 1 or more deliveries"
            )
        for queue in self.queues:
            validate_queue_name(queue, "--queue")


class AgentService:
    def __init__(self, options: AgentOptions, registry: Registry) -> None:
        self.options = options
        self.settings = options.settings
        self.registry = registry
        self.topology = protocol.Topology(self.settings.namespace)
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.queues = list(options.queues) or registry.queues()
        if not self.queues:
            raise ConfigurationError(
                f"no tasks found in {', '.join(registry.modules) or 'the application'}: "
                "define Task subclasses or @task functions there, or pass --queue"
            )
        self._in_flight: set[asyncio.Task[Any]] = set()
        self.stats = {"completed": 0, "failed": 0, "rejected": 0}
        self.deliveries = DeliveryGuard(
            self.topology,
            self.identity,
            options.max_deliveries,
            options.concurrency,
            self._publish_result,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then finish running tasks, publish, and close."""
        executor = ThreadPoolExecutor(
            max_workers=self.options.concurrency, thread_name_prefix="agent-task"
        )
        self.executor = executor
        connection = await _aio.connect(
            self.settings.amqp_url, name=f"zenflow agent {self.identity}"
        )
        try:
            self.publish_channel = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            await self.publish_channel.declare_queue(self.topology.results_queue, durable=True)
            consume_channel = await connection.channel()
            # global_=True shares the prefetch among the agent's consumers on this channel.
            await consume_channel.set_qos(prefetch_count=self.options.concurrency, global_=True)
            consumers = []
            for name in self.queues:
                queue = await _aio.declare_task_queue(consume_channel, self.topology, name)
                consumers.append((queue, await queue.consume(self._tracked)))
            served = set(self.registry.queues())
            for name in self.queues:
                if name not in served:
                    # Often a typo in --queue: such an agent answers every message with an
                    # error result, because it registers no task for it.
                    log.warning("queue_without_tasks", queue=name, task_queues=sorted(served))
            log.info(
                "agent_started",
                agent=self.identity,
                namespace=self.settings.namespace,
                queues=self.queues,
                tasks=sorted(self.registry.tasks),
                concurrency=self.options.concurrency,
            )
            await stop.wait()

            log.info("agent_stopping", running=len(self._in_flight))
            for queue, tag in consumers:
                with contextlib.suppress(*_aio.CONNECTION_ERRORS):
                    await queue.cancel(tag)
            while self._in_flight:
                await asyncio.wait(list(self._in_flight))
        finally:
            await connection.close()
            executor.shutdown(wait=False, cancel_futures=True)
        log.info("agent_stopped", **self.stats)

    async def _tracked(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        # Shielded so that a channel close, which cancels consumer tasks, does not abandon
        # a running task half-way; shutdown waits for it.
        task = asyncio.create_task(self._on_task(message))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        await asyncio.shield(task)

    async def _on_task(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            task_message = protocol.TaskMessage.from_body(serializer.decode(message.body))
        except (protocol.InvalidMessage, SerializationError) as error:
            await self._reject(message, str(error))
            return
        context = {
            "run_id": task_message.run_id,
            "workflow": task_message.workflow,
            "step": task_message.step,
            "attempt": task_message.attempt,
            "task": task_message.task,
        }
        with structlog.contextvars.bound_contextvars(**context):
            if not await self.deliveries.admit(self.publish_channel, message, task_message):
                return  # counted and settled by agent/deliveries.py, not run now
            result = await self._execute(task_message)
            if message.reply_to:
                published = await self._publish_result(message, result)
                if not published:
                    return  # not acknowledged: RabbitMQ delivers the task again
            with contextlib.suppress(*_aio.CONNECTION_ERRORS):
                await message.ack()
            if result.ok and result.started_at is not None and result.finished_at is not None:
                # Logged after the result left, so the line costs the engine no latency.
                duration = round((result.finished_at - result.started_at) * 1000, 1)
                log.info("task_succeeded", duration_ms=duration)

    async def _execute(self, message: protocol.TaskMessage) -> protocol.TaskResult:
        started = time.time()
        definition = self.registry.tasks.get(message.task)
        if definition is None:
            known = ", ".join(sorted(self.registry.tasks)) or "none"
            log.warning("task_not_registered", registered=known)
            return self._failure(
                message,
                started,
                "TaskNotRegistered",
                f"task {message.task!r} is not registered on agent {self.identity} (queues "
                f"{', '.join(self.queues)}); its registered tasks are: {known}. Start an agent "
                "whose --app module defines it",
            )
        log.debug("task_started")
        try:
            value = await self._call(definition, message)
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            # Task code may raise SystemExit, KeyboardInterrupt or GeneratorExit. Signals reach
            # the main thread, not this task, so these come from the task and fail only its
            # attempt instead of stopping the agent.
            self.stats["failed"] += 1
            log.warning("task_failed", error_type=type(error).__name__, error=str(error))
            log.debug("task_failed_traceback", exc_info=error)
            return protocol.TaskResult(
                run_id=message.run_id,
                step=message.step,
                attempt=message.attempt,
                workflow=message.workflow,
                ok=False,
                error={
                    "type": type(error).__name__,
                    "message": str(error),
                    "traceback": "".join(traceback.format_exception(error)),
                },
                agent=self.identity,
                started_at=started,
                finished_at=time.time(),
            )
        self.stats["completed"] += 1
        finished = time.time()
        return protocol.TaskResult(
            run_id=message.run_id,
            step=message.step,
            attempt=message.attempt,
            workflow=message.workflow,
            ok=True,
            value=value,
            agent=self.identity,
            started_at=started,
            finished_at=finished,
        )

    async def _call(self, definition: TaskDefinition, message: protocol.TaskMessage) -> Any:
        # Each delivery runs in its own asyncio task, so this context is the task's own.
        set_current_task(
            TaskContext(
                run_id=message.run_id,
                workflow=message.workflow,
                step=message.step,
                attempt=message.attempt,
                task=message.task,
            )
        )
        if definition.is_async:
            value = definition.prepare(message.args, message.kwargs)()
        else:
            loop = asyncio.get_running_loop()
            context = contextvars.copy_context()
            value = await loop.run_in_executor(
                self.executor,
                functools.partial(context.run, _run_sync, definition, message),
            )
        if inspect.isawaitable(value):
            value = await value
        return value

    def _failure(
        self, message: protocol.TaskMessage, started: float, kind: str, text: str
    ) -> protocol.TaskResult:
        self.stats["failed"] += 1
        return protocol.TaskResult(
            run_id=message.run_id,
            step=message.step,
            attempt=message.attempt,
            workflow=message.workflow,
            ok=False,
            error={"type": kind, "message": text, "traceback": ""},
            agent=self.identity,
            started_at=started,
            finished_at=time.time(),
        )

    async def _publish_result(
        self, message: aio_pika.abc.AbstractIncomingMessage, result: protocol.TaskResult
    ) -> bool:
        assert message.reply_to is not None
        reply = aio_pika.Message(
            self._encode(result),
            content_type=protocol.MSGPACK_CONTENT_TYPE,
            correlation_id=message.correlation_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            type="task_result",
        )
        try:
            await self.publish_channel.default_exchange.publish(
                reply, message.reply_to, mandatory=True
            )
        except aiormq.exceptions.DeliveryError as error:
            # The broker routed the result to no queue, because the reply queue named by the
            # task message does not exist. Delivering the task again would fail the same way,
            # so the message is dropped.
            log.error("result_unroutable", reply_to=message.reply_to, error=_aio.describe(error))
            return True
        except _aio.CONNECTION_ERRORS as error:
            log.warning("result_publish_failed", error=_aio.describe(error))
            with contextlib.suppress(*_aio.CONNECTION_ERRORS):
                await message.nack(requeue=True)
            return False
        return True

    def _encode(self, result: protocol.TaskResult) -> bytes:
        """Encode a result; a value that cannot be encoded, or is too big, fails the attempt."""
        try:
            body = serializer.encode(result.to_body())
        except SerializationError as error:
            reason = str(error)
            # Encode the value alone to name the path inside it, such as result['items'][0].
            try:
                serializer.encode(result.value, name="result")
            except SerializationError as inner:
                reason = str(inner)
        else:
            if len(body) <= protocol.MAX_MESSAGE_BYTES:
                return body
            reason = (
                f"the result is {len(body)} bytes once encoded; the limit is "
                f"{protocol.MAX_MESSAGE_BYTES}. Store big data elsewhere and return a reference"
            )
        self.stats["failed"] += 1
        log.warning("task_failed", error_type="SerializationError", error=reason)
        failure = dataclasses.replace(
            result,
            ok=False,
            value=None,
            error={"type": "SerializationError", "message": reason, "traceback": ""},
        )
        return serializer.encode(failure.to_body())

    async def _reject(self, message: aio_pika.abc.AbstractIncomingMessage, reason: str) -> None:
        """Drop an undecodable task message, and reply with an error result if it can be routed."""
        self.stats["rejected"] += 1
        log.warning("task_message_rejected", reason=reason, correlation_id=message.correlation_id)
        parts = (message.correlation_id or "").split(":")
        if message.reply_to and len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            result = protocol.TaskResult(
                run_id=parts[0],
                step=int(parts[1]),
                attempt=int(parts[2]),
                ok=False,
                error={"type": "InvalidTaskMessage", "message": reason, "traceback": ""},
                agent=self.identity,
            )
            await self._publish_result(message, result)
        with contextlib.suppress(*_aio.CONNECTION_ERRORS):
            await message.ack()


def _run_sync(definition: TaskDefinition, message: protocol.TaskMessage) -> Any:
    return definition.prepare(message.args, message.kwargs)()
