"""Read access to runs, history and attempts, for the engine's replies and for the CLI."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from engine.store.models import ACTIVE_STATUSES, Attempt, HistoryEntry, Run, Timer
from zenflow import serializer
from zenflow.errors import SerializationError

FINISHED_STATUSES = ("completed", "failed", "killed")


@dataclasses.dataclass(frozen=True)
class RunView:
    """A run as shown to users: decoded input, result and error."""

    run_id: str
    workflow: str
    business_id: str | None
    status: str
    args: list[Any]
    kwargs: dict[str, Any]
    result: Any
    error: dict[str, Any] | None
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    steps: int
    parent_id: str | None = None
    waiting_for: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "business_id": self.business_id,
            "status": self.status,
            "args": self.args,
            "kwargs": self.kwargs,
            "result": self.result,
            "error": self.error,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "steps": self.steps,
            "parent_id": self.parent_id,
            "waiting_for": self.waiting_for,
        }


class RunRow(Protocol):
    """The run columns that :func:`view_run` reads: a ``Run`` or the engine's ``RunState``."""

    id: str
    workflow: str
    business_id: str | None
    status: str
    input: bytes
    result: bytes | None
    error: str | None
    next_step: int
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    parent_id: str | None
    waiting_for: str | None


def view_run(run: RunRow) -> RunView:
    args, kwargs = _decode_or_text(run.input, default=[[], {}])
    return RunView(
        run_id=run.id,
        workflow=run.workflow,
        business_id=run.business_id,
        status=run.status,
        args=args,
        kwargs=kwargs,
        result=None if run.result is None else _decode_or_text(run.result),
        error=load_json(run.error),
        created_at=run.created_at,
        updated_at=run.updated_at,
        finished_at=run.finished_at,
        steps=run.next_step - 1,
        parent_id=run.parent_id,
        waiting_for=[name for name in (run.waiting_for or "").split(",") if name],
    )


def find_run(
    session: Session, reference: str | None, *, business_id: str | None = None
) -> Run | None:
    """Return the run with run id ``reference``, or else the one with that business id.

    A business id names its active (running or paused) run, or else its most recent run.
    """
    if reference is not None:
        run = session.get(Run, reference)
        if run is not None:
            return run
    key = business_id if business_id is not None else reference
    if key is None:
        return None
    statement = (
        select(Run)
        .where(Run.business_id == key)
        .order_by(Run.status.in_(ACTIVE_STATUSES).desc(), Run.created_at.desc())
        .limit(1)
    )
    return session.scalars(statement).first()


def list_runs(
    session: Session,
    *,
    status: str | None = None,
    workflow: str | None = None,
    business_id: str | None = None,
    waiting_for: str | None = None,
    parent_id: str | None = None,
    limit: int = 50,
) -> list[Run]:
    """Return the newest runs that match every filter given."""
    statement = select(Run).order_by(Run.created_at.desc(), Run.id).limit(limit)
    if status is not None:
        statement = statement.where(Run.status == status)
    if workflow is not None:
        statement = statement.where(Run.workflow == workflow)
    if business_id is not None:
        statement = statement.where(Run.business_id == business_id)
    if waiting_for is not None:
        # LIKE ignores case in SQLite, and event names are case-sensitive.
        needle = f",{waiting_for},"
        dialect = session.get_bind().dialect.name
        position = func.instr if dialect == "sqlite" else func.strpos
        statement = statement.where(position(Run.waiting_for, needle) > 0)
    if parent_id is not None:
        statement = statement.where(Run.parent_id == parent_id)
    return list(session.scalars(statement))


def history_of(session: Session, run_id: str) -> list[HistoryEntry]:
    statement = select(HistoryEntry).where(HistoryEntry.run_id == run_id).order_by(HistoryEntry.seq)
    return list(session.scalars(statement))


def attempts_of(session: Session, run_id: str) -> list[Attempt]:
    statement = (
        select(Attempt).where(Attempt.run_id == run_id).order_by(Attempt.step, Attempt.attempt)
    )
    return list(session.scalars(statement))


def timers_of(session: Session, run_id: str) -> list[Timer]:
    """Return the run's timer rows: waits, retry delays and leases, one per step."""
    return list(session.scalars(select(Timer).where(Timer.run_id == run_id).order_by(Timer.step)))


def load_json(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    loaded = json.loads(text)
    return loaded if isinstance(loaded, dict) else {"message": str(loaded)}


def dump_json(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, default=str)


def _decode_or_text(data: bytes, default: Any = None) -> Any:
    try:
        return serializer.decode(data)
    except SerializationError as error:
        return default if default is not None else f"<undecodable: {error}>"
