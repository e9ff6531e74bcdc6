"""Timers and events in the history store: the durable half of a workflow's waits.

A timer row stores a step's fire instant. The engine's timer loop claims due rows (status
``pending`` to ``fired``) inside the transaction that records the step's result, so a timer
fires once even with several engines. An event row keeps an event that arrived for a run
until a wait for its name takes it, in arrival order.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from sqlalchemy import Connection, Table, insert, select, update

from engine.store.models import ACTIVE_STATUSES, EventRecord, HistoryEntry, Run, Timer

TIMERS: Table = Timer.__table__  # type: ignore[assignment]
EVENTS: Table = EventRecord.__table__  # type: ignore[assignment]
RUNS: Table = Run.__table__  # type: ignore[assignment]
HISTORY: Table = HistoryEntry.__table__  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class DueTimer:
    id: int
    run_id: str
    step: int
    fire_at: dt.datetime
    kind: str = "wait"  # wait, retry or lease
    detail: str | None = None  # JSON of a lease's last heartbeat


@dataclasses.dataclass(frozen=True)
class StoredEvent:
    id: int
    name: str
    payload: bytes
    received_at: dt.datetime


def add_timer(connection: Connection, *, run_id: str, step: int, fire_at: dt.datetime) -> None:
    connection.execute(
        insert(TIMERS).values(
            run_id=run_id,
            step=step,
            fire_at=fire_at,
            status="pending",
            created_at=dt.datetime.now(dt.UTC),
        )
    )


def set_timer(
    connection: Connection,
    *,
    run_id: str,
    step: int,
    fire_at: dt.datetime,
    kind: str,
    detail: str | None = None,
) -> None:
    """Set the step's timer, reusing its row: a task step's retries and leases share one."""
    values = {"fire_at": fire_at, "status": "pending", "kind": kind, "detail": detail}
    result = connection.execute(
        update(TIMERS).where(TIMERS.c.run_id == run_id, TIMERS.c.step == step).values(**values)
    )
    if not result.rowcount:
        connection.execute(
            insert(TIMERS).values(
                run_id=run_id, step=step, created_at=dt.datetime.now(dt.UTC), **values
            )
        )


def cancel_timer(connection: Connection, *, run_id: str, step: int) -> None:
    connection.execute(
        update(TIMERS)
        .where(TIMERS.c.run_id == run_id, TIMERS.c.step == step, TIMERS.c.status == "pending")
        .values(status="cancelled")
    )


def cancel_timers(connection: Connection, *, run_id: str, keep_tasks: bool = False) -> int:
    """Cancel the pending timers of a run, but with ``keep_tasks`` not those of its tasks'
    retries and leases; return how many."""
    statement = update(TIMERS).where(TIMERS.c.run_id == run_id, TIMERS.c.status == "pending")
    if keep_tasks:
        statement = statement.where(TIMERS.c.kind.not_in(("retry", "lease")))
    result = connection.execute(statement.values(status="cancelled"))
    return int(result.rowcount)


def claim_timer(connection: Connection, timer_id: int, fire_at: dt.datetime) -> bool:
    """Mark a pending timer fired; False if it was fired, cancelled or moved meanwhile.

    A heartbeat moves a lease's fire time forward; such a timer is no longer due.
    """
    result = connection.execute(
        update(TIMERS)
        .where(TIMERS.c.id == timer_id, TIMERS.c.status == "pending", TIMERS.c.fire_at == fire_at)
        .values(status="fired")
    )
    return bool(result.rowcount)


def due_timers(connection: Connection, now: dt.datetime, limit: int) -> list[DueTimer]:
    rows = connection.execute(
        select(
            TIMERS.c.id,
            TIMERS.c.run_id,
            TIMERS.c.step,
            TIMERS.c.fire_at,
            TIMERS.c.kind,
            TIMERS.c.detail,
        )
        .where(TIMERS.c.status == "pending", TIMERS.c.fire_at <= now)
        .order_by(TIMERS.c.fire_at, TIMERS.c.id)
        .limit(limit)
    )
    return [
        DueTimer(row.id, row.run_id, row.step, row.fire_at, row.kind or "wait", row.detail)
        for row in rows
    ]


def event_seen(connection: Connection, run_id: str, message_id: str) -> bool:
    """Return whether the run already stored an event with this request message id."""
    row = connection.execute(
        select(EVENTS.c.id).where(EVENTS.c.run_id == run_id, EVENTS.c.message_id == message_id)
    )
    return row.first() is not None


def add_event(
    connection: Connection,
    *,
    run_id: str,
    name: str,
    payload: bytes,
    message_id: str | None,
    received_at: dt.datetime,
    step: int | None,
    status: str | None = None,
) -> None:
    """Store an event: delivered to ``step``, handled by on_event, or else pending."""
    if status is None:
        status = "pending" if step is None else "delivered"
    connection.execute(
        insert(EVENTS).values(
            run_id=run_id,
            name=name,
            payload=payload,
            status=status,
            step=step,
            message_id=message_id,
            received_at=received_at,
        )
    )


def pending_events(connection: Connection, run_id: str) -> list[StoredEvent]:
    """Return the run's events that no wait took yet, oldest first."""
    rows = connection.execute(
        select(EVENTS.c.id, EVENTS.c.name, EVENTS.c.payload, EVENTS.c.received_at)
        .where(EVENTS.c.run_id == run_id, EVENTS.c.status == "pending")
        .order_by(EVENTS.c.id)
    )
    return [StoredEvent(row.id, row.name, bytes(row.payload), row.received_at) for row in rows]


