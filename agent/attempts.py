"""What an agent tracks about each attempt it runs: limits, heartbeats and the hand-over.

A task message stays unacknowledged while its attempt runs, so RabbitMQ delivers it again if
the agent dies. RabbitMQ also closes the channel of a consumer that holds a delivery longer
than its ``consumer_timeout`` (30 minutes by default). So an attempt that runs longer than
the agent's ``ack_after`` is handed over to the engine: the agent sends a heartbeat with a
lease, waits for the broker's confirm, and only then acknowledges the delivery. From then
on the agent sends a heartbeat every third of the lease, and the engine retries the attempt
if the heartbeats stop, for example because the agent died or hangs.

While attempts are handed over, the agent lowers its prefetch count so that it never holds
more messages than it can run at once; with every slot handed over it stops consuming until
one attempt ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika.abc
import structlog

from zenflow import _aio, protocol
from zenflow.errors import AttemptCancelled
from zenflow.retry import is_non_retryable

log = structlog.get_logger("agent")


@dataclasses.dataclass
class RunningAttempt:
    """One attempt in progress in this agent."""

    message: protocol.TaskMessage
    delivery: aio_pika.abc.AbstractIncomingMessage
    started: float = dataclasses.field(default_factory=time.monotonic)
    last_beat: float = dataclasses.field(default_factory=time.monotonic)
    details: Any = None
    handed_over: bool = False
    last_lease: float = 0.0
    call: Callable[[], Any] | None = None  # the bound task, once prepared
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    cancel_reason: str = ""

    def beat(self, details: Any) -> None:
        """Record a heartbeat from task code; raise AttemptCancelled once given up."""
        if self.cancelled.is_set():
            raise AttemptCancelled(self.cancel_reason)
        self.last_beat = time.monotonic()
        if details is not None:
            self.details = details

    def give_up(self, reason: str) -> None:
        self.cancel_reason = reason
        self.cancelled.set()

    def limit_exceeded(self, now: float) -> tuple[str, str] | None:
        """Return the error type and message if the attempt ran out of time, else None."""
        task, timeout, interval = self.message.task, self.message.timeout, self.message.heartbeat
        if timeout is not None and now - self.started >= timeout:
            return "TaskTimeout", (
                f"task {task} ran longer than its timeout of {_seconds(timeout)}; the agent "
                f"stopped waiting for attempt {self.message.attempt}"
            )
        if interval is not None and now - self.last_beat >= interval:
            return "TaskHeartbeatTimeout", (
                f"task {task} sent no heartbeat for {_seconds(interval)} (its heartbeat "
                "interval); call zenflow.heartbeat() more often, or raise the interval"
            )
        return None

    def next_check(self, now: float, ack_after: float, lease: float) -> float:
        """Return the seconds until something about this attempt must be checked."""
        deadlines = []
        if self.message.timeout is not None:
            deadlines.append(self.started + self.message.timeout)
        if self.message.heartbeat is not None:
            deadlines.append(self.last_beat + self.message.heartbeat)
        if not self.handed_over:
            deadlines.append(self.started + ack_after)
        else:
            deadlines.append(self.last_lease + lease / 3)
        return max(0.01, min(deadlines) - now)

    def heartbeat(self, agent: str, lease: float) -> protocol.TaskHeartbeat:
        self.last_lease = time.monotonic()
        details = None if self.details is None else protocol.short_repr(self.details)
        return protocol.TaskHeartbeat(
            run_id=self.message.run_id,
            step=self.message.step,
            attempt=self.message.attempt,
            agent=agent,
            lease=lease,
            details=details,
        )


def retry_advice(
    attempt: RunningAttempt, error: BaseException, hook: Callable[..., Any] | None
) -> dict[str, Any]:
    """Return the retry fields of a failed result: non-retryable, or the hook's delay.

    The hook is user code. If it fails or returns something else than a ``timedelta``, a
    number of seconds or ``None``, the policy decides and a warning is logged.
    """
    names = (attempt.message.retry or {}).get("non_retryable") or ()
    if not isinstance(names, list | tuple):
        names = ()  # a malformed policy in the message: the engine's policy still applies
    if is_non_retryable(error, [name for name in names if isinstance(name, str)]):
        return {"non_retryable": True}
    if hook is None:
        return {}
    try:
        delay = hook(error, attempt.message.attempt_in_series)
        seconds = _hook_seconds(delay)
    except Exception as hook_error:
        log.warning("retry_delay_failed", error=_aio.describe(hook_error))
        return {}
    if seconds is False:
        log.warning("retry_delay_ignored", returned=protocol.short_repr(delay, 60))
        return {}
    return {"retry_decided": True, "retry_delay": seconds}


def _hook_seconds(delay: Any) -> float | None | bool:
    """Return a hook's delay in seconds, None to stop, or False if it is not a delay."""
    if delay is None:
        return None
    if isinstance(delay, dt.timedelta):
        return max(delay.total_seconds(), 0.0)
    if isinstance(delay, int | float) and not isinstance(delay, bool):
        return max(float(delay), 0.0)  # float() of a huge int raises OverflowError
    return False


class Prefetch:
    """Keeps the prefetch count at the agent's free slots while attempts are handed over."""

    def __init__(
        self,
        channel: aio_pika.abc.AbstractChannel,
        concurrency: int,
        consume: Callable[[], Awaitable[None]],
        cancel: Callable[[], Awaitable[None]],
    ) -> None:
        self.channel = channel
        self.concurrency = concurrency
        self.consume = consume
        self.cancel = cancel
        self.handed_over = 0
        self.paused = False

    def free_slots(self) -> int:
        """Return how many attempts the agent may start: those not handed over."""
        return self.concurrency - self.handed_over

    async def hold(self) -> None:
        """Take a slot for a handed-over attempt, before its delivery is acknowledged."""
        self.handed_over += 1
        if self.free_slots() >= 1:
            await self.channel.set_qos(prefetch_count=self.free_slots(), global_=True)
        elif not self.paused:
            self.paused = True
            await self.cancel()
            log.info("consuming_paused", handed_over=self.handed_over)

    async def release(self) -> None:
        """Give the slot back once the handed-over attempt has ended."""
        self.handed_over -= 1
        with contextlib.suppress(*_aio.CONNECTION_ERRORS):
            await self.channel.set_qos(
                prefetch_count=self.concurrency - self.handed_over, global_=True
            )
            if self.paused:
                self.paused = False
                await self.consume()
                log.info("consuming_resumed", handed_over=self.handed_over)


def _seconds(value: float) -> str:
    return f"{value:g} s"
