"""The engine's transactions: start a run, record a task result, advance the workflow.

Each public method runs one database transaction and returns what must be published once
it has committed. Outgoing task messages are written to the ``outbox`` table in the same
transaction as the history that caused them, so a crash between the commit and the publish
loses nothing: the engine publishes the outbox again when it starts.

These methods are synchronous. The AMQP service runs them in worker threads and takes a
per-run lock first, so that one run is advanced by one thread at a time. On PostgreSQL the run row
is also locked (``SELECT ... FOR UPDATE``) so that several engines can share the database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import threading
from collections.abc import Iterator
from typing import Any

import structlog
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from engine.cache import ExecutionCache
from engine.replay import Execution, History, Outcome, Progress, Step, error_dict
from engine.store.models import RESULT_KINDS, Attempt, HistoryEntry, OutboxMessage, Run
from engine.store.queries import dump_json, find_run, view_run
from zenflow import protocol, serializer
from zenflow.context import RunContext
from zenflow.registry import Registry

log = structlog.get_logger("engine")

SCHEDULED_KINDS = ("task_scheduled", "task_dispatched")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclasses.dataclass
class Effects:
    """Messages to publish, and facts to log, once the transaction has committed."""

    outbox: list[OutboxMessage] = dataclasses.field(default_factory=list)
    finished: dict[str, Any] | None = None  # the run's view, when the run just ended
    run_id: str | None = None
    duplicate: bool = False
    ignored: str | None = None  # why a result changed nothing, if it did not


class Processor:
    """Runs the engine's transactions against the store, using the execution cache."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        registry: Registry,
        cache: ExecutionCache,
        topology: protocol.Topology,
        *,
        lock_rows: bool,
    ) -> None:
        self.sessions = sessions
        self.registry = registry
        self.cache = cache
        self.topology = topology
        self.lock_rows = lock_rows
        self._confirmed: list[int] = []  # outbox ids confirmed by RabbitMQ, not yet deleted
        self._confirmed_lock = threading.Lock()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        """Open a write transaction that also deletes the outbox rows confirmed so far.

        Deleting them here costs no extra commit, and keeps the number of confirmed rows
        that a crash would leave behind (and the engine would publish again) small.
        """
        confirmed = self._take_confirmed()
        try:
            with self.sessions.begin() as session:
                if confirmed:
                    _delete_outbox(session, confirmed)
                yield session
        except BaseException:
            self.confirm_outbox(confirmed)
            raise

    def confirm_outbox(self, ids: list[int]) -> None:
        """Note outbox rows that RabbitMQ confirmed; the next transaction deletes them."""
        with self._confirmed_lock:
            self._confirmed.extend(ids)

    def confirmed_outbox(self) -> set[int]:
        with self._confirmed_lock:
            return set(self._confirmed)

    def _take_confirmed(self) -> list[int]:
        with self._confirmed_lock:
            confirmed, self._confirmed = self._confirmed, []
        return confirmed

    # Starting runs.

    def start_run(self, request: protocol.StartRequest, run_id: str) -> Effects:
        """Create the run, call the workflow up to its first wait, and schedule its steps.

        A run id that already exists is a redelivered or repeated request: nothing changes
        and ``Effects.duplicate`` is set.
        """
        definition = self.registry.workflows[request.workflow]
        effects = Effects(run_id=run_id)
        try:
            with self._write() as session:
                if session.get(Run, run_id) is not None:
                    effects.duplicate = True
                    return effects
                now = utcnow()
                business_id = request.business_id or self._business_id(definition, request)
                run = Run(
                    id=run_id,
                    workflow=request.workflow,
                    business_id=business_id,
                    status="running",
                    input=serializer.encode([list(request.args), request.kwargs], name="input"),
                    revision=0,
                    next_step=1,
                    created_at=now,
                    updated_at=now,
                )
                session.add(run)
                # The models declare no relationships, so the run row must reach the
                # database before the rows whose foreign keys refer to it.
                session.flush()
                self._append(session, run, "run_started", payload=run.input)
                context = RunContext(run_id, request.workflow, business_id)
                execution = Execution(definition, context, request.args, request.kwargs)
                progress = execution.advance()
                self._apply(session, run, execution, progress, effects)
        except IntegrityError as error:
            # Another engine inserted the same run id between our check and our insert.
            if not self._run_exists(run_id):
                raise
            log.debug("start_raced", error=str(error))
            return Effects(run_id=run_id, duplicate=True)
        self._keep(run_id, execution, effects)
        return effects

    def _run_exists(self, run_id: str) -> bool:
        with self.sessions() as session:
            return session.get(Run, run_id) is not None

    def _business_id(self, definition: Any, request: protocol.StartRequest) -> str | None:
        try:
            instance = definition.instantiate(request.args, request.kwargs)
            business_id = instance.id() if instance is not None else None
        except Exception:
            # The execution instantiates the workflow again and fails the run with the error.
            return None
        if business_id is None:
            return None
        text = str(business_id)
        return text[: protocol.MAX_BUSINESS_ID_LENGTH]

    # Recording results.

    def record_result(self, result: protocol.TaskResult) -> Effects:
        """Record a task attempt's outcome and advance the run if the workflow waits for it."""
        try:
            return self._record_result(result)
        except BaseException:
            # The cached generator may have advanced past what the database now holds.
            self.cache.discard(result.run_id)
            raise

    def _record_result(self, result: protocol.TaskResult) -> Effects:
        effects = Effects(run_id=result.run_id)
        execution: Execution | None = None
        with self._write() as session:
            run = self._lock_run(session, result.run_id)
            if run is None:
                effects.ignored = "unknown run"
                return effects
            scheduled = session.scalars(
                select(HistoryEntry).where(
                    HistoryEntry.run_id == run.id,
                    HistoryEntry.step == result.step,
                    HistoryEntry.kind.in_(SCHEDULED_KINDS),
                )
            ).first()
            if scheduled is None:
                effects.ignored = f"run {run.id} has no step {result.step}"
                return effects
            now = utcnow()
            self._update_attempt(session, run, result, scheduled, now)
            if self._has_result(session, run.id, result.step):
                effects.duplicate = True
                self._append(
                    session,
                    run,
                    "result_ignored",
                    step=result.step,
                    name=scheduled.name,
                    attempt=result.attempt,
                    error=dump_json({"reason": "the step already has a result"}),
                )
                return effects
            revision_before = run.revision
            outcome = self._outcome(result)
            self._append(
                session,
                run,
                "task_completed" if outcome.ok else "task_failed",
                step=result.step,
                name=scheduled.name,
                queue=scheduled.queue,
                attempt=result.attempt,
                payload=serializer.encode(outcome.value, name="value") if outcome.ok else None,
                error=dump_json(outcome.error),
            )
            if scheduled.kind == "task_dispatched" or run.status != "running":
                if run.status != "running":
                    effects.ignored = f"run is {run.status}"
                run.updated_at = now
                return effects
            execution = self._execution_for(session, run, revision_before)
            if execution is None:
                effects.finished = view_run(run).to_dict()
                return effects
            if result.step in execution.history.steps:
                execution.record_outcome(result.step, outcome)
            progress = execution.advance()
            self._apply(session, run, execution, progress, effects)
        if execution is not None:
            self._keep(run.id, execution, effects)
        return effects

    def _outcome(self, result: protocol.TaskResult) -> Outcome:
        if result.ok:
            return Outcome(True, value=result.value)
        return Outcome(False, error=result.error)

    def _has_result(self, session: Session, run_id: str, step: int) -> bool:
        statement = select(HistoryEntry.id).where(
            HistoryEntry.run_id == run_id,
            HistoryEntry.step == step,
            HistoryEntry.kind.in_(RESULT_KINDS),
        )
        return session.scalars(statement).first() is not None

    def _update_attempt(
        self,
        session: Session,
        run: Run,
        result: protocol.TaskResult,
        scheduled: HistoryEntry,
        now: dt.datetime,
    ) -> None:
        attempt = session.scalars(
            select(Attempt).where(
                Attempt.run_id == run.id,
                Attempt.step == result.step,
                Attempt.attempt == result.attempt,
            )
        ).first()
        if attempt is None:
            attempt = Attempt(
                run_id=run.id,
                step=result.step,
                attempt=result.attempt,
                task=scheduled.name or "",
                queue=scheduled.queue or "",
                status="queued",
                queued_at=now,
            )
            session.add(attempt)
        if attempt.status != "queued":
            return  # a redelivered result for an attempt that is already recorded
        attempt.status = "completed" if result.ok else "failed"
        attempt.agent = result.agent[:255] or None
        attempt.started_at = _from_epoch(result.started_at)
        attempt.finished_at = _from_epoch(result.finished_at) or now
        attempt.error = dump_json(result.error)

    def _execution_for(self, session: Session, run: Run, revision: int) -> Execution | None:
        """Return the cached execution if it matches ``revision``, else rebuild it by replay."""
        execution = self.cache.get(run.id)
        if execution is not None and execution.revision == revision:
            return execution
        self.cache.discard(run.id)
        definition = self.registry.workflows.get(run.workflow)
        if definition is None:
            known = ", ".join(sorted(self.registry.workflows)) or "none"
            self._finish_failed(
                session,
                run,
                {
                    "type": "DefinitionError",
                    "message": (
                        f"workflow {run.workflow} is not registered in this engine (registered: "
                        f"{known}); start the engine with the module that defines it"
                    ),
                },
            )
            return None
        args, kwargs = serializer.decode(run.input)
        context = RunContext(run.id, run.workflow, run.business_id)
        return Execution(definition, context, tuple(args), kwargs, self._load_history(session, run))

    def _load_history(self, session: Session, run: Run) -> History:
        entries = session.scalars(
            select(HistoryEntry)
            .where(
                HistoryEntry.run_id == run.id,
                HistoryEntry.kind.in_(SCHEDULED_KINDS + RESULT_KINDS),
            )
            .order_by(HistoryEntry.seq)
        )
        history = History()
        for entry in entries:
            assert entry.step is not None
            if entry.kind in SCHEDULED_KINDS:
                history.add(
                    Step(
                        step=entry.step,
                        decision=entry.decision or 0,
                        mode="dispatch" if entry.kind == "task_dispatched" else "execute",
                        name=entry.name or "",
                        queue=entry.queue or "",
                        payload=entry.payload or b"",
                        batch=entry.batch,
                    )
                )
            elif entry.step in history.steps:
                if entry.kind == "task_completed":
                    value = serializer.decode(entry.payload) if entry.payload else None
                    outcome = Outcome(True, value=value)
                else:
                    outcome = Outcome(False, error=json.loads(entry.error or "{}"))
                history.steps[entry.step].outcome = outcome
        return history

    # Writing progress.

    def _apply(
        self,
        session: Session,
        run: Run,
        execution: Execution,
        progress: Progress,
        effects: Effects,
    ) -> None:
        now = utcnow()
        for step in progress.new_steps:
            self._schedule(session, run, step, now, effects)
        run.next_step = execution.next_step
        run.updated_at = now
        finished = progress.finished
        if finished is not None:
            if finished.status == "completed":
                run.status = "completed"
                run.result = finished.result
                run.finished_at = now
                self._append(session, run, "run_completed", payload=finished.result)
                effects.finished = view_run(run).to_dict()
            else:
                assert finished.error is not None
                self._finish_failed(session, run, finished.error)
                effects.finished = view_run(run).to_dict()
        execution.revision = run.revision

    def _schedule(
        self, session: Session, run: Run, step: Step, now: dt.datetime, effects: Effects
    ) -> None:
        kind = "task_dispatched" if step.mode == "dispatch" else "task_scheduled"
        self._append(
            session,
            run,
            kind,
            step=step.step,
            decision=step.decision,
            batch=step.batch,
            name=step.name,
            queue=step.queue,
            attempt=1,
            payload=step.payload,
        )
        session.add(
            Attempt(
                run_id=run.id,
                step=step.step,
                attempt=1,
                task=step.name,
                queue=step.queue,
                status="queued",
                queued_at=now,
            )
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
        outbox = OutboxMessage(
            run_id=run.id,
            exchange="",
            routing_key=self.topology.task_queue(step.queue),
            body=serializer.encode(message.to_body()),
            properties=json.dumps(
                {
                    "correlation_id": message.correlation_id,
                    "message_id": message.correlation_id,
                    "reply_to": self.topology.results_queue,
                    "type": "task",
                    "content_type": protocol.MSGPACK_CONTENT_TYPE,
                }
            ),
            created_at=now,
        )
        session.add(outbox)
        effects.outbox.append(outbox)

    def _finish_failed(self, session: Session, run: Run, error: dict[str, Any]) -> None:
        now = utcnow()
        run.status = "failed"
        run.error = dump_json(error)
        run.finished_at = now
        run.updated_at = now
        self._append(session, run, "run_failed", step=error.get("step"), error=run.error)

    def _append(self, session: Session, run: Run, kind: str, **fields: Any) -> None:
        run.revision += 1
        session.add(
            HistoryEntry(run_id=run.id, seq=run.revision, kind=kind, created_at=utcnow(), **fields)
        )

    def _lock_run(self, session: Session, run_id: str) -> Run | None:
        statement = select(Run).where(Run.id == run_id)
        if self.lock_rows:
            statement = statement.with_for_update()
        return session.scalars(statement).first()

    def _keep(self, run_id: str, execution: Execution, effects: Effects) -> None:
        if execution.finished is not None or effects.finished is not None:
            self.cache.discard(run_id)
        else:
            self.cache.put(run_id, execution)

    # Outbox.

    def pending_outbox(self, limit: int = 1000, after_id: int = 0) -> list[OutboxMessage]:
        """Return outbox messages left by an earlier process, oldest first."""
        with self.sessions.begin() as session:
            statement = (
                select(OutboxMessage)
                .where(OutboxMessage.id > after_id)
                .order_by(OutboxMessage.id)
                .limit(limit)
            )
            return list(session.scalars(statement))

    def flush_confirmed_outbox(self) -> int:
        """Delete the outbox rows confirmed since the last transaction; return how many."""
        confirmed = self._take_confirmed()
        if not confirmed:
            return 0
        try:
            with self.sessions.begin() as session:
                _delete_outbox(session, confirmed)
        except BaseException:
            self.confirm_outbox(confirmed)
            raise
        return len(confirmed)

    # Engine-side failures.

    def fail_run(self, run_id: str, error: BaseException) -> dict[str, Any] | None:
        """Mark a run failed after an unexpected engine error; return its view if it changed."""
        self.cache.discard(run_id)
        with self.sessions.begin() as session:
            run = self._lock_run(session, run_id)
            if run is None or run.status != "running":
                return None
            details = error_dict(error)
            details["type"] = f"EngineError: {details['type']}"
            self._finish_failed(session, run, details)
            return view_run(run).to_dict()

    def get_run(self, run_id: str | None, business_id: str | None) -> dict[str, Any] | None:
        with self.sessions() as session:
            run = find_run(session, run_id, business_id=business_id)
            return None if run is None else view_run(run).to_dict()


def _delete_outbox(session: Session, ids: list[int]) -> None:
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(chunk)))


def _from_epoch(value: float | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        return dt.datetime.fromtimestamp(value, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None