def mark_delivered(connection: Connection, *, event_id: int, step: int | None) -> None:
    """Mark an event taken: by the wait ``step``, or by on_event when ``step`` is None."""
    status = "handled" if step is None else "delivered"
    connection.execute(
        update(EVENTS).where(EVENTS.c.id == event_id).values(status=status, step=step)
    )


def active_children(connection: Connection, run_id: str) -> list[str]:
    rows = connection.execute(
        select(RUNS.c.id).where(RUNS.c.parent_id == run_id, RUNS.c.status.in_(ACTIVE_STATUSES))
    )
    return [row.id for row in rows]


def active_run_with_business_id(connection: Connection, business_id: str) -> tuple[str, str] | None:
    """Return the id and status of the active run with ``business_id``, if any."""
    row = connection.execute(
        select(RUNS.c.id, RUNS.c.status).where(
            RUNS.c.business_id == business_id, RUNS.c.status.in_(ACTIVE_STATUSES)
        )
    ).first()
    return None if row is None else (row.id, row.status)


def resolve_run_id(connection: Connection, reference: str) -> str | None:
    """Return the run id that ``reference`` names: a run id, else a business id."""
    row: Any = connection.execute(select(RUNS.c.id).where(RUNS.c.id == reference)).first()
    if row is not None:
        return str(row.id)
    return run_with_business_id(connection, reference)


def run_with_business_id(connection: Connection, business_id: str) -> str | None:
    """Return the active run with ``business_id``, or else its most recent run."""
    row: Any = connection.execute(
        select(RUNS.c.id)
        .where(RUNS.c.business_id == business_id)
        .order_by(RUNS.c.status.in_(ACTIVE_STATUSES).desc(), RUNS.c.created_at.desc())
        .limit(1)
    ).first()
    return None if row is None else str(row.id)


def mark_result_retried(connection: Connection, *, run_id: str, step: int) -> None:
    """Keep a failed task result in history, but as one that a manual retry replaced."""
    connection.execute(
        update(HISTORY)
        .where(
            HISTORY.c.run_id == run_id,
            HISTORY.c.step == step,
            HISTORY.c.kind == "task_failed",
        )
        .values(kind="task_failed_retried")
    )
