"""The transactions shared by the engine's processor: load a run, advance it, finish it.

Each transaction reads the run row (locked on PostgreSQL), the cached execution if its
revision still matches, else the history, and writes the run's new rows through a
:class:`~engine.writer.Writer`. :mod:`engine.processor` and :mod:`engine.control` build their
requests on these.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
from collections.abc import Iterator
from typing import Any

import structlog
from sqlalchemy import Connection, Engine

from engine import steps
from engine.cache import ExecutionCache
from engine.outbox import Outbox
from engine.replay import Execution, History, Progress, error_dict
from engine.store import waits
from engine.store.queries import dump_json, find_run, view_run
from engine.writer import OutgoingMessage, RunState, Sql, Writer
from zenflow import protocol, serializer
from zenflow.context import RunContext
from zenflow.errors import ZenflowError
from zenflow.registry import Registry

log = structlog.get_logger("engine")


class RequestError(ZenflowError):
    """A request that the engine cannot carry out, with a code for the error reply."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


@dataclasses.dataclass
class Effects:
    """Messages to publish, and facts to log, once the transaction has committed."""

    outbox: list[OutgoingMessage] = dataclasses.field(default_factory=list)
    finished: dict[str, Any] | None = None  # the run's view, when the run just ended
    run_id: str | None = None
    duplicate: bool = False
    ignored: str | None = None  # why a result changed nothing, if it did not
    existing: bool = False  # a start returned the active run that has its business id
    retry_in: float | None = None  # a failed attempt will be retried after these seconds
    retried: int | None = None  # the attempt that a retry timer started
    lost: int | None = None  # the attempt whose lease ran out
    reply: dict[str, Any] = dataclasses.field(default_factory=dict)  # fields of an ok reply


