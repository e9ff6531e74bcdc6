"""The rows that each kind of step writes: history, outbox messages, timers and events.

The processor runs the transactions; these functions add one step's rows to a
:class:`~engine.writer.Writer` and keep the in-memory :class:`~engine.replay.Step` in line
with what is written, so that a cached execution matches the database.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from typing import Any

from sqlalchemy import Connection, Table, select

from engine.replay import HandlerStart, History, Outcome, Step, child_run_id
from engine.store import waits
from engine.store.models import RESULT_KINDS, HistoryEntry
from engine.store.queries import dump_json
from engine.writer import Writer
from zenflow import protocol, serializer, wait
from zenflow.commands import Event

HISTORY: Table = HistoryEntry.__table__  # type: ignore[assignment]

SCHEDULED_KINDS = {
    "task_scheduled": ("task", "execute"),
    "task_dispatched": ("task", "dispatch"),
    "child_started": ("child", "execute"),
    "child_dispatched": ("child", "dispatch"),
    "timer_started": ("timer", "execute"),
    "event_awaited": ("event", "execute"),
}
_SCHEDULED_KIND = {value: key for key, value in SCHEDULED_KINDS.items()}
# History kinds that change a task step's current attempt.
ATTEMPT_KINDS = ("task_retry_scheduled", "task_retried")


def schedule(writer: Writer, step: Step, topology: protocol.Topology) -> None:
    """Record a new step and write what starts it: a task message, a child start, a timer."""
    run = writer.run
    step.scheduled_at = writer.now
    if step.kind == "timer":
        step.fire_at = wait.fire_time(serializer.decode(step.payload), writer.now)
    elif step.kind == "event":
        timeout = serializer.decode(step.payload).get("timeout")
        if timeout is not None:
            step.fire_at = writer.now + dt.timedelta(seconds=timeout)
    writer.append(
        _SCHEDULED_KIND[(step.kind, step.mode)],
        step=step.step,
        decision=step.decision,
        batch=step.batch,
        grouping="first" if step.first else None,
        name=step.name,
        queue=step.queue or None,
        attempt=1 if step.kind == "task" else None,
        payload=step.payload,
        fire_at=step.fire_at,
        options=dump_json(step.options) if step.options is not None else None,
    )
    if step.fire_at is not None:
        writer.defer(
            functools.partial(waits.add_timer, run_id=run.id, step=step.step, fire_at=step.fire_at)
        )
    if step.kind == "task":
        add_task_message(writer, step, topology)
    elif step.kind == "child":
        _add_child_start(writer, step, topology)


def add_task_message(writer: Writer, step: Step, topology: protocol.Topology) -> None:
    """Queue the message of the step's current attempt."""
    run = writer.run
    args, kwargs = serializer.decode(step.payload)
    options = step.options or {}
    message = protocol.TaskMessage(
        run_id=run.id,
        workflow=run.workflow,
        step=step.step,
        attempt=step.attempt,
        task=step.name,
        args=tuple(args),
        kwargs=kwargs,
        retry=options.get("retry"),
        first_attempt=step.first_attempt,
        timeout=options.get("timeout"),
        heartbeat=options.get("heartbeat"),
    )
    writer.add_message(
        message.correlation_id,
        topology.task_queue(step.queue),
        serializer.encode(message.to_body()),
        {
            "correlation_id": message.correlation_id,
            "message_id": message.correlation_id,
            "reply_to": topology.results_queue,
            "type": "task",
            "content_type": protocol.MSGPACK_CONTENT_TYPE,
        },
    )


def _add_child_start(writer: Writer, step: Step, topology: protocol.Topology) -> None:
    """Queue the child's start request; the child reports its end as a result of the step."""
    args, kwargs, business_id = serializer.decode(step.payload)
    child_id = child_run_id(writer.run.id, step.step)
    request = protocol.StartRequest(
        workflow=step.name,
        args=tuple(args),
        kwargs=kwargs,
        run_id=child_id,
        business_id=business_id,
        parent_run_id=writer.run.id,
        parent_step=step.step,
    )
    writer.add_message(
        f"start:{child_id}",
        topology.requests_queue,
        serializer.encode(request.to_body()),
        {"message_id": child_id, "type": "start", "content_type": protocol.MSGPACK_CONTENT_TYPE},
    )


