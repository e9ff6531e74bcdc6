"""Deterministic replay: drive a workflow generator against its recorded history.

A generator cannot be saved, so the engine keeps live generators in memory (see
:mod:`engine.cache`) and, when a run is not in memory, rebuilds its generator by calling the
workflow again and feeding every recorded result back in order. Each ``yield`` is a
*decision*; each task in it is a *step*, numbered from 1 in the order yielded. While replaying,
every yielded command must match the recorded one, or the run stops with a
:class:`~zenflow.errors.NonDeterminismError`.

Nothing here touches the database or the broker: :class:`Execution` takes a
:class:`History` and returns the new steps to schedule and, once the workflow ends, its
outcome.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import traceback
from collections.abc import Generator
from typing import Any, Literal

from engine.commands import to_commands
from zenflow import protocol, serializer
from zenflow.commands import TaskCall, describe_call
from zenflow.context import RunContext, reset_current_run, set_current_run
from zenflow.errors import DefinitionError, NonDeterminismError, SerializationError, TaskFailed
from zenflow.registry import WorkflowDefinition


@dataclasses.dataclass
class Step:
    """One task command of a run, as recorded (or about to be recorded) in history."""

    step: int
    decision: int
    mode: Literal["execute", "dispatch"]
    name: str
    queue: str
    payload: bytes  # msgpack of [args, kwargs]
    batch: int | None  # number of calls in the yielded list, or None for a single call
    outcome: Outcome | None = None
    scheduled_at: dt.datetime | None = None

    def describe(self) -> str:
        args, kwargs = serializer.decode(self.payload)
        return describe_call(self.name, args, kwargs, self.mode)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A step's result: ``value`` when ``ok``, else ``error`` (type, message, traceback)."""

    ok: bool
    value: Any = None
    error: dict[str, Any] | None = None


class History:
    """The recorded steps of a run, by step number and by decision."""

    def __init__(self, steps: list[Step] | None = None) -> None:
        self.steps: dict[int, Step] = {}
        self._by_decision: dict[int, list[Step]] = {}
        self.decisions = 0  # the highest decision with at least one recorded step
        for step in steps or ():
            self.add(step)

    def add(self, step: Step) -> None:
        self.steps[step.step] = step
        self._by_decision.setdefault(step.decision, []).append(step)
        self.decisions = max(self.decisions, step.decision)

    def steps_of(self, decision: int) -> list[Step]:
        return self._by_decision.get(decision, [])


@dataclasses.dataclass(frozen=True)
class Finished:
    """The end of a workflow: ``completed`` with ``result``, or ``failed`` with ``error``."""

    status: Literal["completed", "failed"]
    result: bytes | None = None
    error: dict[str, Any] | None = None


@dataclasses.dataclass
class Progress:
    """The outcome of one advance: steps to schedule, and the end of the run if reached."""

    new_steps: list[Step] = dataclasses.field(default_factory=list)
    finished: Finished | None = None


def error_dict(error: BaseException, **extra: Any) -> dict[str, Any]:
    """Describe an exception for storage: type, message and formatted traceback."""
    details: dict[str, Any] = {
        "type": type(error).__name__,
        "message": str(error),
        "traceback": "".join(traceback.format_exception(error)),
    }
    details.update(extra)
    return details


