"""The engine's transactions: start a run, record a task result, advance the workflow.

Each public method runs one database transaction and returns what must be published once
it has committed. Outgoing task messages are written to the ``outbox`` table in the same
transaction as the history that caused them, so a crash between the commit and the publish
loses nothing: the engine publishes the outbox again when it starts.

These methods are synchronous. The AMQP service runs them in worker threads and takes a
per-run lock first, so that one run is advanced by one thread at a time. On PostgreSQL the
run row is also locked (``SELECT ... FOR UPDATE``) so that several engines can share the
database.

A step of a cached run reads only the run row: the cached execution holds the run's steps
and their outcomes, and its revision proves they match the database.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, Table, select
from sqlalchemy.exc import IntegrityError

from engine.cache import ExecutionCache
from engine.replay import Execution, History, Outcome, Progress, Step, error_dict
from engine.store.models import RESULT_KINDS, HistoryEntry, OutboxMessage
from engine.store.queries import dump_json, find_run, view_run
from engine.writer import OutgoingMessage, RunState, Sql, StaleRun, Writer, delete_outbox
from zenflow import protocol, serializer
from zenflow.context import RunContext
from zenflow.errors import DefinitionError
from zenflow.registry import Registry, WorkflowDefinition

log = structlog.get_logger("engine")

SCHEDULED_KINDS = ("task_scheduled", "task_dispatched")

HISTORY: Table = HistoryEntry.__table__  # type: ignore[assignment]
OUTBOX: Table = OutboxMessage.__table__  # type: ignore[assignment]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclasses.dataclass
class Effects:
    """Messages to publish, and facts to log, once the transaction has committed."""

    outbox: list[OutgoingMessage] = dataclasses.field(default_factory=list)
    finished: dict[str, Any] | None = None  # the run's view, when the run just ended
    run_id: str | None = None
    duplicate: bool = False
    ignored: str | None = None  # why a result changed nothing, if it did not


class Processor:
    """Runs the engine's transactions against the store, using the execution cache."""

    def __init__(
        self,
        database: Engine,
        registry: Registry,
        cache: ExecutionCache,
        topology: protocol.Topology,
        *,
        lock_rows: bool,
    ) -> None:
        self.database = database
        self.registry = registry
        self.cache = cache
        self.topology = topology
        self.lock_rows = lock_rows
        self.sql = Sql(database.dialect.name)
        self._confirmed: list[str] = []  # outbox ids confirmed by RabbitMQ, not yet deleted
        self._confirmed_lock = threading.Lock()

    # Starting runs.

    def start_run(self, request: protocol.StartRequest, run_id: str) -> Effects:
        """Create the run, call the workflow up to its first wait, and schedule its steps.

        A run id that already exists is a redelivered or repeated request: nothing changes
        and ``Effects.duplicate`` is set.
        """
        try:
            return self._start_run(request, run_id)
        except IntegrityError:
            # Another engine inserted the same run id between the check and the insert.
            if self.get_run(run_id, None) is None:
                raise
            return Effects(run_id=run_id, duplicate=True)

    def _start_run(self, request: protocol.StartRequest, run_id: str) -> Effects:
        definition = self.registry.workflows[request.workflow]
        effects = Effects(run_id=run_id)
        with self.database.begin() as connection:
            if RunState.load(connection, self.sql, run_id, lock=False) is not None:
                effects.duplicate = True
                return effects
            now = utcnow()
            failure: dict[str, Any] | None = None
            try:
                business_id = request.business_id or _business_id(definition, request)
            except BaseException as error:  # user code; see Execution._step
                business_id, failure = None, error_dict(error)
            run = RunState(
                id=run_id,
                workflow=request.workflow,
                business_id=business_id,
                status="running",
                input=serializer.encode([list(request.args), request.kwargs], name="input"),
                result=None,
                error=None,
                revision=0,
                next_step=1,
                created_at=now,
                updated_at=now,
                finished_at=None,
            )
            writer = Writer(connection, self.sql, run, now, new=True)
            writer.append("run_started", payload=run.input)
            execution: Execution | None = None
            if failure is not None:
                self._fail(writer, failure)
                effects.finished = view_run(run).to_dict()
            else:
                context = RunContext(run_id, request.workflow, business_id)
                execution = Execution(definition, context, request.args, request.kwargs)
                self._apply(writer, execution, execution.advance(), effects)
            effects.outbox = writer.flush()
        self._keep(run, execution, effects)
        return effects

    # Recording results.

    def record_result(self, result: protocol.TaskResult) -> Effects:
        """Record a task attempt's outcome and advance the run if the workflow waits for it.

        A cached run is advanced without reading its row first: the final update of the
        row checks that its revision is still the cached one. If another engine changed
        the run meanwhile, the transaction is rolled back and done again from the database.
        """
        try:
            try:
                return self._record_result(result, trust_cache=True)
            except StaleRun:
                self.cache.discard(result.run_id)
                return self._record_result(result, trust_cache=False)
        except BaseException:
            # The cached generator may have advanced past what the database now holds.
            self.cache.discard(result.run_id)
            raise

    def _record_result(self, result: protocol.TaskResult, *, trust_cache: bool) -> Effects:
        effects = Effects(run_id=result.run_id)
        with self.database.begin() as connection:
            found = self._run_for_result(connection, result, trust_cache=trust_cache)
            if found is None:
                effects.ignored = "unknown run"
                return effects
            run, execution, history = found
            step = history.steps.get(result.step)
            if step is None:
                if execution is not None and execution.run_state is not None and trust_cache:
                    # Another engine may have scheduled the step: read the database.
                    raise StaleRun(f"run {run.id} has no step {result.step} in the cache")
                effects.ignored = f"run {run.id} has no step {result.step}"
                return effects

            writer = Writer(connection, self.sql, run, utcnow(), new=False)
            _add_attempt(writer, result, step)
            if step.outcome is not None:
                effects.duplicate = True
                writer.append(
                    "result_ignored",
                    step=result.step,
                    name=step.name,
                    attempt=result.attempt,
                    error=dump_json({"reason": "the step already has a result"}),
                )
                return self._finish_transaction(writer, execution, effects)

            _add_outcome(writer, result, step)
            if step.mode == "dispatch":
                # Recorded for the timeline; the workflow does not wait for it.
                return self._finish_transaction(writer, execution, effects)
            if run.status != "running":
                effects.ignored = f"recorded, but the run is {run.status} and does not advance"
                return self._finish_transaction(writer, execution, effects)

            if execution is None:
                execution = self._rebuild(writer, history, effects)
                if execution is None:
                    effects.outbox = writer.flush()
                    return effects
            self._apply(writer, execution, execution.advance(), effects)
            effects.outbox = writer.flush()
        self._keep(run, execution, effects)
        return effects

    def _run_for_result(
        self, connection: Connection, result: protocol.TaskResult, *, trust_cache: bool
    ) -> tuple[RunState, Execution | None, History] | None:
        """Return the run, its cached execution if still valid, and its history.

        With ``trust_cache``, a cached run is not read from the database; the final update
        of its row checks the revision instead. Returns None for an unknown run.
        """
        execution = self.cache.get(result.run_id)
        if trust_cache and execution is not None and execution.run_state is not None:
            return dataclasses.replace(execution.run_state), execution, execution.history
        run = RunState.load(connection, self.sql, result.run_id, lock=self.lock_rows)
        if run is None:
            return None
        if execution is not None and execution.revision == run.revision:
            return run, execution, execution.history
        self.cache.discard(run.id)
        return run, None, _load_history(connection, run.id)

    def _finish_transaction(
        self, writer: Writer, execution: Execution | None, effects: Effects
    ) -> Effects:
        """Flush a transaction that does not advance the workflow, keeping the cache valid."""
        effects.outbox = writer.flush()
        if execution is not None:
            execution.revision = writer.run.revision
            execution.run_state = dataclasses.replace(writer.run)
        return effects

    def _rebuild(self, writer: Writer, history: History, effects: Effects) -> Execution | None:
        """Return a new execution that replays ``history``; fail the run if it cannot."""
        run = writer.run
        definition = self.registry.workflows.get(run.workflow)
        if definition is None:
            known = ", ".join(sorted(self.registry.workflows)) or "none"
            self._fail(
                writer,
                {
                    "type": "DefinitionError",
                    "message": (
                        f"workflow {run.workflow} is not registered in this engine (registered: "
                        f"{known}); start the engine with the module that defines it"
                    ),
                },
            )
            effects.finished = view_run(run).to_dict()
            return None
        args, kwargs = serializer.decode(run.input)
        context = RunContext(run.id, run.workflow, run.business_id)
        return Execution(definition, context, tuple(args), kwargs, history)

    # Writing progress.

    def _apply(
        self, writer: Writer, execution: Execution, progress: Progress, effects: Effects
    ) -> None:
        run = writer.run
        for step in progress.new_steps:
            self._schedule(writer, step)
        run.next_step = execution.next_step
        finished = progress.finished
        if finished is not None:
            if finished.status == "completed":
                run.status = "completed"
                run.result = finished.result
                run.finished_at = writer.now
                writer.append("run_completed", payload=finished.result)
            else:
                assert finished.error is not None
                self._fail(writer, finished.error)
            effects.finished = view_run(run).to_dict()
        execution.revision = run.revision

    def _schedule(self, writer: Writer, step: Step) -> None:
        run = writer.run
        step.scheduled_at = writer.now
        writer.append(
            "task_dispatched" if step.mode == "dispatch" else "task_scheduled",
            step=step.step,
            decision=step.decision,
            batch=step.batch,
            name=step.name,
            queue=step.queue,
            attempt=1,
            payload=step.payload,
        )
        args, kwargs = serializer.decode(step.payload)
        message = protocol.TaskMessage(
            run_id=run.id,
            workflow=run.workflow,
            step=step.step,
            attempt=1,
            task=step.name,
            args=tuple(args),
            kwargs=kwargs,
        )
        writer.add_message(
            message.correlation_id,
            self.topology.task_queue(step.queue),
            serializer.encode(message.to_body()),
            {
                "correlation_id": message.correlation_id,
                "message_id": message.correlation_id,
                "reply_to": self.topology.results_queue,
                "type": "task",
                "content_type": protocol.MSGPACK_CONTENT_TYPE,
            },
        )

    def _fail(self, writer: Writer, error: dict[str, Any]) -> None:
        run = writer.run
        run.status = "failed"
        run.error = dump_json(error)
        run.finished_at = writer.now
        writer.append("run_failed", step=error.get("step"), error=run.error)

    def _keep(self, run: RunState, execution: Execution | None, effects: Effects) -> None:
        """Cache a running execution with a copy of its run row, as committed."""
        if execution is None or execution.finished is not None or effects.finished is not None:
            self.cache.discard(run.id)
        else:
            execution.run_state = dataclasses.replace(run)
            self.cache.put(run.id, execution)

    # Outbox.

    def confirm_outbox(self, ids: list[str]) -> None:
        """Note outbox rows that RabbitMQ confirmed; :meth:`flush_confirmed_outbox` deletes them."""
        with self._confirmed_lock:
            self._confirmed.extend(ids)

    def confirmed_outbox(self) -> set[str]:
        with self._confirmed_lock:
            return set(self._confirmed)

    def flush_confirmed_outbox(self) -> int:
        """Delete the outbox rows confirmed so far; return how many."""
        with self._confirmed_lock:
            confirmed, self._confirmed = self._confirmed, []
        if not confirmed:
            return 0
        try:
            with self.database.begin() as connection:
                delete_outbox(connection, self.sql, confirmed)
        except BaseException:
            self.confirm_outbox(confirmed)
            raise
        return len(confirmed)

    def pending_outbox(self, limit: int = 1000, after_id: str = "") -> list[OutgoingMessage]:
        """Return outbox messages not deleted yet, by id, with their creation time."""
        with self.database.connect() as connection:
            rows = connection.execute(
                select(OUTBOX).where(OUTBOX.c.id > after_id).order_by(OUTBOX.c.id).limit(limit)
            )
            return [
                OutgoingMessage(
                    id=row.id,
                    run_id=row.run_id,
                    exchange=row.exchange,
                    routing_key=row.routing_key,
                    body=row.body,
                    properties=json.loads(row.properties),
                    created_at=row.created_at,
                )
                for row in rows
            ]

    # Engine-side failures and queries.

    def fail_run(self, run_id: str, error: BaseException) -> dict[str, Any] | None:
        """Mark a run failed after an unexpected engine error; return its view if it changed."""
        self.cache.discard(run_id)
        with self.database.begin() as connection:
            run = RunState.load(connection, self.sql, run_id, lock=self.lock_rows)
            if run is None or run.status != "running":
                return None
            writer = Writer(connection, self.sql, run, utcnow(), new=False)
            details = error_dict(error)
            details["type"] = f"EngineError: {details['type']}"
            self._fail(writer, details)
            writer.flush()
            return view_run(run).to_dict()

    def get_run(self, run_id: str | None, business_id: str | None) -> dict[str, Any] | None:
        from sqlalchemy.orm import Session

        with Session(self.database) as session:
            run = find_run(session, run_id, business_id=business_id)
            return None if run is None else view_run(run).to_dict()