def cancel_wait(writer: Writer, step: Step) -> None:
    """Record that a timer or event wait lost a wait.first(), and cancel its timer."""
    writer.append("wait_cancelled", step=step.step, name=step.name)
    step.outcome = Outcome(True, seq=writer.run.revision, at=writer.now, cancelled=True)
    if step.fire_at is not None:
        writer.defer(functools.partial(waits.cancel_timer, run_id=writer.run.id, step=step.step))


def deliver_event(
    writer: Writer, step: Step, name: str, payload: bytes, received_at: dt.datetime
) -> None:
    """Resolve an event wait with an event, and cancel the wait's timeout."""
    event = {"name": name, "data": serializer.decode(payload), "received_at": received_at}
    writer.append("event_delivered", step=step.step, name=name, payload=serializer.encode(event))
    step.outcome = Outcome(
        True, value=Event(name, event["data"], received_at), seq=writer.run.revision, at=writer.now
    )
    if step.fire_at is not None:
        writer.defer(functools.partial(waits.cancel_timer, run_id=writer.run.id, step=step.step))


def fire_timer(writer: Writer, step: Step) -> None:
    """Resolve a timer step, or time out an event wait."""
    kind = "timer_fired" if step.kind == "timer" else "event_timed_out"
    writer.append(kind, step=step.step, name=step.name or None)
    step.outcome = Outcome(True, seq=writer.run.revision, at=writer.now)


def deliver_pending_events(writer: Writer, steps: list[Step]) -> bool:
    """Give events that arrived earlier to new event waits, oldest first.

    Within a wait.first(), only the first matching wait takes an event: the others are
    cancelled when the workflow resumes, and an event given to them would be lost.
    """
    new_waits = [step for step in steps if step.kind == "event" and step.outcome is None]
    if not new_waits:
        return False
    events = waits.pending_events(writer.connection, writer.run.id)
    if new_waits[0].first:
        # The race goes to the event that arrived first, given to the first wait for it.
        for event in events:
            step = next((step for step in new_waits if event.name in step.event_names), None)
            if step is not None:
                _deliver_kept(writer, step, event)
                return True
        return False
    delivered = False
    for step in new_waits:
        match = next((event for event in events if event.name in step.event_names), None)
        if match is None:
            continue
        events.remove(match)
        _deliver_kept(writer, step, match)
        delivered = True
    return delivered


def _deliver_kept(writer: Writer, step: Step, event: waits.StoredEvent) -> None:
    deliver_event(writer, step, event.name, event.payload, event.received_at)
    # At once, so that a later wait in this transaction does not take the same event.
    waits.mark_delivered(writer.connection, event_id=event.id, step=step.step)


def add_attempt(writer: Writer, result: protocol.TaskResult, step: Step) -> None:
    """Record the attempt that produced ``result``, once per step and attempt number."""
    writer.add_attempt(
        step=result.step,
        attempt=result.attempt,
        task=step.name,
        queue=step.queue,
        status="completed" if result.ok else "failed",
        agent=result.agent[:255] or None,
        queued_at=step.sent_at or step.scheduled_at or writer.now,
        started_at=_from_epoch(result.started_at),
        finished_at=_from_epoch(result.finished_at) or writer.now,
        error=dump_json(result.error) if not result.ok else None,
    )


def add_outcome(writer: Writer, result: protocol.TaskResult, step: Step) -> None:
    """Record the step's result in history and in the step, which the workflow reads."""
    prefix = "child" if step.kind == "child" else "task"
    if result.ok:
        payload = serializer.encode(result.value, name="value")
        writer.append(
            f"{prefix}_completed",
            step=result.step,
            name=step.name,
            queue=step.queue or None,
            attempt=result.attempt if step.kind == "task" else None,
            payload=payload,
        )
        step.outcome = Outcome(True, value=result.value, seq=writer.run.revision, at=writer.now)
    else:
        writer.append(
            f"{prefix}_failed",
            step=result.step,
            name=step.name,
            queue=step.queue or None,
            attempt=result.attempt if step.kind == "task" else None,
            error=dump_json(result.error),
        )
        step.outcome = Outcome(False, error=result.error, seq=writer.run.revision, at=writer.now)


def notify_parent(writer: Writer, topology: protocol.Topology) -> None:
    """Send a finished child run's outcome to its parent as the result of the parent's step."""
    run = writer.run
    if run.parent_id is None or run.parent_step is None:
        return
    error = json.loads(run.error) if run.error else None
    result = protocol.TaskResult(
        run_id=run.parent_id,
        step=run.parent_step,
        attempt=1,
        ok=run.status == "completed",
        value=serializer.decode(run.result) if run.result is not None else None,
        error=None if run.status == "completed" else _child_error(run.id, error),
        agent=f"child run {run.id}",
    )
    message_id = f"finished:{run.id}"
    writer.add_message(
        message_id,
        topology.results_queue,
        serializer.encode(result.to_body()),
        {
            "correlation_id": f"{run.parent_id}:{run.parent_step}:1",
            "message_id": message_id,
            "type": "task_result",
            "content_type": protocol.MSGPACK_CONTENT_TYPE,
        },
    )