class Execution:
    """A live workflow generator and its position in the run's history.

    ``revision`` is the run row's revision that the in-memory state matches; the engine
    discards the execution when the stored revision differs (another engine advanced it).
    """

    def __init__(
        self,
        definition: WorkflowDefinition,
        context: RunContext,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        history: History | None = None,
    ) -> None:
        self.definition = definition
        self.history = history or History()
        self.context = context
        self.args = args
        self.kwargs = kwargs
        self.revision = 0
        self.run_state: Any = None  # the engine's copy of the run row at ``revision``
        self.generator: Generator[Any, Any, Any] | None = None
        self.decision = 0  # decisions consumed so far; the pending one is self.decision
        self.next_step = 1
        self.pending: list[Step] = []  # steps of the decision the generator waits at
        self.pending_is_list = False
        self.finished: Finished | None = None
        self._started = False

    # Public API.

    def record_outcome(self, step: int, outcome: Outcome) -> None:
        """Set the outcome of a step; the next :meth:`advance` sends it into the generator."""
        self.history.steps[step].outcome = outcome

    def advance(self) -> Progress:
        """Run the workflow as far as its history allows and return what it produced.

        Recorded decisions are replayed and checked against the code. New decisions are
        added to the history and returned as ``Progress.new_steps`` for the caller to store.
        """
        history = self.history
        progress = Progress()
        token = set_current_run(self.context)
        try:
            if not self._started:
                self._started = True
                self._begin(history, progress)
            while self.finished is None and self._pending_resolved(history):
                self._resume(history, progress)
        finally:
            self.context.replaying = False
            reset_current_run(token)
        progress.finished = self.finished
        return progress

    def close(self) -> None:
        """Close the generator (its ``finally`` blocks run) without logging from it."""
        if self.generator is None:
            return
        self.context.replaying = True
        token = set_current_run(self.context)
        try:
            self.generator.close()
        except Exception:
            pass
        finally:
            reset_current_run(token)
            self.generator = None

    # Driving the generator.

    def _begin(self, history: History, progress: Progress) -> None:
        self.context.replaying = history.decisions > 0
        try:
            instance = self.definition.instantiate(self.args, self.kwargs)
            started = self.definition.begin(instance, self.args, self.kwargs)
        except BaseException as error:  # user code; see _step
            self._fail(error_dict(error), history)
            return
        if not inspect.isgenerator(started):
            self._complete(started, history)
            return
        self.generator = started
        self._step(lambda: next(started), history, progress)

    def _resume(self, history: History, progress: Progress) -> None:
        outcomes = [history.steps[step.step].outcome for step in self.pending]
        values: list[Any] = []
        failure: dict[str, Any] | None = None
        failed_step: Step | None = None
        for step, outcome in zip(self.pending, outcomes, strict=True):
            if step.mode == "dispatch":
                values.append(None)
                continue
            assert outcome is not None
            if not outcome.ok and failure is None:
                failure, failed_step = outcome.error, step
            values.append(outcome.value)
        self.decision += 1
        self.context.replaying = self.decision < history.decisions
        generator = self.generator
        assert generator is not None
        if failure is not None:
            assert failed_step is not None
            error = TaskFailed(
                failed_step.name,
                str(failure.get("type", "Error")),
                str(failure.get("message", "")),
                str(failure.get("traceback", "")),
                step=failed_step.step,
            )
            self._step(lambda: generator.throw(error), history, progress)
        else:
            if self.pending_is_list:
                value: Any = values
            else:
                value = values[0] if values else None
            self._step(lambda: generator.send(value), history, progress)

    def _step(self, resume: Any, history: History, progress: Progress) -> None:
        """Resume the generator once and handle what it yields, returns or raises."""
        try:
            yielded = resume()
        except StopIteration as stop:
            self._complete(stop.value, history)
            return
        except BaseException as error:
            # Workflow code runs in an engine worker thread, where no signal arrives, so even
            # SystemExit or KeyboardInterrupt comes from the workflow and fails only its run.
            self._fail(error_dict(error, **_step_of(error)), history)
            return
        try:
            calls, is_list = to_commands(yielded, self.definition.name)
            steps = self._to_steps(calls, is_list)
        except (DefinitionError, SerializationError) as error:
            self._fail(error_dict(error, step=self.next_step), history)
            return
        if self.decision < history.decisions:
            recorded = history.steps_of(self.decision + 1)
            mismatch = self._compare(steps, recorded, is_list)
            if mismatch is not None:
                details = error_dict(
                    mismatch, step=mismatch.step, recorded=mismatch.recorded, actual=mismatch.actual
                )
                self._fail(details, history, check_rest=False)
                return
            steps = recorded
        else:
            for step in steps:
                history.add(step)
            progress.new_steps.extend(steps)
        self.next_step += len(steps)
        self.pending = steps
        self.pending_is_list = is_list

    def _to_steps(self, calls: list[TaskCall], is_list: bool) -> list[Step]:
        steps = []
        for offset, call in enumerate(calls):
            steps.append(
                Step(
                    step=self.next_step + offset,
                    decision=self.decision + 1,
                    mode=call.mode,
                    name=call.name,
                    queue=call.queue,
                    payload=_encode_arguments(call),
                    batch=len(calls) if is_list else None,
                )
            )
        return steps

    def _pending_resolved(self, history: History) -> bool:
        if self.generator is None:
            return False
        return all(
            step.mode == "dispatch" or history.steps[step.step].outcome is not None
            for step in self.pending
        )

    # Checking replayed commands.

    def _compare(
        self, steps: list[Step], recorded: list[Step], is_list: bool
    ) -> NonDeterminismError | None:
        for new, old in zip(steps, recorded, strict=False):
            if not _same_command(new, old):
                recorded_text, actual_text = old.describe(), new.describe()
                if recorded_text == actual_text:
                    # Only the queue differs, or a value whose repr hides its type.
                    recorded_text += f" on queue {old.queue!r}"
                    actual_text += f" on queue {new.queue!r}"
                return _mismatch(new.step, recorded_text, actual_text, self.definition.name)
        recorded_is_list = bool(recorded) and recorded[0].batch is not None
        if len(steps) != len(recorded) or (recorded and recorded_is_list != is_list):
            first = recorded[0].step if recorded else self.next_step
            return _mismatch(
                first,
                _describe_decision(recorded, recorded_is_list),
                _describe_decision(steps, is_list),
                self.definition.name,
            )
        return None

    # Ending the run.

    def _complete(self, value: Any, history: History) -> None:
        if inspect.isgenerator(value):
            value.close()
            self._fail(
                {
                    "type": "DefinitionError",
                    "message": (
                        f"workflow {self.definition.name} returned a generator object; to run "
                        "a helper generator's steps use `return (yield from helper(...))`"
                    ),
                    "traceback": "",
                },
                history,
            )
            return
        try:
            result = serializer.encode(value, name="result")
        except SerializationError as error:
            self._fail(error_dict(error), history)
            return
        self._finish(Finished("completed", result=result), history)

    def _fail(self, error: dict[str, Any], history: History, *, check_rest: bool = True) -> None:
        self._finish(Finished("failed", error=error), history, check_rest=check_rest)

    def _finish(self, finished: Finished, history: History, *, check_rest: bool = True) -> None:
        if check_rest and self.decision + 1 <= history.decisions:
            # The workflow ended where its history recorded more commands.
            extra = history.steps_of(self.decision + 1)
            mismatch = _mismatch(
                extra[0].step if extra else self.next_step,
                _describe_decision(extra, bool(extra) and extra[0].batch is not None),
                f"the workflow {finished.status} here",
                self.definition.name,
            )
            finished = Finished(
                "failed",
                error=error_dict(
                    mismatch, step=mismatch.step, recorded=mismatch.recorded, actual=mismatch.actual
                ),
            )
        self.finished = finished
        self.generator = None
        self.pending = []