class Transactions:
    """Runs the engine's transactions against the store, using the execution cache."""

    def __init__(
        self,
        database: Engine,
        registry: Registry,
        cache: ExecutionCache,
        topology: protocol.Topology,
        *,
        lock_rows: bool,
        clock_offset: float = 0.0,
    ) -> None:
        self.database = database
        self.registry = registry
        self.cache = cache
        self.topology = topology
        self.lock_rows = lock_rows
        # Added to the clock of every transaction, so that tests can move time forward.
        self.clock_offset = dt.timedelta(seconds=clock_offset)
        self.sql = Sql(database.dialect.name)
        self.outbox = Outbox(database, self.sql)

    def now(self) -> dt.datetime:
        """Return the engine's current time: the system clock plus ``clock_offset``."""
        return dt.datetime.now(dt.UTC) + self.clock_offset

    # Transactions.

    @contextlib.contextmanager
    def _discarding_on_error(self, run_id: str | None) -> Iterator[None]:
        """Drop the run's cached execution if the transaction fails: it may be ahead."""
        try:
            yield
        except BaseException:
            if run_id is not None:
                self.cache.discard(run_id)
            raise

    def resolve(self, target: protocol.RunTarget) -> str:
        """Return the id of the run that ``target`` names.

        Raises:
            RequestError: no run has that id or business id.
        """
        with self.database.connect() as connection:
            return self._resolve(connection, target)

    def _resolve(self, connection: Connection, target: protocol.RunTarget) -> str:
        """Find the run as ``get_run`` does: by run id, else by business id."""
        run_id: str | None
        if target.run_id is not None and self._exists(connection, target.run_id):
            run_id = target.run_id
        elif target.business_id is not None:
            run_id = waits.run_with_business_id(connection, target.business_id)
        else:
            # A run id that no run has is looked up as a business id too.
            run_id = waits.resolve_run_id(connection, target.run_id or target.text)
        if run_id is None:
            raise RequestError(
                "run_not_found", f"no run has the id or business id {target.text!r}", "run_id"
            )
        return run_id

    def _exists(self, connection: Connection, run_id: str) -> bool:
        return RunState.load(connection, self.sql, run_id, lock=False) is not None

    def _load_run(
        self, connection: Connection, run_id: str
    ) -> tuple[RunState, Execution | None, History] | None:
        """Read and lock the run row; return it with its valid cached execution, or history."""
        run = RunState.load(connection, self.sql, run_id, lock=self.lock_rows)
        if run is None:
            return None
        execution = self.cache.get(run_id)
        if execution is not None and execution.revision == run.revision:
            return run, execution, execution.history
        self.cache.discard(run_id)
        return run, None, steps.load_history(connection, run_id)

    def _advance(
        self, writer: Writer, execution: Execution | None, history: History, effects: Effects
    ) -> Execution | None:
        """Advance a running workflow after a change to its history."""
        if writer.run.status != "running":
            writer.run.waiting_for = steps.waiting_for(history)
            return execution
        if execution is None:
            execution = self._rebuild(writer, history, effects)
            if execution is None:
                return None
        self._apply(writer, execution, execution.advance(), effects)
        return execution

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
        return self._load_run(connection, result.run_id)

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
            self._finished(writer, effects)
            return None
        args, kwargs = serializer.decode(run.input)
        context = RunContext(run.id, run.workflow, run.business_id)
        return Execution(
            definition, context, tuple(args), kwargs, history, started_at=run.created_at
        )

    # Writing progress.

    def _apply(
        self, writer: Writer, execution: Execution, progress: Progress, effects: Effects
    ) -> None:
        run = writer.run
        while True:
            for step in progress.new_steps:
                steps.schedule(writer, step, self.topology)
            for step in progress.cancelled:
                steps.cancel_wait(writer, step)
            if progress.finished is not None:
                break
            # Events that arrived before the wait resolve it at once.
            if not steps.deliver_pending_events(writer, progress.new_steps):
                break
            progress = execution.advance()
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
            has_timers = any(
                step.fire_at is not None
                or step.retry_at is not None
                or step.attempt > 1
                or step.leased
                for step in execution.history.steps.values()
            )
            self._finished(writer, effects, has_timers=has_timers)
        else:
            run.waiting_for = steps.waiting_for(execution.history)
        execution.revision = run.revision

    def _finished(self, writer: Writer, effects: Effects, *, has_timers: bool = True) -> None:
        """Close a run that just ended: cancel its timers and tell its parent.

        ``has_timers`` False skips the update of the timers table, for a run that never set
        one: the common case, on the path of every run's last step.
        """
        run = writer.run
        run.waiting_for = None
        if has_timers:
            # A task's retry or lease goes on after a normal end, for the tasks that the
            # workflow dispatched or that lost a race. A kill stops everything.
            writer.defer(
                functools.partial(
                    waits.cancel_timers, run_id=run.id, keep_tasks=run.status != "killed"
                )
            )
        steps.notify_parent(writer, self.topology)
        effects.finished = view_run(run).to_dict()

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
            execution.revision = run.revision
            execution.run_state = dataclasses.replace(run)
            self.cache.put(run.id, execution)

    # Engine-side failures and queries.

    def fail_run(self, run_id: str, error: BaseException) -> dict[str, Any] | None:
        """Mark a run failed after an unexpected engine error; return its view if it changed."""
        self.cache.discard(run_id)
        with self.database.begin() as connection:
            run = RunState.load(connection, self.sql, run_id, lock=self.lock_rows)
            if run is None or not run.active:
                return None
            writer = Writer(connection, self.sql, run, self.now(), new=False)
            details = error_dict(error)
            details["type"] = f"EngineError: {details['type']}"
            self._fail(writer, details)
            effects = Effects(run_id=run_id)
            self._finished(writer, effects)
            writer.flush()
            return effects.finished

    def get_run(self, run_id: str | None, business_id: str | None) -> dict[str, Any] | None:
        from sqlalchemy.orm import Session

        with Session(self.database) as session:
            run = find_run(session, run_id, business_id=business_id)
            return None if run is None else view_run(run).to_dict()