def _child_error(child_id: str, error: dict[str, Any] | None) -> dict[str, Any]:
    error = error or {}
    return {
        "type": str(error.get("type", "Error")),
        "message": f"child run {child_id}: {error.get('message', '')}",
        "traceback": str(error.get("traceback", "")),
    }


def waiting_for(history: History) -> str | None:
    """Return the event names that the run's unresolved waits expect, as ",a,b,"."""
    names: list[str] = []
    for step in history.steps.values():
        if step.kind == "event" and step.outcome is None:
            names.extend(name for name in step.event_names if name not in names)
    return f",{','.join(names)}," if names else None


def load_history(connection: Connection, run_id: str) -> History:
    """Read a run's steps and their outcomes, for replay or to check a late result."""
    rows = connection.execute(
        select(
            HISTORY.c.seq,
            HISTORY.c.kind,
            HISTORY.c.step,
            HISTORY.c.decision,
            HISTORY.c.batch,
            HISTORY.c.grouping,
            HISTORY.c.name,
            HISTORY.c.queue,
            HISTORY.c.payload,
            HISTORY.c.error,
            HISTORY.c.fire_at,
            HISTORY.c.created_at,
            HISTORY.c.attempt,
            HISTORY.c.options,
        )
        .where(
            HISTORY.c.run_id == run_id,
            HISTORY.c.kind.in_((*SCHEDULED_KINDS, *RESULT_KINDS, *ATTEMPT_KINDS, "event_handled")),
        )
        .order_by(HISTORY.c.seq)
    )
    history = History()
    for row in rows:
        if row.kind in SCHEDULED_KINDS:
            kind, mode = SCHEDULED_KINDS[row.kind]
            history.add(
                Step(
                    step=row.step,
                    decision=row.decision or 0,
                    mode=mode,  # type: ignore[arg-type]
                    name=row.name or "",
                    queue=row.queue or "",
                    payload=bytes(row.payload or b""),
                    batch=row.batch,
                    scheduled_at=row.created_at,
                    kind=kind,  # type: ignore[arg-type]
                    first=row.grouping == "first",
                    fire_at=row.fire_at,
                    options=json.loads(row.options) if row.options else None,
                )
            )
        elif row.kind in ATTEMPT_KINDS:
            if row.step in history.steps:
                _apply_attempt_row(history.steps[row.step], row)
        elif row.kind == "event_handled":
            data = serializer.decode(row.payload) if row.payload else None
            history.handler_starts.append(HandlerStart(row.seq, row.name, data, row.created_at))
        elif row.step in history.steps:
            history.steps[row.step].outcome = _outcome_of(row)
    return history


def hand_to_handler(writer: Writer, history: History, name: str, payload: bytes) -> None:
    """Record that the workflow's on_event takes an event; the next advance calls it."""
    writer.append("event_handled", name=name, payload=payload)
    start = HandlerStart(writer.run.revision, name, serializer.decode(payload), writer.now)
    history.handler_starts.append(start)


def _apply_attempt_row(step: Step, row: Any) -> None:
    step.attempt = row.attempt or step.attempt
    if row.kind == "task_retry_scheduled":
        step.retry_at = row.fire_at
        return
    step.retry_at = None
    step.sent_at = row.created_at
    if row.grouping == "manual":
        # A manual retry of a failed step: a new series of attempts, and no outcome yet.
        step.first_attempt = step.attempt
        step.outcome = None


def _outcome_of(row: Any) -> Outcome:
    at, seq = row.created_at, row.seq
    if row.kind in ("task_failed", "child_failed"):
        return Outcome(False, error=json.loads(row.error or "{}"), seq=seq, at=at)
    if row.kind == "wait_cancelled":
        return Outcome(True, seq=seq, at=at, cancelled=True)
    value = serializer.decode(row.payload) if row.payload else None
    if row.kind == "event_delivered" and isinstance(value, dict):
        value = Event(value["name"], value["data"], value["received_at"])
    return Outcome(True, value=value, seq=seq, at=at)


def _from_epoch(value: float | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        return dt.datetime.fromtimestamp(value, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None