def _same_command(new: Step, old: Step) -> bool:
    if (new.mode, new.name, new.queue) != (old.mode, old.name, old.queue):
        return False
    if new.payload == old.payload:
        return True
    # Equal values can encode differently (dict key order), so compare decoded values too.
    try:
        return bool(serializer.decode(new.payload) == serializer.decode(old.payload))
    except SerializationError:
        return False


def _describe_decision(steps: list[Step], is_list: bool) -> str:
    described = ", ".join(step.describe() for step in steps)
    if is_list:
        return f"[{described}]"
    return described or "no command"


def _encode_arguments(call: TaskCall) -> bytes:
    try:
        payload = serializer.encode([list(call.args), call.kwargs])
    except SerializationError:
        pass
    else:
        if len(payload) > protocol.MAX_MESSAGE_BYTES:
            raise SerializationError(
                f"task {call.name}: its arguments are {len(payload)} bytes once encoded; the "
                f"limit is {protocol.MAX_MESSAGE_BYTES}. Pass a reference to big data instead"
            )
        return payload
    # Encode the parts again to name where the unencodable value sits.
    try:
        serializer.encode(list(call.args), name="args")
        serializer.encode(call.kwargs, name="kwargs")
    except SerializationError as error:
        raise SerializationError(f"task {call.name}: {error}", error.path) from None
    raise SerializationError(f"task {call.name}: cannot encode its arguments")


def _mismatch(step: int, recorded: str, actual: str, workflow: str) -> NonDeterminismError:
    return NonDeterminismError(
        f"workflow {workflow} is not deterministic at step {step}: history recorded "
        f"{recorded} but the code now yields {actual}. Restore the previous code for runs "
        "in progress, or start new runs for the changed code",
        step=step,
        recorded=recorded,
        actual=actual,
    )


def _step_of(error: BaseException) -> dict[str, Any]:
    if not isinstance(error, TaskFailed):
        return {}
    cause = {"type": error.error_type, "message": error.error_message, "traceback": error.traceback}
    return {"step": error.step, "task": error.task, "cause": cause}
