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

import contextlib
import dataclasses
import datetime as dt
import inspect
import traceback
import uuid
from collections.abc import Generator
from typing import Any, Literal

from engine.commands import Command, Grouping, to_commands
from zenflow import protocol, serializer
from zenflow.commands import EventWait, First, TaskCall, Timer, describe_call, describe_rule
from zenflow.context import RunContext, reset_current_run, set_current_run
from zenflow.errors import DefinitionError, NonDeterminismError, SerializationError, TaskFailed
from zenflow.protocol import MAX_BUSINESS_ID_LENGTH
from zenflow.registry import WorkflowDefinition
from zenflow.retry import Retry, default_retry, seconds_of
from zenflow.workflow import WorkflowCall

StepKind = Literal["task", "child", "timer", "event"]


@dataclasses.dataclass
class Step:
    """One command of a run, as recorded (or about to be recorded) in history.

    ``payload`` is msgpack of ``[args, kwargs]`` for a task, ``[args, kwargs, business_id]``
    for a child workflow, the rule for a timer and ``{"names", "timeout"}`` for an event
    wait. ``name`` is the task or workflow name, or the event names joined by commas.
    """

    step: int
    decision: int
    mode: Literal["execute", "dispatch"]
    name: str
    queue: str
    payload: bytes
    batch: int | None  # number of commands in the yielded list, or None for a single one
    outcome: Outcome | None = None
    scheduled_at: dt.datetime | None = None
    kind: StepKind = "task"
    first: bool = False  # one of the commands of a wait.first()
    fire_at: dt.datetime | None = None  # timers and event waits with a timeout
    # Tasks: the retry policy, timeout and heartbeat interval (JSON-ready), the current
    # attempt, the attempt that began the current series, and the time of the next attempt
    # while the step waits to retry.
    options: dict[str, Any] | None = None
    attempt: int = 1
    first_attempt: int = 1
    retry_at: dt.datetime | None = None
    leased: bool = False  # an agent sent a heartbeat for an attempt
    sent_at: dt.datetime | None = None  # when the current attempt, after the first, was sent

    def describe(self) -> str:
        if self.kind == "timer":
            return describe_rule(serializer.decode(self.payload))
        if self.kind == "event":
            spec = serializer.decode(self.payload)
            return EventWait(tuple(spec["names"]), spec.get("timeout")).describe()
        args, kwargs, *_ = serializer.decode(self.payload)
        text = describe_call(self.name, args, kwargs, self.mode)
        return f"workflow {text}" if self.kind == "child" else text

    @property
    def event_names(self) -> tuple[str, ...]:
        return tuple(self.name.split(",")) if self.kind == "event" else ()


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A step's result: ``value`` when ``ok``, else ``error`` (type, message, traceback).

    ``seq`` is the history position of the result, which orders the commands of a
    ``wait.first()``, and ``at`` its time. A wait that lost a ``wait.first()`` is
    ``cancelled``; it has no value for the workflow.
    """

    ok: bool
    value: Any = None
    error: dict[str, Any] | None = None
    seq: int = 0
    at: dt.datetime | None = None
    cancelled: bool = False


class History:
    """The recorded steps of a run, by step number and by decision."""

    def __init__(self, steps: list[Step] | None = None) -> None:
        self.steps: dict[int, Step] = {}
        self._by_decision: dict[int, list[Step]] = {}
        self.decisions = 0  # the highest decision with at least one recorded step
        self.handler_starts: list[HandlerStart] = []  # events given to on_event, in order
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
    """The outcome of one advance: steps to schedule, waits to cancel, the end if reached."""

    new_steps: list[Step] = dataclasses.field(default_factory=list)
    cancelled: list[Step] = dataclasses.field(default_factory=list)
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


@dataclasses.dataclass(frozen=True)
class HandlerStart:
    """An event given to the workflow's ``on_event``, at history position ``seq``."""

    seq: int
    name: str
    data: Any
    at: dt.datetime | None


@dataclasses.dataclass
class _Thread:
    """One generator of a run: ``handle``, or an ``on_event`` call that yielded."""

    generator: Generator[Any, Any, Any]
    handler: bool
    pending: list[Step] = dataclasses.field(default_factory=list)
    grouping: Grouping = "single"


