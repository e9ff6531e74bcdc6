"""SQLAlchemy models of the history store.

- ``runs``: one row per run, with its input, status, result or error.
- ``history``: the ordered record of each run: its start, every yielded command, every
  result or error, and its end. At most one result per step, enforced by a partial unique
  index.
- ``attempts``: one row per task attempt that reported back: queue, agent, times, error.
- ``outbox``: messages committed with the history but not yet confirmed by RabbitMQ; the
  engine publishes them after the commit and again after a crash.

Instants are stored as naive UTC and read back as aware UTC datetimes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite makes only INTEGER PRIMARY KEY columns auto-increment.
Identifier = BigInteger().with_variant(Integer, "sqlite")

# History kinds that resolve a step; each step has at most one of them.
RESULT_KINDS = (
    "task_completed",
    "task_failed",
    "child_completed",
    "child_failed",
    "timer_fired",
    "event_delivered",
    "event_timed_out",
    "wait_cancelled",
)
ONE_RESULT_WHERE = "kind IN ({})".format(", ".join(f"'{kind}'" for kind in RESULT_KINDS))
# A run in one of these statuses can still change; the others are final.
ACTIVE_STATUSES = ("running", "paused")
ACTIVE_WHERE = "status IN ('running', 'paused')"


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A datetime column that stores naive UTC and returns aware UTC datetimes."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given for a UTC column")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        # At most one active run per business id; finished runs do not block its reuse.
        Index(
            "uq_runs_active_business_id",
            "business_id",
            unique=True,
            sqlite_where=text(ACTIVE_WHERE),
            postgresql_where=text(ACTIVE_WHERE),
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    workflow: Mapped[str] = mapped_column(String(200), index=True)
    business_id: Mapped[str | None] = mapped_column(String(255), index=True)
    # running, paused, completed, failed or killed
    status: Mapped[str] = mapped_column(String(20), index=True)
    input: Mapped[bytes] = mapped_column(LargeBinary)  # msgpack of [args, kwargs]
    result: Mapped[bytes | None] = mapped_column(LargeBinary)
    error: Mapped[str | None] = mapped_column(Text)  # JSON: type, message, traceback, step...
    # Incremented by every change to the run's history; a cached generator is valid only
    # for the revision it was built at.
    revision: Mapped[int] = mapped_column(Integer, default=0)
    next_step: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # The run and step that started this run as a child workflow.
    parent_id: Mapped[str | None] = mapped_column(String(64), index=True)
    parent_step: Mapped[int | None] = mapped_column(Integer)
    # Event names the workflow waits for now, as ",name,other," for LIKE '%,name,%'.
    waiting_for: Mapped[str | None] = mapped_column(Text)


class HistoryEntry(Base):
    __tablename__ = "history"
    __table_args__ = (
        UniqueConstraint("run_id", "seq"),
        Index(
            "uq_history_one_result_per_step",
            "run_id",
            "step",
            unique=True,
            sqlite_where=text(ONE_RESULT_WHERE),
            postgresql_where=text(ONE_RESULT_WHERE),
        ),
    )

    id: Mapped[int] = mapped_column(Identifier, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    # run_started, task_scheduled, task_dispatched, child_started, child_dispatched,
    # timer_started, event_awaited, one of RESULT_KINDS, event_received, event_handled,
    # result_ignored, task_retry_scheduled, task_retried, task_failed_retried,
    # run_paused, run_resumed, run_killed, run_completed, run_failed, run_retried
    kind: Mapped[str] = mapped_column(String(30))
    step: Mapped[int | None] = mapped_column(Integer)
    decision: Mapped[int | None] = mapped_column(Integer)
    batch: Mapped[int | None] = mapped_column(Integer)  # size of the yielded list, if any
    name: Mapped[str | None] = mapped_column(String(200))
    queue: Mapped[str | None] = mapped_column(String(100))
    attempt: Mapped[int | None] = mapped_column(Integer)
    payload: Mapped[bytes | None] = mapped_column(LargeBinary)  # msgpack: arguments or value
    error: Mapped[str | None] = mapped_column(Text)  # JSON
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    grouping: Mapped[str | None] = mapped_column(String(10))  # "first" in a wait.first()
    fire_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # timers and timeouts
    # JSON of a task step's retry policy, timeout and heartbeat interval.
    options: Mapped[str | None] = mapped_column(Text)


class Timer(Base):
    """A durable timer of a step: at most one row per step, reused by its later timers.

    ``kind`` is ``wait`` for a timer step or an event wait's timeout, ``retry`` for the delay
    before a task's next attempt and ``lease`` for the time by which a running attempt must
    report again. ``detail`` is JSON of the lease's last heartbeat.
    """

    __tablename__ = "timers"
    __table_args__ = (
        UniqueConstraint("run_id", "step"),
        Index("ix_timers_status_fire_at", "status", "fire_at"),
    )

    id: Mapped[int] = mapped_column(Identifier, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    fire_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(20))  # pending, fired or cancelled
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(10), server_default="wait")
    detail: Mapped[str | None] = mapped_column(Text)


class EventRecord(Base):
    """An event sent to a run, kept in arrival order until a wait takes it."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_run_id_status", "run_id", "status"),
        UniqueConstraint("run_id", "message_id"),
    )

    id: Mapped[int] = mapped_column(Identifier, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    payload: Mapped[bytes] = mapped_column(LargeBinary)  # msgpack of the data
    status: Mapped[str] = mapped_column(String(20))  # pending, delivered or handled
    step: Mapped[int | None] = mapped_column(Integer)  # the wait that received it
    # The AMQP message id of the request, so that a redelivered request adds nothing.
    message_id: Mapped[str | None] = mapped_column(String(255))
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Attempt(Base):
    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("run_id", "step", "attempt"),)

    id: Mapped[int] = mapped_column(Identifier, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    task: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20))  # completed or failed
    agent: Mapped[str | None] = mapped_column(String(255))
    queued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)  # when the step was scheduled
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)  # JSON


class OutboxMessage(Base):
    __tablename__ = "outbox"

    # The AMQP message id, such as "<run_id>:<step>:<attempt>" for a task message.
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    exchange: Mapped[str] = mapped_column(String(255))
    routing_key: Mapped[str] = mapped_column(String(255))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    properties: Mapped[str] = mapped_column(Text)  # JSON of AMQP message properties
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
