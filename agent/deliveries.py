"""Delivery counting for task messages, which bounds how often one message can kill agents.

A task whose code ends its process (``os._exit``, a crash in native code, the kernel's
out-of-memory killer) never acknowledges its message, so RabbitMQ delivers it again to
the next agent, which dies the same way, for ever. Classic queues mark such a delivery as
redelivered, but they do not count deliveries. The agent therefore counts them in a header
of the message:

- ``x-zenflow-deliveries`` is the number of earlier deliveries of the task that did not
  finish. A message from the engine has none, which means 0.
- A redelivered message is not run. The agent publishes a copy to the same exchange with
  the same routing key, with the count plus one, waits for the broker's confirm, then
  acknowledges the original. The copy joins the back of the queue, and RabbitMQ never
  marks it as redelivered on its first delivery.
- A message whose count reaches ``max_deliveries`` is not run either. The agent publishes
  it to the dead-letter queue (``Topology.dead_letter_queue``), then publishes a failed
  result of type ``PoisonMessage`` for its step, then acknowledges it.

A redelivered message is counted as one more failed delivery even when it was delivered
more than once before, because the flag does not say how often. The count is therefore a
lower bound. Every delivery it counts ended without an acknowledgement, because the agent
died, stopped or lost its channel, whatever the cause. Publishing the copy before the
acknowledgement keeps delivery at least once: an agent that dies between the two leaves
both, and the task runs once more.

RabbitMQ does not say which message killed an agent, so every task that was running or
waiting in the agent that died gets one more count. A task whose count is not 0 (a suspect)
therefore runs alone in its agent. The agent lowers its prefetch to 1, hands back the
messages it has received (republished with their counts unchanged, then acknowledged), and
waits for its running tasks to finish. Only then does the suspect start. When a suspect
kills the agent, no other task is in that agent, so a task that died beside a poison
message on its first delivery is counted once, not at each of its later deliveries. While a
suspect waits for the agent's running tasks to finish, the agent takes no other message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions
import structlog

from zenflow import _aio, protocol

log = structlog.get_logger("agent")

DELIVERIES_HEADER = "x-zenflow-deliveries"
# Headers that a dead-lettered message carries besides its count: the queue or routing key
# it was consumed from, and the agent that moved it.
QUEUE_HEADER = "x-zenflow-queue"
AGENT_HEADER = "x-zenflow-agent"
DEFAULT_MAX_DELIVERIES = 5
POISON_MESSAGE = "PoisonMessage"

# Seconds a suspect waits after lowering the prefetch, so that the messages the broker sent
# before the new limit reach ``admit`` and are handed back before the suspect starts. Such a
# message is already in the agent, a few event-loop turns from ``admit``. One that comes
# later is handed back too, and counts once more only if the suspect ends the agent before
# that hand-back is confirmed.
SETTLE_SECONDS = 0.05

PublishResult = Callable[
    [aio_pika.abc.AbstractIncomingMessage, protocol.TaskResult], Awaitable[bool]
]

# Errors of a channel that closed or a connection that broke while the agent used it.
CHANNEL_ERRORS: tuple[type[BaseException], ...] = (
    *_aio.CONNECTION_ERRORS,
    aiormq.exceptions.ChannelInvalidStateError,
)


class DeliveryGuard:
    """The delivery counter of one agent, which decides which task messages run now.

    ``publish_result`` publishes a task result to the message's ``reply_to`` with a
    confirm. It returns False when it could not, after requeueing the message itself.
    """

    def __init__(
        self,
        topology: protocol.Topology,
        agent: str,
        max_deliveries: int,
        prefetch: int,
        publish_result: PublishResult,
    ) -> None:
        self.topology = topology
        self.agent = agent
        self.max_deliveries = max_deliveries
        self.prefetch = prefetch
        # The prefetch count to restore after a suspect ran alone: the agent sets it to its
        # free slots, which long tasks handed over to the engine reduce.
        self.current_prefetch: Callable[[], int] = lambda: self.prefetch
        self.publish_result = publish_result
        # Deliveries between the start of ``admit`` and the end of their handling task.
        self._busy = 0
        self._quiet = asyncio.Event()  # set while at most one delivery is busy
        self._isolating = False
        self._dead_letter_declared = False
        self._background: set[asyncio.Task[Any]] = set()

    async def admit(
        self,
        channel: aio_pika.abc.AbstractChannel,
        message: aio_pika.abc.AbstractIncomingMessage,
        task: protocol.TaskMessage,
    ) -> bool:
        """Return whether the agent may run the task of ``message`` now.

        Call it from the asyncio task that handles the delivery: the delivery counts as busy
        until that task ends. When it returns False, the message was republished, handed
        back or dead-lettered and acknowledged, or it was requeued after a broker error.
        ``channel`` is the agent's channel with publisher confirms.
        """
        self._enter()
        failed = failed_deliveries(message.headers, message.redelivered)
        try:
            if failed >= self.max_deliveries:
                reason = (
                    f"died or stopped {failed} times before finishing it, so it was not run "
                    f"again (agent option --max-deliveries {self.max_deliveries})"
                )
                await self._dead_letter(channel, message, task, failed, reason)
                return False
            if message.redelivered:
                await self._republish(channel, message, task, failed)
                log.info("task_redelivered", deliveries=failed, max_deliveries=self.max_deliveries)
                return False
            if self._isolating:
                # A suspect runs or waits to run alone in this agent.
                await self._republish(channel, message, task, failed)
                log.debug("task_handed_back", deliveries=failed)
                return False
            if failed > 0:
                await self._wait_until_alone(message)
                log.info("suspect_task_running_alone", deliveries=failed)
            return True
        except CHANNEL_ERRORS as error:
            log.warning("delivery_count_failed", error=_aio.describe(error))
            with contextlib.suppress(*CHANNEL_ERRORS):
                await message.nack(requeue=True)
            return False

    # Busy deliveries and suspects.

    def _enter(self) -> None:
        self._busy += 1
        self._quiet.clear()
        _current_task().add_done_callback(self._leave)

    def _leave(self, _task: asyncio.Task[Any]) -> None:
        self._busy -= 1
        if self._busy <= 1:
            self._quiet.set()

    async def _wait_until_alone(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        channel = message.channel
        self._isolating = True
        # Ends the isolation when the suspect's handling ends, whichever way it ends.
        _current_task().add_done_callback(lambda _: self._end_isolation(channel))
        # The agent's consume channel has one prefetch count for all its consumers (global),
        # and RabbitMQ applies a new one at once.
        await channel.basic_qos(prefetch_count=1, global_=True)
        await asyncio.sleep(SETTLE_SECONDS)
        while self._busy > 1:
            await self._quiet.wait()

    def _end_isolation(self, channel: Any) -> None:
        self._isolating = False
        restore = asyncio.ensure_future(self._restore_prefetch(channel))
        self._background.add(restore)
        restore.add_done_callback(self._background.discard)

    async def _restore_prefetch(self, channel: Any) -> None:
        try:
            await channel.basic_qos(prefetch_count=self.current_prefetch(), global_=True)
        except CHANNEL_ERRORS as error:
            # A closed channel is reopened by the robust connection with the agent's
            # original prefetch.
            log.warning("prefetch_restore_failed", error=_aio.describe(error))

    # Publishing.

    async def _republish(
        self,
        channel: aio_pika.abc.AbstractChannel,
        message: aio_pika.abc.AbstractIncomingMessage,
        task: protocol.TaskMessage,
        failed: int,
    ) -> None:
        """Publish a copy with the count ``failed`` where the message came from, then ack."""
        copy = _copy(message, {DELIVERIES_HEADER: failed})
        if message.exchange:
            exchange = await channel.get_exchange(message.exchange, ensure=False)
        else:
            exchange = channel.default_exchange
        try:
            await exchange.publish(copy, message.routing_key or "", mandatory=True)
        except aiormq.exceptions.DeliveryError as error:
            # The route the message came by leads nowhere now, so the count cannot go on.
            log.error(
                "task_republish_unroutable",
                exchange=message.exchange,
                routing_key=message.routing_key,
                error=_aio.describe(error),
            )
            reason = (
                f"died or stopped {failed} times before finishing it, and the copy that "
                f"carries the count could not be routed by exchange {message.exchange!r} "
                f"with routing key {message.routing_key!r}"
            )
            await self._dead_letter(channel, message, task, failed, reason)
            return
        await message.ack()

    async def _dead_letter(
        self,
        channel: aio_pika.abc.AbstractChannel,
        message: aio_pika.abc.AbstractIncomingMessage,
        task: protocol.TaskMessage,
        failed: int,
        reason: str,
    ) -> None:
        """Move the message to the dead-letter queue and fail its step with PoisonMessage.

        ``reason`` completes the sentence "the agents that took the task ..." in the error.
        """
        queue = self.topology.dead_letter_queue
        if not self._dead_letter_declared:
            await channel.declare_queue(queue, durable=True)
            self._dead_letter_declared = True
        headers = {
            DELIVERIES_HEADER: failed,
            QUEUE_HEADER: message.routing_key or "",
            AGENT_HEADER: self.agent,
        }
        await channel.default_exchange.publish(_copy(message, headers), queue, mandatory=True)
        log.error(
            "task_dead_lettered",
            deliveries=failed,
            max_deliveries=self.max_deliveries,
            queue=message.routing_key,
            dead_letter_queue=queue,
        )
        if message.reply_to:
            now = time.time()
            result = protocol.TaskResult(
                run_id=task.run_id,
                step=task.step,
                attempt=task.attempt,
                workflow=task.workflow,
                ok=False,
                error={
                    "type": POISON_MESSAGE,
                    "message": self._poison_text(message, task, reason),
                    "traceback": "",
                },
                agent=self.agent,
                started_at=now,
                finished_at=now,
                # Another attempt would kill agents again.
                non_retryable=True,
            )
            if not await self.publish_result(message, result):
                return  # requeued: the next delivery dead-letters it again
        await message.ack()

    def _poison_text(
        self, message: aio_pika.abc.AbstractIncomingMessage, task: protocol.TaskMessage, reason: str
    ) -> str:
        return (
            f"the agents that took task {task.task!r} (run {task.run_id}, step {task.step}) "
            f"from queue {message.routing_key!r} {reason}. Its message was moved to queue "
            f"{self.topology.dead_letter_queue!r}. Find what ends the agent process during "
            "this task (os._exit, a crash in native code, the out-of-memory killer), fix it, "
            "and start a new run"
        )


def failed_deliveries(headers: Mapping[str, Any] | None, redelivered: bool | None) -> int:
    """Return how many deliveries of a task ended without an acknowledgement, this one
    included if the broker flags it as redelivered.

    A count that is not a non-negative integer is logged and read as 0.
    """
    value = (headers or {}).get(DELIVERIES_HEADER, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        log.warning("invalid_delivery_count", header=DELIVERIES_HEADER, value=repr(value))
        value = 0
    if redelivered:
        return value + 1
    return value


def _current_task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    assert task is not None, "admit runs in the asyncio task that handles the delivery"
    return task


def _copy(
    message: aio_pika.abc.AbstractIncomingMessage, headers: dict[str, Any]
) -> aio_pika.Message:
    """Return a persistent copy of ``message`` with ``headers`` added to its own."""
    return aio_pika.Message(
        message.body,
        headers={**(message.headers or {}), **headers},
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )
