"""The SQL of a step: read the run row, then write the step's rows in a few statements.

A step of a run writes a result, the next commands, an attempt, outbox messages and the run
row. :class:`Writer` collects these rows while the workflow advances and writes them with
one statement per table. The statements are plain SQL run with
``Connection.exec_driver_sql``, because this is the engine's hot path: on the benchmark
machine, building and compiling the same statements with SQLAlchemy Core took more time
than the database spent executing them. Everything else (replay, the CLI) uses the
SQLAlchemy models.

The SQL is written once with ``:name`` parameters and converted to the driver's style
(sqlite3 ``:name``, psycopg ``%(name)s``). Instants are written as SQLAlchemy's
``DateTime`` columns store them: naive UTC, as text in SQLite.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

COLUMNS = (
    "id",
    "workflow",
    "business_id",
    "status",
    "input",
    "result",
    "error",
    "revision",
    "next_step",
    "created_at",
    "updated_at",
    "finished_at",
    "parent_id",
    "parent_step",
    "waiting_for",
)
HISTORY_COLUMNS = (
    "run_id",
    "seq",
    "kind",
    "step",
    "decision",
    "batch",
    "name",
    "queue",
    "attempt",
    "payload",
    "error",
    "created_at",
    "grouping",
    "fire_at",
    "options",
)
ATTEMPT_COLUMNS = (
    "run_id",
    "step",
    "attempt",
    "task",
    "queue",
    "status",
    "agent",
    "queued_at",
    "started_at",
    "finished_at",
    "error",
)
OUTBOX_COLUMNS = ("id", "run_id", "exchange", "routing_key", "body", "properties", "created_at")
# The run columns that change after the run is created.
CHANGING_COLUMNS = (
    "status",
    "result",
    "error",
    "revision",
    "next_step",
    "updated_at",
    "finished_at",
    "waiting_for",
)
_TIME_COLUMNS = frozenset(
    {"created_at", "updated_at", "finished_at", "queued_at", "started_at", "fire_at"}
)


def _insert(table: str, columns: tuple[str, ...], suffix: str = "") -> str:
    names = ", ".join(columns)
    values = ", ".join(f":{column}" for column in columns)
    return f"INSERT INTO {table} ({names}) VALUES ({values}){suffix}"


class MultiRowInsert:
    """An INSERT of several rows in one statement: one round trip, one driver call.

    Parameters are named ``column__index``. Rows are sent in chunks of ``CHUNK`` so that a
    statement stays far below SQLite's and PostgreSQL's limits on bound parameters.
    """

    CHUNK = 500

    def __init__(self, table: str, columns: tuple[str, ...], suffix: str = "") -> None:
        self.table = table
        self.columns = columns
        self.suffix = suffix
        self._by_count: dict[int, str] = {}

    def statements(self, rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        """Return ``(sql, parameters)`` pairs that insert ``rows``."""
        result = []
        for start in range(0, len(rows), self.CHUNK):
            chunk = rows[start : start + self.CHUNK]
            parameters = {
                f"{column}__{index}": row[column]
                for index, row in enumerate(chunk)
                for column in self.columns
            }
            result.append((self._sql(len(chunk)), parameters))
        return result

    def _sql(self, count: int) -> str:
        sql = self._by_count.get(count)
        if sql is None:
            tuples = ", ".join(
                "(" + ", ".join(f":{column}__{index}" for column in self.columns) + ")"
                for index in range(count)
            )
            sql = f"INSERT INTO {self.table} ({', '.join(self.columns)}) VALUES {tuples}"
            sql += self.suffix
            self._by_count[count] = sql
        return sql


SELECT_RUN = f"SELECT {', '.join(COLUMNS)} FROM runs WHERE id = :id"
INSERT_RUN = _insert("runs", COLUMNS)
# The revision check makes the update fail when another engine changed the run since it
# was read (or since it was cached).
UPDATE_RUN = (
    f"UPDATE runs SET {', '.join(f'{column} = :{column}' for column in CHANGING_COLUMNS)} "
    "WHERE id = :id AND revision = :expected_revision"
)
INSERT_HISTORY = MultiRowInsert("history", HISTORY_COLUMNS)
# A redelivered result repeats an attempt that is already recorded.
INSERT_ATTEMPT = MultiRowInsert(
    "attempts", ATTEMPT_COLUMNS, " ON CONFLICT (run_id, step, attempt) DO NOTHING"
)
INSERT_OUTBOX = MultiRowInsert("outbox", OUTBOX_COLUMNS)
DELETE_OUTBOX = "DELETE FROM outbox WHERE id = :id"

_PARAMETER = re.compile(r":(\w+)")


class StaleRun(Exception):
    """The run row's revision is no longer the one this transaction started from."""


class Sql:
    """The statements and value conversions for one database dialect."""

    def __init__(self, dialect: str) -> None:
        self.sqlite = dialect == "sqlite"
        self._cache: dict[str, str] = {}

    def statement(self, sql: str) -> str:
        """Convert ``:name`` parameters to the driver's style."""
        converted = self._cache.get(sql)
        if converted is None:
            converted = sql if self.sqlite else _PARAMETER.sub(r"%(\1)s", sql)
            self._cache[sql] = converted
        return converted

    def time_to_db(self, value: dt.datetime | None) -> Any:
        if value is None:
            return None
        naive = value.astimezone(dt.UTC).replace(tzinfo=None)
        # SQLAlchemy's SQLite DateTime stores this text form and parses it back.
        return naive.strftime("%Y-%m-%d %H:%M:%S.%f") if self.sqlite else naive

    def time_from_db(self, value: Any) -> dt.datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        return value.replace(tzinfo=dt.UTC)

    def row_to_db(self, row: dict[str, Any]) -> dict[str, Any]:
        return {
            key: self.time_to_db(value) if key in _TIME_COLUMNS else value
            for key, value in row.items()
        }


@dataclasses.dataclass
class OutgoingMessage:
    """An outbox row: a message to publish once its transaction has committed."""

    id: str
    run_id: str
    exchange: str
    routing_key: str
    body: bytes
    properties: dict[str, Any]
    created_at: dt.datetime | None = None


@dataclasses.dataclass
class RunState:
    """The columns of a run row that a transaction reads and changes."""

    id: str
    workflow: str
    business_id: str | None
    status: str
    input: bytes
    result: bytes | None
    error: str | None
    revision: int
    next_step: int
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    parent_id: str | None = None
    parent_step: int | None = None
    waiting_for: str | None = None

    @property
    def active(self) -> bool:
        return self.status in ("running", "paused")

    @classmethod
    def load(cls, connection: Connection, sql: Sql, run_id: str, *, lock: bool) -> RunState | None:
        """Read the run row, locking it (``SELECT ... FOR UPDATE``) when ``lock`` is set."""
        statement = SELECT_RUN + " FOR UPDATE" if lock else SELECT_RUN
        row = connection.exec_driver_sql(sql.statement(statement), {"id": run_id}).first()
        if row is None:
            return None
        values = dict(zip(COLUMNS, row, strict=True))
        for name in ("created_at", "updated_at", "finished_at"):
            values[name] = sql.time_from_db(values[name])
        for name in ("input", "result"):
            if isinstance(values[name], memoryview):
                values[name] = bytes(values[name])
        return cls(**values)


