"""The engine's processor: start runs, record task results and heartbeats, fire timers.

It also takes events and run control (:mod:`engine.control`), on the transactions that
load, advance and finish a run (:mod:`engine.transactions`).

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

import datetime as dt
import json
from typing import Any

import structlog
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from engine import retries, steps
from engine.control import RunControl
from engine.replay import Execution, Step, child_run_id, error_dict
from engine.store import waits
from engine.store.queries import dump_json
from engine.transactions import Effects, RequestError
from engine.writer import RunState, StaleRun, Writer
from zenflow import protocol, serializer
from zenflow.context import RunContext
from zenflow.errors import DefinitionError
from zenflow.registry import WorkflowDefinition

log = structlog.get_logger("engine")

__all__ = ["Effects", "Processor", "RequestError"]


class Processor(RunControl):
    """Starts runs, records task results and heartbeats, and fires timers."""

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
                stale = _stale_attempt(step, result)
                if stale is not None and step.outcome is None and run.status != "killed":
                    effects.ignored = stale
                    writer.append(
                        "result_ignored",
                        step=result.step,
                        name=step.name,
                        attempt=result.attempt,
                        error=dump_json({"reason": stale}),
                    )
                    return self._finish_transaction(writer, execution, effects)
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

            if not self._resolve_step(writer, step, result, effects):
                return self._finish_transaction(writer, execution, effects)
            execution = self._advance(writer, execution, history, effects)
            effects.outbox = writer.flush()
        self._keep(run, execution, effects)
        return effects

    def _resolve_step(
        self, writer: Writer, step: Step, result: protocol.TaskResult, effects: Effects
    ) -> bool:
        """Record an attempt's outcome, or schedule the next attempt after a failure.

        Returns whether the workflow should advance.
        """
        if step.kind == "task" and not result.ok:
            error = result.error or {}
            delay = retries.next_delay(step, error, result)
            if delay is not None:
                retries.schedule_retry(writer, step, error, delay)
                effects.retry_in = delay.total_seconds()
                return False
        steps.add_outcome(writer, result, step)
        if step.mode == "dispatch":
            return False  # recorded for the timeline; the workflow does not wait for it
        if writer.run.status != "running":
            effects.ignored = f"recorded, but the run is {writer.run.status} and does not advance"
            return False
        return True

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
            if not waits.claim_timer(connection, timer.id, timer.fire_at):
                effects.ignored = "the timer was fired or cancelled meanwhile"
                return effects
            if found is None or found[0].status == "killed":
                effects.ignored = "the run has finished"
                return effects
            run, execution, history = found
            step = history.steps.get(timer.step)
            if step is None or step.outcome is not None:
                effects.ignored = f"step {timer.step} already has a result"
                return effects
            if not run.active and step.kind != "task":
                # Only a task's retries and leases outlive the end of its run.
                effects.ignored = "the run has finished"
                return effects
            writer = Writer(connection, self.sql, run, self.now(), new=False)
            if step.kind == "task":
                if not self._task_timer(writer, step, timer, effects):
                    return self._finish_transaction(writer, execution, effects)
            else:
                steps.fire_timer(writer, step)
            execution = self._advance(writer, execution, history, effects)
            effects.outbox = writer.flush()
        self._keep(run, execution, effects)
        return effects

    def _task_timer(
        self, writer: Writer, step: Step, timer: waits.DueTimer, effects: Effects
    ) -> bool:
        """Start the next attempt of a task step, or fail an attempt whose lease ran out.

        Returns whether the workflow should advance.
        """
        if timer.kind == "retry":
            if step.retry_at is None:
                effects.ignored = f"attempt {step.attempt} has already started"
            elif writer.run.status == "paused":
                # Held until resume, which starts the retries that fell due meanwhile.
                effects.ignored = "the run is paused; the retry starts at resume"
            else:
                retries.start_attempt(writer, step, self.topology)
                effects.retried = step.attempt
            return False
        detail = json.loads(timer.detail) if timer.detail else {}
        if step.retry_at is not None or detail.get("attempt", step.attempt) != step.attempt:
            effects.ignored = "the leased attempt has already ended"
            return False
        lost = protocol.TaskResult(
            run_id=writer.run.id,
            step=step.step,
            attempt=step.attempt,
            ok=False,
            workflow=writer.run.workflow,
            error=retries.lost_attempt(step, detail),
            agent=str(detail.get("agent") or ""),
        )
        steps.add_attempt(writer, lost, step)
        effects.lost = step.attempt
        return self._resolve_step(writer, step, lost, effects)

    def record_heartbeat(self, heartbeat: protocol.TaskHeartbeat) -> Effects:
        """Extend the lease of a running attempt by the heartbeat's ``lease`` seconds."""
        effects = Effects(run_id=heartbeat.run_id)
        with self.database.begin() as connection:
            found = self._load_run(connection, heartbeat.run_id)
            step = found[2].steps.get(heartbeat.step) if found is not None else None
            if found is None or not found[0].active or step is None or step.kind != "task":
                effects.ignored = "no active run waits for this task"
                return effects
            if step.outcome is not None or step.retry_at is not None:
                effects.ignored = f"attempt {heartbeat.attempt} has already ended"
                return effects
            if step.attempt != heartbeat.attempt:
                effects.ignored = f"attempt {heartbeat.attempt} is not the current one"
                return effects
            now = self.now()
            detail = {
                "agent": heartbeat.agent,
                "heartbeat_at": now.isoformat(timespec="seconds"),
                "attempt": heartbeat.attempt,
            }
            if heartbeat.details is not None:
                detail["details"] = protocol.short_repr(heartbeat.details)
            waits.set_timer(
                connection,
                run_id=heartbeat.run_id,
                step=heartbeat.step,
                fire_at=now + dt.timedelta(seconds=heartbeat.lease),
                kind="lease",
                detail=dump_json(detail),
            )
            step.leased = True
        return effects

    def due_timers(self, limit: int = 200) -> list[waits.DueTimer]:
        with self.database.connect() as connection:
            return waits.due_timers(connection, self.now(), limit)

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


def _stale_attempt(step: Step, result: protocol.TaskResult) -> str | None:
    """Return why a task result is for an attempt that no longer counts, or None."""
    if result.attempt != step.attempt:
        return (
            f"attempt {result.attempt} of step {step.step} is not the current attempt "
            f"{step.attempt}"
        )
    if step.retry_at is not None:
        return (
            f"attempt {result.attempt} of step {step.step} already failed; the next attempt "
            f"is due at {step.retry_at.isoformat(timespec='seconds')}"
        )
    return None
