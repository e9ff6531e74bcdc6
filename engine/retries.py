"""Task attempts: the retry decision, the delay before the next attempt, and leases.

A task step runs one attempt at a time. When an attempt fails, :func:`next_delay` applies
the step's retry policy (recorded with the step) and what the agent reported (an error that
must not be retried, or the delay that the task's ``retry_delay`` hook chose). A retry is a
durable timer of kind ``retry``; when it fires, :func:`start_attempt` sends the next attempt.
Only when no retry is left does the failure reach the workflow.

An agent that runs an attempt for a long time sends heartbeats, and each one moves the step's
timer of kind ``lease`` forward. If the lease runs out, the engine counts the attempt as lost
(``TaskLeaseExpired``) and retries it like any failure, without waiting for RabbitMQ to
notice a dead agent.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from typing import Any

from engine import steps
from engine.replay import History, Step
from engine.store import waits
from engine.store.queries import dump_json
from engine.writer import Writer
from zenflow import protocol
from zenflow.errors import DefinitionError
from zenflow.retry import MAX_DELAY, NO_RETRY, Retry

# Errors that the engine itself reports for an attempt.
LEASE_EXPIRED = "TaskLeaseExpired"
# Errors that no retry can fix, whatever the policy: a message that kept killing its agents,
# and one that the agent could not decode.
FINAL_ERRORS = frozenset({"PoisonMessage", "InvalidTaskMessage"})


def policy_of(step: Step) -> Retry:
    """Return the step's recorded retry policy; a step recorded without one is not retried."""
    fields = (step.options or {}).get("retry")
    if not isinstance(fields, dict):
        return NO_RETRY
    try:
        return Retry.from_wire(fields)
    except DefinitionError:
        return NO_RETRY


def next_delay(
    step: Step, error: dict[str, Any], result: protocol.TaskResult | None = None
) -> dt.timedelta | None:
    """Return the delay before the step's next attempt, or None if the failure is final."""
    policy = policy_of(step)
    attempt = step.attempt - step.first_attempt + 1
    if attempt >= policy.attempts:
        return None
    if result is not None and result.non_retryable:
        return None
    if error.get("type") in FINAL_ERRORS:
        return None
    names = {str(name).rpartition(".")[2] for name in policy.non_retryable}
    if str(error.get("type", "")) in names:
        # The agent matches classes and their bases; this catches errors that the engine
        # or an older agent reported by name only.
        return None
    if result is not None and result.retry_decided:
        seconds = result.retry_delay
        if seconds is None:
            return None
        if not math.isfinite(seconds):
            return policy.delay(attempt)
        return dt.timedelta(seconds=min(max(seconds, 0.0), MAX_DELAY.total_seconds()))
    return policy.delay(attempt)


def schedule_retry(writer: Writer, step: Step, error: dict[str, Any], delay: dt.timedelta) -> None:
    """Record the failed attempt and the time of the next one, and set the step's timer."""
    retry_at = writer.now + delay
    writer.append(
        "task_retry_scheduled",
        step=step.step,
        name=step.name,
        queue=step.queue or None,
        attempt=step.attempt,
        error=dump_json(error),
        fire_at=retry_at,
    )
    step.retry_at = retry_at
    writer.defer(
        functools.partial(
            waits.set_timer, run_id=writer.run.id, step=step.step, fire_at=retry_at, kind="retry"
        )
    )


def start_attempt(
    writer: Writer, step: Step, topology: protocol.Topology, *, manual: bool = False
) -> None:
    """Send the step's next attempt; a manual retry starts a new series of attempts."""
    step.attempt += 1
    if manual:
        step.first_attempt = step.attempt
    step.retry_at = None
    step.sent_at = writer.now
    writer.append(
        "task_retried",
        step=step.step,
        name=step.name,
        queue=step.queue or None,
        attempt=step.attempt,
        grouping="manual" if manual else None,
    )
    steps.add_task_message(writer, step, topology)


def start_due_attempts(writer: Writer, history: History, topology: protocol.Topology) -> None:
    """Start the retries that fell due while the run was paused, and cancel their timers."""
    for step in history.steps.values():
        due = step.retry_at is not None and step.retry_at <= writer.now
        if step.kind == "task" and step.outcome is None and due:
            start_attempt(writer, step, topology)
            writer.defer(
                functools.partial(waits.cancel_timer, run_id=writer.run.id, step=step.step)
            )


def lost_attempt(step: Step, detail: dict[str, Any] | None) -> dict[str, Any]:
    """Describe an attempt whose lease ran out."""
    agent = (detail or {}).get("agent") or "its agent"
    beat = (detail or {}).get("heartbeat_at") or "unknown"
    return {
        "type": LEASE_EXPIRED,
        "message": (
            f"attempt {step.attempt} of task {step.name} was lost: {agent} stopped sending "
            f"heartbeats (last at {beat}) and its lease ran out"
        ),
        "traceback": "",
    }
