"""The agent process: executes tasks from its queues and publishes their results.

Sync tasks run in a thread pool and async tasks on the event loop, so the AMQP connection
keeps sending heartbeats while a long or CPU-bound task runs. The prefetch count equals the
concurrency, shared by all the agent's queues, so an agent never keeps a message that it
cannot start at once.

A task message is acknowledged only after its result was confirmed by RabbitMQ. If the
agent dies before that, RabbitMQ delivers the message again and the task runs again; the
engine ignores the second result for the step. A result that RabbitMQ did not confirm is
published again, also across a reconnect. When a lost connection makes RabbitMQ deliver
the task message again, the agent does not run the task again if it already published the
result (see :mod:`agent.ledger`). An attempt that runs longer than ``ack_after`` is handed
over to the engine's lease instead (see :mod:`agent.attempts`), so that RabbitMQ's
acknowledgement timeout never closes the channel under a long task.

A task's ``timeout`` and ``heartbeat`` interval are enforced here: the attempt fails with
``TaskTimeout`` or ``TaskHeartbeatTimeout``, an ``async`` task is cancelled, and a sync task's
thread is left to end by itself (its next ``zenflow.heartbeat()`` raises AttemptCancelled).
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

from agent.attempts import Prefetch, RunningAttempt, retry_advice
from agent.deliveries import DEFAULT_MAX_DELIVERIES, DeliveryGuard
from agent.ledger import ResultLedger
from zenflow import _aio, protocol, serializer
from zenflow.config import Settings
from zenflow.context import TaskContext, set_current_task
from zenflow.errors import ConfigurationError, SerializationError
from zenflow.registry import Registry, TaskDefinition
from zenflow.task import validate_queue_name

log = structlog.get_logger("agent")

# Threads of sync tasks past their timeout that the agent leaves running before new sync
# tasks have to wait for a thread.
ABANDONED_THREADS = 32

# Seconds during which the agent retries a result that RabbitMQ did not confirm (connection
# lost, nack, no confirm). After that the task message is requeued and runs again.
RESULT_PUBLISH_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class AgentOptions:
    """Settings of one agent process."""

    settings: Settings
    queues: tuple[str, ...] = ()  # empty: every queue of the registered tasks
    concurrency: int = 8
    # Seconds after which a running attempt is handed over to the engine's lease, and the
    # lease that each heartbeat requests.
    ack_after: float = 60.0
    lease: float = 30.0
    max_deliveries: int = DEFAULT_MAX_DELIVERIES

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigurationError(
                f"invalid concurrency {self.concurrency}: use 1 or more tasks at a time"
            )
        if not 0 <= self.ack_after <= 1500:
            raise ConfigurationError(
                f"invalid ack-after {self.ack_after}: use 0 to 1500 seconds, below RabbitMQ's "
                "consumer_timeout"
            )
        if not 1 <= self.lease <= protocol.MAX_LEASE_SECONDS:
            raise ConfigurationError(
                f"invalid lease {self.lease}: use 1 to {protocol.MAX_LEASE_SECONDS:g} seconds"
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
        self.stopping = False
        self.ledger = ResultLedger()
        self._stop = asyncio.Event()
        self.stats = {"completed": 0, "failed": 0, "rejected": 0, "redeliveries_skipped": 0}
        self.deliveries = DeliveryGuard(
            self.topology,
            self.identity,
            options.max_deliveries,
            options.concurrency,
            self._publish_result,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then finish running tasks, publish, and close."""
        self._stop = stop
        # The thread of a sync task that ran past its timeout may go on running, and must not
        # keep the next tasks from starting, so the pool has room for that many such threads.
        # Threads start only when needed.
        executor = ThreadPoolExecutor(
            max_workers=self.options.concurrency + ABANDONED_THREADS,
            thread_name_prefix="agent-task",
        )
        self.executor = executor
        connection = await _aio.connect(
            self.settings.amqp_url, name=f"zenflow agent {self.identity}", log=log
        )
        try:
            self.publish_channel = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            await self.publish_channel.declare_queue(self.topology.results_queue, durable=True)
            consume_channel = await connection.channel()
            # global_=True shares the prefetch among the agent's consumers on this channel.
            await consume_channel.set_qos(prefetch_count=self.options.concurrency, global_=True)
            queues = [
                await _aio.declare_task_queue(consume_channel, self.topology, name)
                for name in self.queues
            ]
            consumers: list[tuple[Any, str]] = []

            async def consume() -> None:
                for queue in queues:
                    consumers.append((queue, await queue.consume(self._tracked)))

            async def cancel() -> None:
                cancelled = list(consumers)
                consumers.clear()
                await _aio.cancel_consumers(cancelled)

            self.prefetch = Prefetch(consume_channel, self.options.concurrency, consume, cancel)
            prefetch = self.prefetch
            self.deliveries.current_prefetch = lambda: max(1, prefetch.free_slots())
            await consume()
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
            self.stopping = True
            await cancel()
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
            if message.redelivered and await self._already_published(task_message):
                with contextlib.suppress(*_aio.CONNECTION_ERRORS):
                    await message.ack()
                return
            if not await self.deliveries.admit(self.publish_channel, message, task_message):
                return  # counted and settled by agent/deliveries.py, not run now
            attempt = RunningAttempt(task_message, message)
            result = await self._execute(attempt)
            if attempt.handed_over:
                try:
                    await self._publish_handed_over(message, result)
                finally:
                    await self.prefetch.release()
            else:
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

    async def _execute(self, attempt: RunningAttempt) -> protocol.TaskResult:
        message = attempt.message
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
            value = await self._supervise(definition, attempt)
        except asyncio.CancelledError:
            raise
        except _OutOfTime as error:
            log.warning("task_failed", error_type=error.kind, error=str(error))
            failure = self._failure(message, started, error.kind, str(error))
            return dataclasses.replace(failure, **retry_advice(attempt, error, None))
        except BaseException as error:
            # Task code may raise SystemExit, KeyboardInterrupt or GeneratorExit. Signals reach
            # the main thread, not this task, so these come from the task and fail only its
            # attempt instead of stopping the agent.
            if isinstance(error, _Contained):
                error = error.original
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
                **retry_advice(attempt, error, definition.retry_hook(attempt.call)),
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

    async def _supervise(self, definition: TaskDefinition, attempt: RunningAttempt) -> Any:
        """Run the attempt while enforcing its limits and handing it over when it runs long."""
        work = asyncio.ensure_future(self._call_contained(definition, attempt))
        options = self.options
        try:
            while True:
                now = time.monotonic()
                wait = attempt.next_check(now, options.ack_after, options.lease)
                done, _ = await asyncio.wait({work}, timeout=wait)
                if done:
                    return work.result()
                now = time.monotonic()
                exceeded = attempt.limit_exceeded(now)
                if exceeded is not None:
                    attempt.give_up(exceeded[1])
                    raise _OutOfTime(*exceeded)
                if not attempt.handed_over and now - attempt.started >= options.ack_after:
                    await self._hand_over(attempt)
                elif attempt.handed_over and now - attempt.last_lease >= options.lease / 3:
                    await self._send_heartbeat(attempt)
        finally:
            if not work.done():
                # An async task is cancelled; a sync task's thread cannot be, and ends when
                # its code returns or its next heartbeat() raises AttemptCancelled.
                work.cancel()
                await asyncio.wait({work}, timeout=1.0)

    async def _call_contained(self, definition: TaskDefinition, attempt: RunningAttempt) -> Any:
        """Run :meth:`_call` in its own asyncio task, with task code's SystemExit contained.

        asyncio lets SystemExit and KeyboardInterrupt raised in a task stop the event loop,
        so they are wrapped in an ordinary exception here.
        """
        try:
            return await self._call(definition, attempt)
        except (SystemExit, KeyboardInterrupt, GeneratorExit) as error:
            raise _Contained(error) from None

    async def _call(self, definition: TaskDefinition, attempt: RunningAttempt) -> Any:
        # Each delivery runs in its own asyncio task, so this context is the task's own.
        message = attempt.message
        set_current_task(
            TaskContext(
                run_id=message.run_id,
                workflow=message.workflow,
                step=message.step,
                attempt=message.attempt,
                task=message.task,
                beat=attempt.beat,
            )
        )
        if definition.is_async:
            attempt.call = definition.prepare(message.args, message.kwargs)
            value = attempt.call()
        else:
            loop = asyncio.get_running_loop()
            context = contextvars.copy_context()
            value = await loop.run_in_executor(
                self.executor,
                functools.partial(context.run, _run_sync, definition, attempt),
            )
        if inspect.isawaitable(value):
            value = await value
        return value

    async def _hand_over(self, attempt: RunningAttempt) -> None:
        """Put a long attempt under the engine's lease, then acknowledge its delivery."""
        delivery = attempt.delivery
        if not await self._send_heartbeat(attempt):
            return  # tried again at the next check
        await self.prefetch.hold()
        try:
            await delivery.ack()
        except _aio.CONNECTION_ERRORS as error:
            # The delivery went back to the queue with the lost channel.
            await self.prefetch.release()
            log.warning("hand_over_failed", error=_aio.describe(error))
            return
        attempt.handed_over = True
        log.info("task_handed_over", lease_s=self.options.lease)

    async def _send_heartbeat(self, attempt: RunningAttempt) -> bool:
        delivery = attempt.delivery
        if not delivery.reply_to:
            return True
        heartbeat = attempt.heartbeat(self.identity, self.options.lease)
        message = aio_pika.Message(
            serializer.encode(heartbeat.to_body()),
            content_type=protocol.MSGPACK_CONTENT_TYPE,
            correlation_id=delivery.correlation_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            type="task_heartbeat",
        )
        try:
            await self.publish_channel.default_exchange.publish(
                message, delivery.reply_to, mandatory=True
            )
        except aiormq.exceptions.DeliveryError as error:
            log.warning("heartbeat_not_sent", error=_aio.describe(error))
            return False
        except _aio.CONNECTION_ERRORS as error:
            log.warning("heartbeat_not_sent", error=_aio.describe(error))
            return False
        return True

    async def _publish_handed_over(
        self, delivery: aio_pika.abc.AbstractIncomingMessage, result: protocol.TaskResult
    ) -> None:
        """Publish the result of a handed-over attempt, whose delivery is acknowledged.

        RabbitMQ will not deliver such a task again, so the result is sent until the broker
        confirms it. If the agent stops first, the engine's lease runs out and the engine
        retries the attempt.
        """
        if not delivery.reply_to:
            return
        delay = 0.5
        while not await self._publish_result(delivery, result, requeue=False):
            if self.stopping:
                log.warning("result_lost_at_stop", hint="the engine retries when the lease ends")
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

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

    async def _already_published(self, message: protocol.TaskMessage) -> bool:
        """Return whether this agent published a result of the message's attempt, which
        RabbitMQ confirmed, before the message was delivered again."""
        key = (message.run_id, message.step, message.attempt)
        if not await self.ledger.confirmed(key):
            return False
        self.stats["redeliveries_skipped"] += 1
        log.info("redelivered_task_skipped", reason="its result was already published")
        return True

    async def _publish_result(
        self,
        message: aio_pika.abc.AbstractIncomingMessage,
        result: protocol.TaskResult,
        *,
        requeue: bool = True,
    ) -> bool:
        """Publish a result until RabbitMQ confirms it; return False if the task message
        was requeued instead, because the result could not be published."""
        assert message.reply_to is not None
        reply = aio_pika.Message(
            self._encode(result),
            content_type=protocol.MSGPACK_CONTENT_TYPE,
            correlation_id=message.correlation_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            type="task_result",
        )
        outcome = self.ledger.begin((result.run_id, result.step, result.attempt))
        confirmed = False
        try:
            attempts = await _aio.publish_confirmed(
                self.publish_channel,
                self.publish_channel.default_exchange,
                reply,
                message.reply_to,
                deadline=time.monotonic() + RESULT_PUBLISH_TIMEOUT,
                on_returned=functools.partial(self._redeclare_results_queue, message.reply_to),
                on_retry=_log_result_retry,
                stop=self._stop,
            )
            confirmed = True
        except aiormq.exceptions.PublishError as error:
            # The broker routed the result to no queue, because the reply queue named by the
            # task message does not exist and is not this namespace's results queue.
            # Delivering the task again would fail the same way, so the message is dropped.
            log.error("result_unroutable", reply_to=message.reply_to, error=_aio.describe(error))
            return True
        except _aio.CONNECTION_ERRORS as error:
            log.warning("result_publish_failed", error=_aio.describe(error))
            if requeue:
                with contextlib.suppress(*_aio.CONNECTION_ERRORS):
                    await message.nack(requeue=True)
            return False
        finally:
            if not outcome.done():
                outcome.set_result(confirmed)
        if attempts > 1:
            log.info("result_publish_retried", attempts=attempts)
        return True

    async def _redeclare_results_queue(self, reply_to: str) -> bool:
        """Declare the results queue again after RabbitMQ returned a result for it. Return
        True, so that the result is published again, only for the namespace's own results
        queue."""
        if reply_to != self.topology.results_queue:
            return False
        log.warning("result_returned", reply_to=reply_to)
        with contextlib.suppress(*_aio.CONNECTION_ERRORS):
            await asyncio.wait_for(
                self.publish_channel.declare_queue(reply_to, durable=True), _aio.CONFIRM_TIMEOUT
            )
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


def _log_result_retry(error: BaseException, attempt: int) -> None:
    # Only the first failure of a result is logged. result_publish_retried counts the others.
    if attempt == 1:
        log.warning("result_publish_retrying", error=_aio.describe(error))


def _run_sync(definition: TaskDefinition, attempt: RunningAttempt) -> Any:
    # The timeout counts from here: waiting for a free thread is not running.
    attempt.started = attempt.last_beat = time.monotonic()
    attempt.call = definition.prepare(attempt.message.args, attempt.message.kwargs)
    return attempt.call()


class _Contained(Exception):
    """A SystemExit, KeyboardInterrupt or GeneratorExit raised by task code."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


class _OutOfTime(Exception):
    """An attempt ran past its timeout or heartbeat interval; ``kind`` is the error type."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