class Execution:
    """A live workflow and its position in the run's history.

    A run has one generator for ``handle`` and one for each ``on_event`` call still running.
    They are resumed in the order in which history recorded what resolved their waits:
    results, timers, events and ``on_event`` calls, by history position. A replay therefore
    interleaves them exactly as the first execution did.

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
        started_at: dt.datetime | None = None,
    ) -> None:
        self.definition = definition
        self.started_at = started_at
        self.history = history or History()
        self.context = context
        self.args = args
        self.kwargs = kwargs
        self.revision = 0
        self.run_state: Any = None  # the engine's copy of the run row at ``revision``
        self.instance: Any = None
        self.threads: list[_Thread] = []
        self.decision = 0  # decisions yielded so far, by every generator of the run
        self.next_step = 1
        self.handlers_started = 0
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
            while self.finished is None:
                trigger = self._next_trigger(history)
                if trigger is None:
                    break
                if isinstance(trigger, _Thread):
                    self._resume(trigger, history, progress)
                else:
                    self._start_handler(trigger, history, progress)
        finally:
            self.context.replaying = False
            reset_current_run(token)
        progress.finished = self.finished
        return progress

    def close(self) -> None:
        """Close the generators (their ``finally`` blocks run) without logging from them."""
        self.context.replaying = True
        token = set_current_run(self.context)
        try:
            for thread in self.threads:
                with contextlib.suppress(Exception):
                    thread.generator.close()
        finally:
            reset_current_run(token)
            self.threads = []

    @property
    def pending(self) -> list[Step]:
        """The steps that the run's generators wait at."""
        return [step for thread in self.threads for step in thread.pending]

    # Driving the generators.

    def _begin(self, history: History, progress: Progress) -> None:
        self.context.replaying = history.decisions > 0
        self.context.now = self.started_at
        self.context.decision = 0
        try:
            self.instance = self.definition.instantiate(self.args, self.kwargs)
            started = self.definition.begin(self.instance, self.args, self.kwargs)
        except BaseException as error:  # user code; see _step
            self._fail(error_dict(error), history)
            return
        if not inspect.isgenerator(started):
            self._complete(started, history)
            return
        thread = _Thread(started, handler=False)
        self.threads.append(thread)
        self._step(thread, lambda: next(started), history, progress)

    def _next_trigger(self, history: History) -> _Thread | HandlerStart | None:
        """Return what to run next: the generator or ``on_event`` call resolved earliest."""
        best: tuple[int, _Thread | HandlerStart] | None = None
        for thread in self.threads:
            seq = self._resolved_at(thread, history)
            if seq is not None and (best is None or seq < best[0]):
                best = (seq, thread)
        if self.handlers_started < len(history.handler_starts):
            start = history.handler_starts[self.handlers_started]
            if best is None or start.seq < best[0]:
                best = (start.seq, start)
        return None if best is None else best[1]

    def _resolved_at(self, thread: _Thread, history: History) -> int | None:
        """Return the history position at which the thread's wait was resolved, or None.

        A wait made only of dispatched commands, or of none (``yield []``), resolves at once
        (position 0).
        """
        if not thread.pending:
            return 0
        positions = []
        for step in thread.pending:
            outcome = history.steps[step.step].outcome
            if step.mode == "dispatch":
                positions.append(0)
            elif outcome is not None and not (thread.grouping == "first" and outcome.cancelled):
                positions.append(outcome.seq)
            elif thread.grouping != "first":
                return None
        if not positions:
            return None
        return min(positions) if thread.grouping == "first" else max(positions)

    def _start_handler(self, start: HandlerStart, history: History, progress: Progress) -> None:
        """Call ``on_event`` with an event that no wait took."""
        self.handlers_started += 1
        self.context.replaying = self.decision < history.decisions
        self.context.decision = self.decision
        if start.at is not None:
            self.context.now = start.at
        handler = getattr(self.instance, "on_event", None)
        if not callable(handler):
            mismatch = NonDeterminismError(
                f"workflow {self.definition.name} is not deterministic: history gave the event "
                f"{start.name!r} to on_event, which the code no longer defines. Restore the "
                "previous code for runs in progress",
                step=self.next_step,
                recorded=f"on_event({start.name!r}, ...)",
                actual="no on_event",
            )
            details = error_dict(
                mismatch, step=mismatch.step, recorded=mismatch.recorded, actual=mismatch.actual
            )
            self._fail(details, history, check_rest=False)
            return
        try:
            started = handler(start.name, start.data)
        except BaseException as error:  # user code; see _step
            self._fail(error_dict(error, on_event=start.name), history)
            return
        if inspect.iscoroutine(started):
            started.close()
            message = (
                f"{self.definition.name}.on_event is a coroutine function; define it with "
                "`def` (it may yield tasks), and put async code in a task"
            )
            self._fail(error_dict(DefinitionError(message), on_event=start.name), history)
            return
        if inspect.isgenerator(started):
            thread = _Thread(started, handler=True)
            self.threads.append(thread)
            self._step(thread, lambda: next(started), history, progress)

    def _resume(self, thread: _Thread, history: History, progress: Progress) -> None:
        if thread.grouping == "first":
            send, failure, failed_step, resolved_at = self._first_winner(thread, history, progress)
        else:
            send, failure, failed_step, resolved_at = self._all_results(thread, history)
        thread.pending = []
        self.context.replaying = self.decision < history.decisions
        self.context.decision = self.decision
        if resolved_at is not None:
            self.context.now = resolved_at
        generator = thread.generator
        if failure is not None:
            assert failed_step is not None
            name = (
                failed_step.name if failed_step.kind == "task" else f"workflow {failed_step.name}"
            )
            error = TaskFailed(
                name,
                str(failure.get("type", "Error")),
                str(failure.get("message", "")),
                str(failure.get("traceback", "")),
                step=failed_step.step,
            )
            self._step(thread, lambda: generator.throw(error), history, progress)
        else:
            self._step(thread, lambda: generator.send(send), history, progress)

    def _all_results(
        self, thread: _Thread, history: History
    ) -> tuple[Any, dict[str, Any] | None, Step | None, dt.datetime | None]:
        """Return the value to send for a single command or a list, or the first failure."""
        values: list[Any] = []
        failure: dict[str, Any] | None = None
        failed_step: Step | None = None
        resolved_at: dt.datetime | None = None
        for step in thread.pending:
            outcome = history.steps[step.step].outcome
            if step.mode == "dispatch":
                values.append(self._dispatched_value(step))
                continue
            assert outcome is not None
            if outcome.at is not None and (resolved_at is None or outcome.at > resolved_at):
                resolved_at = outcome.at
            if not outcome.ok and failure is None:
                failure, failed_step = outcome.error, step
            values.append(outcome.value)
        if thread.grouping == "all":
            return values, failure, failed_step, resolved_at
        return (values[0] if values else None), failure, failed_step, resolved_at

    def _first_winner(
        self, thread: _Thread, history: History, progress: Progress
    ) -> tuple[Any, dict[str, Any] | None, Step | None, dt.datetime | None]:
        """Return the value of the first command of a wait.first() to finish.

        Results are ordered by their position in history, so replay picks the same
        winner. Waits that lost and have no result yet are cancelled.
        """
        winner: tuple[int, int, Step, Outcome | None] | None = None
        for index, step in enumerate(thread.pending):
            outcome = history.steps[step.step].outcome
            if step.mode == "dispatch":
                candidate = (0, index, step, outcome)
            elif outcome is None or outcome.cancelled:
                continue
            else:
                candidate = (outcome.seq, index, step, outcome)
            if winner is None or candidate[:2] < winner[:2]:
                winner = candidate
        assert winner is not None
        _, index, step, outcome = winner
        for other in thread.pending:
            if other is step or other.kind not in ("timer", "event"):
                continue
            if history.steps[other.step].outcome is None:
                progress.cancelled.append(other)
        if step.mode == "dispatch":
            return First(index, self._dispatched_value(step)), None, None, None
        assert outcome is not None
        if not outcome.ok:
            return None, outcome.error, step, outcome.at
        return First(index, outcome.value), None, None, outcome.at

    def _dispatched_value(self, step: Step) -> Any:
        """Return what the ``yield`` of a dispatched command gives: a child's run id, or None."""
        if step.kind == "child":
            return child_run_id(self.context.run_id, step.step)
        return None

    def _step(self, thread: _Thread, resume: Any, history: History, progress: Progress) -> None:
        """Resume a generator once and handle what it yields, returns or raises."""
        try:
            yielded = resume()
        except StopIteration as stop:
            if thread.handler:
                self.threads.remove(thread)  # on_event returned; its value is not used
            else:
                self._complete(stop.value, history)
            return
        except BaseException as error:
            # Workflow code runs in an engine worker thread. Python delivers signals to the main
            # thread only, so a SystemExit or KeyboardInterrupt here comes from the workflow
            # and fails only its run.
            self._fail(error_dict(error, **_step_of(error)), history)
            return
        try:
            calls, grouping = to_commands(yielded, self.definition.name)
            steps = self._to_steps(calls, grouping)
        except BaseException as error:
            # User code runs here too: a child workflow's __init__ or id().
            self._fail(error_dict(error, step=self.next_step), history)
            return
        if self.decision < history.decisions:
            recorded = history.steps_of(self.decision + 1)
            mismatch = self._compare(steps, recorded, grouping)
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
        self.decision += 1
        self.next_step += len(steps)
        thread.pending = steps
        thread.grouping = grouping

    def _to_steps(self, calls: list[Command], grouping: Grouping) -> list[Step]:
        steps = []
        for offset, call in enumerate(calls):
            step = Step(
                step=self.next_step + offset,
                decision=self.decision + 1,
                mode="execute",
                name="",
                queue="",
                payload=b"",
                batch=None if grouping == "single" else len(calls),
                first=grouping == "first",
            )
            if isinstance(call, TaskCall):
                step.mode, step.name, step.queue = call.mode, call.name, call.queue
                step.payload = _encode_arguments(call.name, call.args, call.kwargs)
                step.options = task_options(call)
            elif isinstance(call, WorkflowCall):
                if call.business_id is not None:
                    problem = protocol.text_problem(call.business_id, MAX_BUSINESS_ID_LENGTH)
                    if problem is not None:
                        raise DefinitionError(
                            f"child workflow {call.name}: its business id {problem}"
                        )
                step.kind, step.mode, step.name = "child", call.mode, call.name
                step.payload = _encode_arguments(
                    call.name, call.args, call.kwargs, call.business_id
                )
            elif isinstance(call, Timer):
                step.kind = "timer"
                step.payload = serializer.encode(call.rule, name="timer")
            else:
                step.kind, step.name = "event", ",".join(call.names)
                step.payload = serializer.encode(
                    {"names": list(call.names), "timeout": call.timeout}, name="event wait"
                )
            steps.append(step)
        return steps

    # Checking replayed commands.

    def _compare(
        self, steps: list[Step], recorded: list[Step], grouping: Grouping
    ) -> NonDeterminismError | None:
        for new, old in zip(steps, recorded, strict=False):
            if not _same_command(new, old):
                recorded_text, actual_text = old.describe(), new.describe()
                if recorded_text == actual_text:
                    # Only the queue differs, or a value whose repr hides its type.
                    recorded_text += f" on queue {old.queue!r}"
                    actual_text += f" on queue {new.queue!r}"
                return _mismatch(new.step, recorded_text, actual_text, self.definition.name)
        recorded_grouping = _grouping_of(recorded)
        if len(steps) != len(recorded) or (recorded and recorded_grouping != grouping):
            first = recorded[0].step if recorded else self.next_step
            return _mismatch(
                first,
                _describe_decision(recorded, recorded_grouping),
                _describe_decision(steps, grouping),
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
                _describe_decision(extra, _grouping_of(extra)),
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
        # on_event generators still running end with the run, closed without logging.
        self.close()


def _same_command(new: Step, old: Step) -> bool:
    if (new.kind, new.mode, new.name, new.queue) != (old.kind, old.mode, old.name, old.queue):
        return False
    if new.payload == old.payload:
        return True
    # Equal values can encode differently (dict key order), so compare decoded values too.
    try:
        return bool(serializer.decode(new.payload) == serializer.decode(old.payload))
    except SerializationError:
        return False


def _grouping_of(steps: list[Step]) -> Grouping:
    if not steps or steps[0].batch is None:
        return "single"
    return "first" if steps[0].first else "all"


def _describe_decision(steps: list[Step], grouping: Grouping) -> str:
    described = ", ".join(step.describe() for step in steps)
    if grouping == "all":
        return f"[{described}]"
    if grouping == "first":
        return f"wait.first({described})"
    return described or "no command"


def task_options(call: TaskCall) -> dict[str, Any] | None:
    """Return how a task step runs: its retry policy (or the default), timeout, heartbeat.

    A task that runs once with no limits, the most common case, returns None, so its step
    and its message carry nothing more than before retries existed.
    """
    if call.retry is not None and not isinstance(call.retry, Retry):
        raise DefinitionError(f"task {call.name}: invalid retry {call.retry!r}; use zenflow.Retry")
    options: dict[str, Any] = {}
    policy = call.retry or default_retry()
    if policy.attempts > 1:
        options["retry"] = policy.to_wire()
    for name in ("timeout", "heartbeat"):
        value = getattr(call, name)
        if value is not None:
            options[name] = seconds_of(value, name, f"task {call.name}")
    return options or None


def child_run_id(parent_run_id: str, step: int) -> str:
    """Return the run id of the child started by ``step``: derived, so replay finds it."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"zenflow:{parent_run_id}:{step}"))


def _encode_arguments(name: str, args: Any, kwargs: Any, *extra: Any) -> bytes:
    try:
        payload = serializer.encode([list(args), kwargs, *extra])
    except SerializationError:
        pass
    else:
        if len(payload) > protocol.MAX_MESSAGE_BYTES:
            raise SerializationError(
                f"task {name}: its arguments are {len(payload)} bytes once encoded; the "
                f"limit is {protocol.MAX_MESSAGE_BYTES}. Pass a reference to big data instead"
            )
        return payload
    # Encode the parts again to name where the unencodable value sits.
    try:
        serializer.encode(list(args), name="args")
        serializer.encode(kwargs, name="kwargs")
    except SerializationError as error:
        raise SerializationError(f"task {name}: {error}", error.path) from None
    raise SerializationError(f"task {name}: cannot encode its arguments")


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
