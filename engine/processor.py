"""The engine's transactions: start runs, record results, fire timers, deliver events,
control runs, and advance workflows.

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

import contextlib
import dataclasses
import datetime as dt
import functools
from collections.abc import Iterator
from typing import Any

import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError

from engine import steps
from engine.cache import ExecutionCache
from engine.outbox import Outbox
from engine.replay import Execution, History, Progress, Step, child_run_id, error_dict
from engine.store import waits
from engine.store.queries import dump_json, find_run, view_run
from engine.writer import OutgoingMessage, RunState, Sql, StaleRun, Writer
from zenflow import protocol, serializer
from zenflow.context import RunContext
from zenflow.errors import DefinitionError, ZenflowError
from zenflow.registry import Registry, WorkflowDefinition

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
    reply: dict[str, Any] = dataclasses.field(default_factory=dict)  # fields of an ok reply


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

    # Starting runs.

    def start_run(self, request: protocol.StartRequest, run_id: str) -> Effects:
        """Create the run, call the workflow up to its first wait, and schedule its steps.

        A run id that already exists is a redelivered or repeated request: nothing changes
        and ``Effects.duplicate`` is set.
        """
        try:
            return self._start_run(request, run_id)
        except IntegrityError:
            # Another engine inserted the same run id, or a run with the same business id,
            # between the check and the insert. The second attempt finds that run.
            if self.get_run(run_id, None) is not None:
                return Effects(run_id=run_id, duplicate=True)
            return self._start_run(request, run_id)

    def _start_run(self, request: protocol.StartRequest, run_id: str) -> Effects:
        definition = self.registry.workflows[request.workflow]
        effects = Effects(run_id=run_id)
        with self.database.begin() as connection:
            existing = RunState.load(connection, self.sql, run_id, lock=False)
            if existing is not None:
                if request.parent_run_id is not None and (
                    existing.parent_id != request.parent_run_id
                ):
                    # Another request took the child's derived run id first: the parent
                    # must not wait for a run that is not its child.
                    raise RequestError(
                        "run_id_taken",
                        f"run id {run_id} already belongs to a run that is not a child of "
                        f"run {request.parent_run_id}",
                        "run_id",
                    )
                effects.duplicate = True
                return effects
            now = self.now()
            failure: dict[str, Any] | None = None
            try:
                business_id = request.business_id or _business_id(definition, request)
            except BaseException as error:  # user code; see Execution._step
                business_id, failure = None, error_dict(error)
            if request.parent_run_id is not None:
                self._check_parent(connection, request, run_id)
            if business_id is not None:
                holder = waits.active_run_with_business_id(connection, business_id)
                if holder is not None:
                    return _business_id_taken(request, business_id, *holder)
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
                parent_id=request.parent_run_id,
                parent_step=request.parent_step,
            )
            writer = Writer(connection, self.sql, run, now, new=True)
            writer.append(
                "run_started",
                payload=run.input,
                name=request.parent_run_id,
                step=request.parent_step,
            )
            execution: Execution | None = None
            if failure is not None:
                self._fail(writer, failure)
                self._finished(writer, effects, has_timers=False)
            else:
                context = RunContext(run_id, request.workflow, business_id)
                execution = Execution(
                    definition, context, request.args, request.kwargs, started_at=now
                )
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

            if step.kind not in ("task", "child"):
                effects.ignored = f"step {result.step} of run {run.id} is a {step.kind}"
                return effects
            writer = Writer(connection, self.sql, run, self.now(), new=False)
            if step.kind == "task":
                steps.add_attempt(writer, result, step)
            if step.outcome is not None or run.status == "killed":
                reason = "the step already has a result"
                if step.outcome is None:
                    reason = "the run was killed"
                    effects.ignored = reason
                else:
                    effects.duplicate = True
                writer.append(
                    "result_ignored",
                    step=result.step,
                    name=step.name,
                    attempt=result.attempt,
                    error=dump_json({"reason": reason}),
                )
                return self._finish_transaction(writer, execution, effects)

            steps.add_outcome(writer, result, step)
            if step.mode == "dispatch":
                # Recorded for the timeline; the workflow does not wait for it.
                return self._finish_transaction(writer, execution, effects)
            if run.status != "running":
                effects.ignored = f"recorded, but the run is {run.status} and does not advance"
                return self._finish_transaction(writer, execution, effects)

            execution = self._advance(writer, execution, history, effects)
            effects.outbox = writer.flush()
        self._keep(run, execution, effects)
        return effects

    def fail_child_start(self, request: protocol.StartRequest, reason: str) -> Effects:
        """Fail the parent's child step when the child's start request was rejected.

        The request must name a child step of the parent that starts this workflow under
        this run id, so a forged start cannot fail another run's step. A step that already has
        a result keeps it, because record_result ignores a second one.
        """
        parent_id, step = request.parent_run_id, request.parent_step
        assert parent_id is not None and step is not None
        effects = Effects(run_id=parent_id)
        with self.database.connect() as connection:
            found = self._load_run(connection, parent_id)
        if found is None:
            effects.ignored = f"the parent run {parent_id} does not exist"
            return effects
        target = found[2].steps.get(step)
        expected = child_run_id(parent_id, step)
        if (
            target is None
            or target.kind != "child"
            or target.name != request.workflow
            or request.run_id != expected
        ):
            effects.ignored = f"run {parent_id} has no child step {step} for this start"
            return effects
        failure = protocol.TaskResult(
            run_id=parent_id,
            step=step,
            attempt=1,
            ok=False,
            error={
                "type": "ChildNotStarted",
                "message": f"child workflow {request.workflow} did not start: {reason}",
                "traceback": "",
            },
            agent=f"child run {expected}",
        )
        return self.record_result(failure)

    # Timers, events and run control.

    def fire_timer(self, timer: waits.DueTimer) -> Effects:
        """Fire a due timer: resolve its step and advance the run, once across engines."""
        effects = Effects(run_id=timer.run_id)
        with self._discarding_on_error(timer.run_id), self.database.begin() as connection:
            found = self._load_run(connection, timer.run_id)
            if not waits.claim_timer(connection, timer.id):
                effects.ignored = "the timer was fired or cancelled meanwhile"
                return effects
            if found is None or not found[0].active:
                effects.ignored = "the run has finished"
                return effects
            run, execution, history = found
            step = history.steps.get(timer.step)
            if step is None or step.outcome is not None:
                effects.ignored = f"step {timer.step} already has a result"
                return effects
            writer = Writer(connection, self.sql, run, self.now(), new=False)
            steps.fire_timer(writer, step)
            execution = self._advance(writer, execution, history, effects)
            effects.outbox = writer.flush()
        self._keep(run, execution, effects)
        return effects

    def due_timers(self, limit: int = 200) -> list[waits.DueTimer]:
        with self.database.connect() as connection:
            return waits.due_timers(connection, self.now(), limit)

    def send_event(self, request: protocol.EventRequest, message_id: str | None) -> Effects:
        """Record an event and give it to the run's first wait for its name, if any.

        Without such a wait the event is kept, in order, for the next wait for its name.

        Raises:
            RequestError: the run does not exist or has finished.
        """
        try:
            payload = serializer.encode(request.data, name="data")
        except ZenflowError as error:
            raise RequestError("invalid_field", str(error), "data") from None
        with self.database.begin() as connection:
            run_id = self._resolve(connection, request.target)
        with self._discarding_on_error(run_id), self.database.begin() as connection:
            found = self._load_run(connection, run_id)
            assert found is not None
            run, execution, history = found
            effects = Effects(run_id=run.id, reply={"run_id": run.id})
            # Before the status check: a client sends an event again when its connection
            # broke before the reply, and the first copy may have ended the run.
            if message_id is not None and waits.event_seen(connection, run.id, message_id):
                effects.duplicate = True
                return effects
            _require_active(run, "send an event to")
            writer = Writer(connection, self.sql, run, self.now(), new=False)
            writer.append("event_received", name=request.name, payload=payload)
            target = _first_wait_for(history, request.name)
            # Also while paused, so that on_event calls keep their order with the waits'.
            handled = target is None and self._handles_events(run.workflow)
            waits.add_event(
                connection,
                run_id=run.id,
                name=request.name,
                payload=payload,
                message_id=message_id,
                received_at=writer.now,
                step=None if target is None else target.step,
                status="handled" if handled else None,
            )
            effects.reply["delivered"] = target is not None
            effects.reply["handled"] = handled
            if target is not None:
                steps.deliver_event(writer, target, request.name, payload, writer.now)
            elif handled:
                steps.hand_to_handler(writer, history, request.name, payload)
            if target is not None or handled:
                execution = self._advance(writer, execution, history, effects)
            effects.outbox = writer.flush()
        self._keep(run, execution, effects)
        return effects

    def control(self, request: protocol.ControlRequest) -> Effects:
        """Kill, pause or resume a run.

        NOTE: unlike events, control requests are not deduplicated by message id, so a pause
        or resume delivered again after a crash applies again. Storing the message id with
        the history entry would remove this.

        Raises:
            RequestError: the run does not exist, has finished, or is already in the
                requested state.
        """
        with self.database.begin() as connection:
            run_id = self._resolve(connection, request.target)
        with self._discarding_on_error(run_id), self.database.begin() as connection:
            found = self._load_run(connection, run_id)
            assert found is not None
            run, execution, history = found
            _require_active(run, request.action)
            writer = Writer(connection, self.sql, run, self.now(), new=False)
            effects = Effects(run_id=run.id)
            reason = request.reason
            if reason is not None:
                reason = "".join(char if char.isprintable() else "?" for char in reason)
            control = {"by": request.by, "reason": reason}
            if request.action == "kill":
                self._kill(writer, control, effects)
                if execution is not None:
                    execution.close()
                execution = None
            elif request.action == "pause":
                if run.status == "paused":
                    raise RequestError("invalid_state", f"run {run.id} is already paused")
                run.status = "paused"
                writer.append("run_paused", error=dump_json(control))
            else:
                if run.status != "paused":
                    raise RequestError("invalid_state", f"run {run.id} is not paused")
                run.status = "running"
                writer.append("run_resumed", error=dump_json(control))
                execution = self._advance(writer, execution, history, effects)
            effects.reply = {"run_id": run.id, "status": run.status}
            effects.outbox = writer.flush()
        self._keep(run, execution, effects)
        return effects

    def _kill(self, writer: Writer, control: dict[str, Any], effects: Effects) -> None:
        """End a run as killed, cancel its timers and kill its active children."""
        run = writer.run
        by = control["by"] or "unknown"
        message = f"killed by {by}"
        if control["reason"]:
            message += f": {control['reason']}"
        run.status = "killed"
        run.finished_at = writer.now
        run.waiting_for = None
        run.error = dump_json({"type": "Killed", "message": message, **control})
        writer.append("run_killed", error=dump_json(control))
        for child_id in waits.active_children(writer.connection, run.id):
            kill = protocol.ControlRequest(
                "kill",
                protocol.RunTarget(run_id=child_id),
                by=f"parent run {run.id}",
                reason=control["reason"],
            )
            writer.add_message(
                f"kill:{child_id}",
                self.topology.requests_queue,
                serializer.encode(kill.to_body()),
                {"message_id": f"kill:{child_id}", "content_type": protocol.MSGPACK_CONTENT_TYPE},
            )
        self._finished(writer, effects)

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

    def _check_parent(
        self, connection: Connection, request: protocol.StartRequest, run_id: str
    ) -> None:
        """Reject a child start whose parent is gone, was killed, or did not ask for it.

        A parent that completed or failed leaves its dispatched children to start and run.
        The parent's row is locked, so a kill of the parent either finds this child among its
        active children or makes this start fail.
        """
        assert request.parent_run_id is not None and request.parent_step is not None
        parent = RunState.load(connection, self.sql, request.parent_run_id, lock=self.lock_rows)
        expected = child_run_id(request.parent_run_id, request.parent_step)
        step = None
        if parent is not None:
            step = steps.load_history(connection, parent.id).steps.get(request.parent_step)
        if (
            parent is None
            or run_id != expected
            or step is None
            or step.kind != "child"
            or step.name != request.workflow
        ):
            raise RequestError(
                "invalid_parent",
                f"run {request.parent_run_id} did not start a child {request.workflow} run "
                f"{run_id} at step {request.parent_step}",
                "parent_run_id",
            )
        if parent.status == "killed":
            raise RequestError(
                "parent_killed",
                f"the parent run {parent.id} was killed, so its child does not start",
                "parent_run_id",
            )

    def _handles_events(self, workflow: str) -> bool:
        definition = self.registry.workflows.get(workflow)
        return definition is not None and callable(getattr(definition.target, "on_event", None))

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
            has_timers = any(step.fire_at is not None for step in execution.history.steps.values())
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
            writer.defer(functools.partial(waits.cancel_timers, run_id=run.id))
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


def _business_id_taken(
    request: protocol.StartRequest, business_id: str, run_id: str, status: str
) -> Effects:
    """Apply the start's policy when an active run already has the business id."""
    if request.if_running == "return_existing":
        return Effects(run_id=run_id, existing=True)
    raise RequestError(
        "business_id_in_use",
        f"business id {business_id!r} belongs to run {run_id}, which is {status}: wait until "
        "it finishes, kill it, or start with if_running='return_existing' to get its run id",
        "business_id",
    )


def _require_active(run: RunState, action: str) -> None:
    if not run.active:
        raise RequestError(
            "run_finished",
            f"cannot {action} run {run.id}: it is {run.status}, so nothing changed",
            "run_id",
        )


def _first_wait_for(history: History, name: str) -> Step | None:
    """Return the earliest unresolved event wait that accepts the event ``name``.

    Only the decision the workflow waits at can have unresolved waits: earlier waits were
    resolved or cancelled before the workflow moved on.
    """
    waiting = [
        step
        for step in history.steps.values()
        if step.kind == "event"
        and step.outcome is None
        and name in step.event_names
        and not _race_decided(history, step)
    ]
    return min(waiting, key=lambda step: step.step, default=None)


def _race_decided(history: History, step: Step) -> bool:
    """Return whether another command of the step's wait.first() already finished.

    While a run is paused, a race can be decided without the workflow resuming. Its losing
    waits are then not cancelled yet, and they must not take events.
    """
    if not step.first:
        return False
    return any(
        other.outcome is not None and not other.outcome.cancelled
        for other in history.steps_of(step.decision)
    )