class Writer:
    """Rows written by one transaction for one run, flushed with one statement per table."""

    def __init__(
        self, connection: Connection, sql: Sql, run: RunState, now: dt.datetime, *, new: bool
    ) -> None:
        self.connection = connection
        self.sql = sql
        self.run = run
        self.now = now
        self.new = new
        self.expected_revision = run.revision
        self.history: list[dict[str, Any]] = []
        self.attempts: list[dict[str, Any]] = []
        self.outbox: list[OutgoingMessage] = []
        self.deferred: list[Callable[[Connection], Any]] = []

    def defer(self, statement: Callable[[Connection], Any]) -> None:
        """Run ``statement`` (timers, events) after the run row is written, in this order."""
        self.deferred.append(statement)

    def append(self, kind: str, **fields: Any) -> None:
        """Add a history entry; its sequence number is the run's next revision."""
        self.run.revision += 1
        row = dict.fromkeys(HISTORY_COLUMNS)
        row.update(run_id=self.run.id, seq=self.run.revision, kind=kind, created_at=self.now)
        row.update(fields)
        self.history.append(row)

    def add_attempt(self, **fields: Any) -> None:
        row = dict.fromkeys(ATTEMPT_COLUMNS)
        row.update(run_id=self.run.id, **fields)
        self.attempts.append(row)

    def add_message(
        self, message_id: str, routing_key: str, body: bytes, properties: dict[str, Any]
    ) -> None:
        self.outbox.append(
            OutgoingMessage(
                id=message_id,
                run_id=self.run.id,
                exchange="",
                routing_key=routing_key,
                body=body,
                properties=properties,
                created_at=self.now,
            )
        )

    def flush(self) -> list[OutgoingMessage]:
        """Write every collected row and the run; return the outbox messages to publish."""
        sql = self.sql
        statements: list[tuple[str, Any]] = []
        self.run.updated_at = self.now
        # Not dataclasses.asdict, which deep-copies every value.
        run_values = {name: getattr(self.run, name) for name in COLUMNS}
        if self.new:
            # The run row goes first: history, attempts and outbox rows refer to it.
            statements.append((INSERT_RUN, sql.row_to_db(run_values)))
            self.new = False
        else:
            changed = {name: run_values[name] for name in (*CHANGING_COLUMNS, "id")}
            changed["expected_revision"] = self.expected_revision
            statements.append((UPDATE_RUN, sql.row_to_db(changed)))
        if self.history:
            rows = [sql.row_to_db(row) for row in self.history]
            statements.extend(INSERT_HISTORY.statements(rows))
        if self.attempts:
            rows = [sql.row_to_db(row) for row in self.attempts]
            statements.extend(INSERT_ATTEMPT.statements(rows))
        messages = self.outbox
        if messages:
            rows = [
                {
                    "id": message.id,
                    "run_id": message.run_id,
                    "exchange": message.exchange,
                    "routing_key": message.routing_key,
                    "body": message.body,
                    "properties": json.dumps(message.properties),
                    "created_at": sql.time_to_db(message.created_at),
                }
                for message in messages
            ]
            statements.extend(INSERT_OUTBOX.statements(rows))
        if self._execute(statements) == 0:
            raise StaleRun(f"run {self.run.id} changed since revision {self.expected_revision}")
        for statement in self.deferred:
            statement(self.connection)
        self.expected_revision = self.run.revision
        self.history, self.attempts, self.outbox, self.deferred = [], [], [], []
        return messages

    def _execute(self, statements: list[tuple[str, Any]]) -> int:
        """Run the statements and return the row count of the first one (the run's row)."""
        if self.sql.sqlite:
            counts = [
                self.connection.exec_driver_sql(self.sql.statement(statement), parameters).rowcount
                for statement, parameters in statements
            ]
            return counts[0]
        # psycopg's pipeline mode sends every statement and waits once for all results,
        # which saves a network round trip per statement.
        driver = self.connection.connection.driver_connection
        assert driver is not None
        current = ""
        # The first statement gets a cursor of its own, which keeps its row count. Both
        # cursors stay open until the pipeline has received every result.
        first, rest = driver.cursor(), driver.cursor()
        try:
            with driver.pipeline():
                for index, (statement, parameters) in enumerate(statements):
                    current = self.sql.statement(statement)
                    (first if index == 0 else rest).execute(current, parameters)
            return first.rowcount
        except psycopg.Error as error:
            if first.rowcount == 0:
                # The run changed under a stale cache: the inserts that followed the update
                # collide with the other engine's history rows, so that error is secondary.
                return 0
            # Raise what SQLAlchemy would, so callers handle one family of errors.
            raise DBAPIError.instance(current, None, error, psycopg.Error) from error
        finally:
            first.close()
            rest.close()


def delete_outbox(connection: Connection, sql: Sql, ids: list[str]) -> None:
    if ids:
        connection.exec_driver_sql(sql.statement(DELETE_OUTBOX), [{"id": id_} for id_ in ids])