def _add_attempt(writer: Writer, result: protocol.TaskResult, step: Step) -> None:
    """Record the attempt that produced ``result``, once per step and attempt number."""
    writer.add_attempt(
        step=result.step,
        attempt=result.attempt,
        task=step.name,
        queue=step.queue,
        status="completed" if result.ok else "failed",
        agent=result.agent[:255] or None,
        queued_at=step.scheduled_at or writer.now,
        started_at=_from_epoch(result.started_at),
        finished_at=_from_epoch(result.finished_at) or writer.now,
        error=dump_json(result.error),
    )


def _add_outcome(writer: Writer, result: protocol.TaskResult, step: Step) -> None:
    """Record the step's result in history and in the step, which the workflow reads."""
    if result.ok:
        step.outcome = Outcome(True, value=result.value)
        payload = serializer.encode(result.value, name="value")
    else:
        step.outcome = Outcome(False, error=result.error)
        payload = None
    writer.append(
        "task_completed" if result.ok else "task_failed",
        step=result.step,
        name=step.name,
        queue=step.queue,
        attempt=result.attempt,
        payload=payload,
        error=dump_json(result.error) if not result.ok else None,
    )


def _load_history(connection: Connection, run_id: str) -> History:
    """Read a run's steps and their outcomes, for replay or to check a late result."""
    rows = connection.execute(
        select(
            HISTORY.c.kind,
            HISTORY.c.step,
            HISTORY.c.decision,
            HISTORY.c.batch,
            HISTORY.c.name,
            HISTORY.c.queue,
            HISTORY.c.payload,
            HISTORY.c.error,
            HISTORY.c.created_at,
        )
        .where(HISTORY.c.run_id == run_id, HISTORY.c.kind.in_(SCHEDULED_KINDS + RESULT_KINDS))
        .order_by(HISTORY.c.seq)
    )
    history = History()
    for kind, step, decision, batch, name, queue, payload, error, created_at in rows:
        if kind in SCHEDULED_KINDS:
            history.add(
                Step(
                    step=step,
                    decision=decision or 0,
                    mode="dispatch" if kind == "task_dispatched" else "execute",
                    name=name or "",
                    queue=queue or "",
                    payload=payload or b"",
                    batch=batch,
                    scheduled_at=created_at,
                )
            )
        elif step in history.steps:
            if kind == "task_completed":
                value = serializer.decode(payload) if payload else None
                history.steps[step].outcome = Outcome(True, value=value)
            else:
                history.steps[step].outcome = Outcome(False, error=json.loads(error or "{}"))
    return history


def _business_id(definition: WorkflowDefinition, request: protocol.StartRequest) -> str | None:
    """Return the business id from the workflow's ``id()``, if it defines one.

    Raises:
        DefinitionError: ``id()`` returned something else than a usable id text.
        BaseException: whatever the workflow's ``__init__`` or ``id()`` raised.
    """
    instance = definition.instantiate(request.args, request.kwargs)
    business_id = instance.id() if instance is not None else None
    if business_id is None:
        return None
    problem = protocol.text_problem(business_id, protocol.MAX_BUSINESS_ID_LENGTH)
    if problem is not None:
        raise DefinitionError(f"{definition.name}.id() returned a business id that {problem}")
    return str(business_id)


def _from_epoch(value: float | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        return dt.datetime.fromtimestamp(value, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None
