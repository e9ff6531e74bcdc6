"""Requests about an existing run: send it an event, kill, pause, resume or retry it."""

from __future__ import annotations

import functools
import json
from typing import Any

from sqlalchemy.exc import IntegrityError

from engine import retries, steps
from engine.replay import Execution, History, Step
from engine.store import waits
from engine.store.queries import dump_json
from engine.transactions import Effects, RequestError, Transactions
from engine.writer import RunState, Writer
from zenflow import protocol, serializer
from zenflow.errors import ZenflowError


class RunControl(Transactions):
    """Events and control requests, each one transaction on the run."""

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
            if request.action != "retry":
                _require_active(run, request.action)
            writer = Writer(connection, self.sql, run, self.now(), new=False)
            effects = Effects(run_id=run.id)
            reason = request.reason
            if reason is not None:
                reason = "".join(char if char.isprintable() else "?" for char in reason)
            control = {"by": request.by, "reason": reason}
            if request.action == "retry":
                execution = self._retry(writer, history, control, effects)
            elif request.action == "kill":
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
                retries.start_due_attempts(writer, history, self.topology)
                execution = self._advance(writer, execution, history, effects)
            effects.reply = {"run_id": run.id, "status": run.status, **effects.reply}
            try:
                effects.outbox = writer.flush()
            except IntegrityError:
                raise RequestError(
                    "business_id_taken",
                    f"run {run.id} cannot run again: another active run has its business id "
                    f"{run.business_id!r}",
                    "run_id",
                ) from None
        self._keep(run, execution, effects)
        return effects

    def _retry(
        self, writer: Writer, history: History, control: dict[str, Any], effects: Effects
    ) -> Execution | None:
        """Run a failed run again from where it failed, keeping its history.

        If a task's failure ended the run, that step gets a new series of attempts and the
        workflow waits for it again. Otherwise the workflow's own code failed: it is replayed
        from its history with the code the engine runs now, as after a fix.
        """
        run = writer.run
        if run.status != "failed":
            raise RequestError(
                "invalid_state", f"run {run.id} is {run.status}; only a failed run can be retried"
            )
        if run.parent_id is not None:
            raise RequestError(
                "invalid_state",
                f"run {run.id} is a child of run {run.parent_id}, which has already received "
                "its failure; a child run cannot be retried on its own",
            )
        error = json.loads(run.error or "{}")
        step = history.steps.get(error.get("step")) if isinstance(error.get("step"), int) else None
        failed_task = (
            step is not None
            and step.kind == "task"
            and step.outcome is not None
            and not step.outcome.ok
        )
        if step is not None and step.kind == "child" and step.outcome and not step.outcome.ok:
            raise RequestError(
                "invalid_state",
                f"run {run.id} failed because its child workflow {step.name} at step "
                f"{step.step} failed; retry covers task steps and workflow code, so start a "
                "new run",
            )
        run.status, run.error, run.finished_at = "running", None, None
        if step is not None and failed_task:
            writer.append("run_retried", step=step.step, error=dump_json(control))
            step.outcome = None
            writer.defer(
                functools.partial(waits.mark_result_retried, run_id=run.id, step=step.step)
            )
            retries.start_attempt(writer, step, self.topology, manual=True)
            run.waiting_for = steps.waiting_for(history)
            effects.reply = {"step": step.step, "attempt": step.attempt}
            return None
        writer.append("run_retried", error=dump_json(control))
        return self._advance(writer, None, history, effects)

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

    def _handles_events(self, workflow: str) -> bool:
        definition = self.registry.workflows.get(workflow)
        return definition is not None and callable(getattr(definition.target, "on_event", None))


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
