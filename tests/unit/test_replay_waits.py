"""Replay of timers, event waits, wait.first(), child workflows and on_event handlers.

Each test plays the engine's part without a broker or a database: it advances an
:class:`Execution`, records outcomes at increasing history positions (``Outcome.seq``) the
way the engine's writer numbers history entries, and replays a copy of the history with a
fresh execution of the same (or changed) code.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Callable, Generator
from typing import Any

import pytest

import zenflow
from engine.replay import Execution, HandlerStart, History, Outcome, Progress, Step, child_run_id
from zenflow import Event, First, Task, TaskFailed, Workflow, serializer, task, wait, workflow
from zenflow.context import RunContext
from zenflow.errors import DefinitionError
from zenflow.registry import WorkflowDefinition

RUN_ID = "run-1"
STARTED_AT = dt.datetime(2026, 3, 2, 8, 0, tzinfo=dt.UTC)

WorkflowGenerator = Generator[Any, Any, Any]


class Charge(Task):
    queue = "payments"

    def __init__(self, order: str) -> None:
        self.order = order


class Audit(Task):
    queue = "audit"

    def __init__(self, note: str) -> None:
        self.note = note


@task
def echo(value: object) -> object:
    return value


# Timers and event waits, and changed versions of the same code.


class WaitsOneHour(Workflow):
    def handle(self) -> WorkflowGenerator:
        return (yield wait.for_(hours=1))


class Dunning(Workflow):
    """Invoice, wait, then wait for payment. Each subclass changes one wait."""

    delay: Any = dt.timedelta(hours=1)
    event_name = "Paid"
    timeout = dt.timedelta(days=7)

    def handle(self) -> WorkflowGenerator:
        yield echo("invoice")
        yield wait.for_(self.delay)
        event = yield wait.event(self.event_name, timeout=self.timeout)
        return None if event is None else event.data


class DunningDelayInSeconds(Dunning):
    delay = 3600


class DunningDelayAsFloat(Dunning):
    delay = 3600.0


class DunningLongerDelay(Dunning):
    delay = dt.timedelta(hours=2)


class DunningOtherEvent(Dunning):
    event_name = "Refunded"


class DunningShorterTimeout(Dunning):
    timeout = dt.timedelta(days=1)


class DunningCalendarTimer(Dunning):
    def handle(self) -> WorkflowGenerator:
        yield echo("invoice")
        yield wait.at("09:00")
        event = yield wait.event(self.event_name, timeout=self.timeout)
        return None if event is None else event.data


class DunningEventFirst(Dunning):
    def handle(self) -> WorkflowGenerator:
        yield echo("invoice")
        event = yield wait.event(self.event_name, timeout=self.timeout)
        yield wait.for_(self.delay)
        return None if event is None else event.data


class Appointment(Workflow):
    """Calendar and absolute timers, whose rules replay whatever form the code gives them."""

    moment = dt.datetime(2026, 5, 4, 9, 0, tzinfo=dt.UTC)
    day: int | str = "monday"
    clock: dt.time | str = "09:00"

    def handle(self) -> WorkflowGenerator:
        yield wait.until(self.moment)
        yield wait.weekday(self.day, self.clock, tz="Europe/Paris")
        yield wait.at(self.clock, tz="Europe/Paris")
        yield wait.day_of_month(4, self.clock, tz="Europe/Paris")
        return "done"


class AppointmentOtherForms(Appointment):
    moment = dt.datetime(2026, 5, 4, 11, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    day = 0
    clock = dt.time(9, 0)


class AwaitsDelivery(Workflow):
    def __init__(self) -> None:
        self.received: Any = "not resumed"

    def handle(self) -> WorkflowGenerator:
        self.received = yield wait.event(["Delivered", "Lost"], timeout=60)
        return None


# wait.first()


class PayOrExpire(Workflow):
    """Races a charge against a timer and a cancellation event, and keeps what it saw."""

    def __init__(self) -> None:
        self.winner: Any = None
        self.failure: TaskFailed | None = None
        self.now_after: dt.datetime | None = None

    def handle(self) -> WorkflowGenerator:
        try:
            self.winner = yield wait.first(
                Charge("A-17"), wait.for_(minutes=30), wait.event("Cancelled")
            )
        except TaskFailed as error:
            self.failure = error
        self.now_after = zenflow.now()
        position = None if self.winner is None else self.winner.position
        yield echo(position)
        return position


# Child workflows.


class Invoice(Workflow):
    def __init__(self, order: str) -> None:
        self.order = order

    def id(self) -> str:
        return f"invoice-{self.order}"

    def handle(self) -> WorkflowGenerator:
        return (yield echo(self.order))


@workflow
def refund(order: str, amount: int) -> WorkflowGenerator:
    return (yield echo([order, amount]))


class Checkout(Workflow):
    def handle(self) -> WorkflowGenerator:
        total = yield Invoice("A-17")
        detached = yield Invoice("A-18").dispatch()
        return {"total": total, "detached": detached}


class CheckoutWithFunctionChild(Workflow):
    def handle(self) -> WorkflowGenerator:
        return (yield refund("A-17", amount=300, business_id="refund-A-17"))


class CheckoutCatchesChild(Workflow):
    def handle(self) -> WorkflowGenerator:
        try:
            yield Invoice("A-17")
        except TaskFailed as error:
            return {"task": error.task, "step": error.step, "message": error.error_message}
        return None


class DispatchesWithClient(Workflow):
    def handle(self) -> WorkflowGenerator:
        yield Invoice("A-17").dispatch(client=object())  # type: ignore[arg-type]


# Deterministic time and randomness.


class ReadsClock(Workflow):
    def handle(self) -> WorkflowGenerator:
        times = [zenflow.now()]
        yield echo(1)
        times.append(zenflow.now())
        yield [echo(2), echo(3)]
        times.append(zenflow.now())
        return times


class DrawsRandom(Workflow):
    def handle(self) -> WorkflowGenerator:
        before = [zenflow.random().random(), zenflow.random().random()]
        ids_before = [zenflow.uuid4(), zenflow.uuid4()]
        yield echo(1)
        after = [zenflow.random().random()]
        ids_after = [zenflow.uuid4()]
        return {
            "before": before,
            "after": after,
            "ids_before": [str(value) for value in ids_before],
            "ids_after": [str(value) for value in ids_after],
            "versions": [value.version for value in [*ids_before, *ids_after]],
        }


# on_event handlers.


class Approval(Workflow):
    """Runs two steps while on_event audits each comment with a task of its own."""

    def __init__(self) -> None:
        self.notes: list[Any] = []
        self.handler_now: dt.datetime | None = None

    def handle(self) -> WorkflowGenerator:
        reserved = yield echo("reserve")
        shipped = yield echo(f"ship after {reserved}")
        return {"shipped": shipped, "notes": self.notes}

    def on_event(self, name: str, data: Any) -> WorkflowGenerator:
        self.handler_now = zenflow.now()
        note = yield Audit(f"{name}: {data['text']}")
        self.notes.append(note)


class RaceWithComments(Workflow):
    """Races a charge against a timer while on_event audits comments."""

    def handle(self) -> WorkflowGenerator:
        winner = yield wait.first(Charge("A-17"), wait.for_(minutes=30))
        return (yield echo(winner.position))

    def on_event(self, name: str, data: Any) -> WorkflowGenerator:
        yield Audit(f"{name}: {data['text']}")


class ApprovalWithoutHandler(Workflow):
    def handle(self) -> WorkflowGenerator:
        reserved = yield echo("reserve")
        shipped = yield echo(f"ship after {reserved}")
        return {"shipped": shipped, "notes": []}


# Driving executions the way the engine does.


def definition(target: Any, name: str | None = None) -> WorkflowDefinition:
    """Return ``target`` registered under ``name``, as changed code keeps the old name."""
    return WorkflowDefinition(name or target.workflow_name, target)


def new_execution(
    target: Any,
    *args: Any,
    history: History | None = None,
    name: str | None = None,
    run_id: str = RUN_ID,
) -> Execution:
    workflow_definition = definition(target, name)
    context = RunContext(run_id=run_id, workflow=workflow_definition.name)
    return Execution(workflow_definition, context, args, {}, history, started_at=STARTED_AT)


def copy_history(execution: Execution) -> History:
    """Return the history as the engine would load it: steps, outcomes and on_event starts."""
    steps = sorted(execution.history.steps.values(), key=lambda step: step.step)
    history = History([dataclasses.replace(step) for step in steps])
    history.handler_starts = list(execution.history.handler_starts)
    return history


class HistoryWriter:
    """Record outcomes and on_event starts at increasing history positions, as the engine does.

    Each entry gets the next position and a time one minute after the previous one.
    """

    def __init__(self, execution: Execution, seq: int = 10) -> None:
        self.execution = execution
        self.seq = seq

    def next_position(self) -> tuple[int, dt.datetime]:
        self.seq += 1
        return self.seq, STARTED_AT + dt.timedelta(minutes=self.seq)

    def complete(self, step: int, value: Any = None) -> Outcome:
        seq, at = self.next_position()
        outcome = Outcome(True, value=value, seq=seq, at=at)
        self.execution.record_outcome(step, outcome)
        return outcome

    def fail(self, step: int, message: str) -> Outcome:
        seq, at = self.next_position()
        error = {"type": "ValueError", "message": message, "traceback": "Traceback ...\n"}
        outcome = Outcome(False, error=error, seq=seq, at=at)
        self.execution.record_outcome(step, outcome)
        return outcome

    def cancel(self, step: int) -> Outcome:
        seq, at = self.next_position()
        outcome = Outcome(True, seq=seq, at=at, cancelled=True)
        self.execution.record_outcome(step, outcome)
        return outcome

    def hand_to_handler(self, name: str, data: Any) -> HandlerStart:
        seq, at = self.next_position()
        start = HandlerStart(seq=seq, name=name, data=data, at=at)
        self.execution.history.handler_starts.append(start)
        return start


def value_of(step: Step) -> Any:
    """Return the outcome value the engine would record for a step of the workflows here."""
    if step.kind == "event":
        return Event(step.event_names[0], {"amount": 42}, STARTED_AT + dt.timedelta(hours=2))
    if step.kind == "timer":
        return None
    return f"{step.name}#{step.step}"


def drive(execution: Execution, resolve: Callable[[Step], Any] = value_of) -> list[Progress]:
    """Advance until the run finishes, completing every awaited step in step order."""
    writer = HistoryWriter(execution)
    progresses = [execution.advance()]
    while progresses[-1].finished is None:
        waiting = [
            step for step in execution.pending if step.mode == "execute" and step.outcome is None
        ]
        assert waiting, "the execution waits for nothing but did not finish"
        for step in waiting:
            writer.complete(step.step, resolve(step))
        progresses.append(execution.advance())
    return progresses


def recorded_run(target: Any, *args: Any) -> Execution:
    execution = new_execution(target, *args)
    drive(execution)
    assert execution.finished is not None
    return execution


def commands(history: History) -> list[tuple[Any, ...]]:
    return [
        (step.step, step.decision, step.kind, step.mode, step.name, step.queue, step.payload)
        for step in sorted(history.steps.values(), key=lambda step: step.step)
    ]


def result_of(execution: Execution) -> Any:
    finished = execution.finished
    assert finished is not None
    assert finished.status == "completed", finished.error
    assert finished.result is not None
    return serializer.decode(finished.result)


def nondeterminism_of(progress: Progress) -> dict[str, Any]:
    finished = progress.finished
    assert finished is not None
    assert finished.status == "failed"
    error = finished.error
    assert error is not None
    assert error["type"] == "NonDeterminismError", error
    return error


# Timers and event waits as steps.


def test_timer_becomes_timer_step() -> None:
    execution = new_execution(WaitsOneHour)

    (step,) = execution.advance().new_steps

    assert step.kind == "timer"
    assert step.mode == "execute"
    assert step.name == ""
    assert step.queue == ""
    assert step.batch is None
    assert step.first is False
    assert serializer.decode(step.payload) == {"kind": "duration", "seconds": 3600.0}
    assert step.describe() == "wait 1h"


def test_event_wait_becomes_event_step() -> None:
    execution = new_execution(AwaitsDelivery)

    (step,) = execution.advance().new_steps

    assert step.kind == "event"
    assert step.mode == "execute"
    assert step.name == "Delivered,Lost"
    assert step.event_names == ("Delivered", "Lost")
    assert serializer.decode(step.payload) == {"names": ["Delivered", "Lost"], "timeout": 60.0}
    assert step.describe() == "wait for event 'Delivered' or 'Lost', timeout 1m"


def test_fired_timer_resumes_with_none() -> None:
    execution = new_execution(WaitsOneHour)
    execution.advance()

    HistoryWriter(execution).complete(1)
    finished = execution.advance().finished

    assert finished is not None
    assert finished.status == "completed"
    assert result_of(execution) is None


def test_pending_timer_leaves_run_waiting() -> None:
    execution = new_execution(WaitsOneHour)
    execution.advance()

    progress = execution.advance()

    assert progress.finished is None
    assert progress.new_steps == []
    assert [step.step for step in execution.pending] == [1]


def test_dunning_records_each_wait_kind() -> None:
    live = recorded_run(Dunning)

    kinds = [step.kind for step in live.history.steps.values()]

    assert kinds == ["task", "timer", "event"]
    assert result_of(live) == {"amount": 42}


@pytest.mark.parametrize("changed_code", [DunningDelayInSeconds, DunningDelayAsFloat])
def test_timer_replay_ignores_fire_instant(changed_code: Any) -> None:
    live = recorded_run(Dunning)
    history = copy_history(live)
    # The engine stores when each wait was scheduled and when it fires. These instants differ
    # on every run, so replay compares the rule only.
    for step in history.steps.values():
        step.scheduled_at = STARTED_AT + dt.timedelta(days=30)
        step.fire_at = STARTED_AT + dt.timedelta(days=31)
    replay = new_execution(changed_code, history=history, name="Dunning")

    progress = replay.advance()

    assert progress.new_steps == []
    assert progress.finished == live.finished


def test_calendar_timer_rules_replay_in_other_forms() -> None:
    live = recorded_run(Appointment)
    replay = new_execution(AppointmentOtherForms, history=copy_history(live), name="Appointment")

    progress = replay.advance()

    assert progress.new_steps == []
    assert progress.finished == live.finished


WAIT_MISMATCHES = [
    pytest.param(DunningLongerDelay, 2, "wait 1h", "wait 2h", id="timer-duration"),
    pytest.param(
        DunningCalendarTimer, 2, "wait 1h", "wait until 09:00:00 UTC", id="timer-rule-kind"
    ),
    pytest.param(
        DunningOtherEvent,
        3,
        "wait for event 'Paid', timeout 7d",
        "wait for event 'Refunded', timeout 7d",
        id="event-name",
    ),
    pytest.param(
        DunningShorterTimeout,
        3,
        "wait for event 'Paid', timeout 7d",
        "wait for event 'Paid', timeout 1d",
        id="event-timeout",
    ),
    pytest.param(
        DunningEventFirst,
        2,
        "wait 1h",
        "wait for event 'Paid', timeout 7d",
        id="timer-became-event",
    ),
]


@pytest.mark.parametrize(("changed_code", "step", "recorded", "actual"), WAIT_MISMATCHES)
def test_changed_wait_fails_with_mismatch(
    changed_code: Any, step: int, recorded: str, actual: str
) -> None:
    live = recorded_run(Dunning)
    replay = new_execution(changed_code, history=copy_history(live), name="Dunning")

    progress = replay.advance()

    assert progress.new_steps == []
    error = nondeterminism_of(progress)
    assert error["step"] == step
    assert error["recorded"] == recorded
    assert error["actual"] == actual
    assert f"at step {step}:" in error["message"]


def test_changed_wait_of_parked_run_fails() -> None:
    parked = new_execution(Dunning)
    writer = HistoryWriter(parked)
    parked.advance()
    writer.complete(1, "invoiced")
    parked.advance()
    replay = new_execution(DunningLongerDelay, history=copy_history(parked), name="Dunning")

    progress = replay.advance()

    assert progress.new_steps == []
    assert nondeterminism_of(progress)["step"] == 2


def test_event_wait_resumes_with_event() -> None:
    execution = new_execution(AwaitsDelivery)
    execution.advance()
    received_at = dt.datetime(2026, 3, 2, 9, 15, tzinfo=dt.UTC)
    event = Event("Lost", {"carrier": "post"}, received_at)

    HistoryWriter(execution).complete(1, event)
    execution.advance()

    assert execution.instance.received == Event("Lost", {"carrier": "post"}, received_at)


def test_timed_out_event_wait_resumes_with_none() -> None:
    execution = new_execution(AwaitsDelivery)
    execution.advance()

    HistoryWriter(execution).complete(1, None)
    execution.advance()

    assert execution.instance.received is None


# wait.first()


def test_first_yields_one_decision_of_three_kinds() -> None:
    execution = new_execution(PayOrExpire)

    steps = execution.advance().new_steps

    assert [step.kind for step in steps] == ["task", "timer", "event"]
    assert [step.step for step in steps] == [1, 2, 3]
    assert {step.decision for step in steps} == {1}
    assert all(step.first for step in steps)
    assert {step.batch for step in steps} == {3}


def test_first_waits_while_nothing_resolved() -> None:
    execution = new_execution(PayOrExpire)
    execution.advance()

    progress = execution.advance()

    assert progress.new_steps == []
    assert progress.cancelled == []
    assert execution.instance.winner is None


def test_first_winner_by_history_position() -> None:
    execution = new_execution(PayOrExpire)
    execution.advance()
    event = Event("Cancelled", {"by": "customer"}, STARTED_AT)
    # Both results arrive before the workflow resumes. The event has the earlier position,
    # although the task comes first in the list and its outcome is set first here.
    execution.record_outcome(1, Outcome(True, value="charged", seq=12, at=STARTED_AT))
    execution.record_outcome(3, Outcome(True, value=event, seq=11, at=STARTED_AT))

    execution.advance()

    assert isinstance(execution.instance.winner, First)
    assert execution.instance.winner == First(2, event)


def test_first_sends_task_winner() -> None:
    execution = new_execution(PayOrExpire)
    execution.advance()
    writer = HistoryWriter(execution)

    writer.complete(1, "charged")
    writer.complete(2)
    execution.advance()

    assert execution.instance.winner == First(0, "charged")


def test_first_cancels_unresolved_losing_waits() -> None:
    execution = new_execution(PayOrExpire)
    execution.advance()

    HistoryWriter(execution).complete(1, "charged")
    progress = execution.advance()

    # The timer and the event wait are cancelled, but a task that loses goes on running.
    assert [step.step for step in progress.cancelled] == [2, 3]


def test_first_keeps_losing_task_running() -> None:
    execution = new_execution(PayOrExpire)
    execution.advance()

    HistoryWriter(execution).complete(2)
    progress = execution.advance()

    assert [step.step for step in progress.cancelled] == [3]


def test_first_does_not_cancel_resolved_loser() -> None:
    execution = new_execution(PayOrExpire)
    execution.advance()
    writer = HistoryWriter(execution)

    writer.complete(1, "charged")
    writer.complete(2)  # the timer fired after the charge, before the workflow resumed
    progress = execution.advance()

    assert execution.instance.winner == First(0, "charged")
    assert [step.step for step in progress.cancelled] == [3]


def test_first_ignores_cancelled_outcome() -> None:
    execution = new_execution(PayOrExpire)
    execution.advance()
    writer = HistoryWriter(execution)

    writer.cancel(2)
    progress = execution.advance()

    assert progress.new_steps == []
    assert execution.instance.winner is None


def test_first_cancelled_outcome_never_wins() -> None:
    execution = new_execution(PayOrExpire)
    execution.advance()
    writer = HistoryWriter(execution)

    writer.cancel(2)
    writer.complete(1, "charged")
    execution.advance()

    assert execution.instance.winner == First(0, "charged")


def test_first_failed_winner_raises_at_yield() -> None:
    execution = new_execution(PayOrExpire)
    execution.advance()

    HistoryWriter(execution).fail(1, "card declined")
    progress = execution.advance()

    failure = execution.instance.failure
    assert isinstance(failure, TaskFailed)
    assert failure.task == "Charge"
    assert failure.step == 1
    assert failure.error_type == "ValueError"
    assert failure.error_message == "card declined"
    assert execution.instance.winner is None
    assert [step.step for step in progress.cancelled] == [2, 3]


def test_first_failed_loser_is_ignored() -> None:
    execution = new_execution(PayOrExpire)
    execution.advance()
    writer = HistoryWriter(execution)

    writer.complete(2)
    writer.fail(1, "card declined")
    execution.advance()

    assert execution.instance.failure is None
    assert execution.instance.winner == First(1, None)


def test_first_sets_now_to_winner_time() -> None:
    execution = new_execution(PayOrExpire)
    execution.advance()
    writer = HistoryWriter(execution)

    winner = writer.complete(2)
    writer.complete(1, "charged")
    execution.advance()

    assert execution.instance.now_after == winner.at


def test_first_replay_picks_same_winner() -> None:
    live = new_execution(PayOrExpire)
    writer = HistoryWriter(live)
    live.advance()
    event = Event("Cancelled", {"by": "customer"}, STARTED_AT)
    writer.complete(3, event)
    first_progress = live.advance()
    # What the engine records next: the timer's cancellation, the losing charge's late
    # result, then the result of the step that the workflow yielded after the race.
    for step in first_progress.cancelled:
        writer.cancel(step.step)
    writer.complete(1, "charged late")
    writer.complete(4, "echoed")
    live.advance()
    replay = new_execution(PayOrExpire, history=copy_history(live))

    progress = replay.advance()

    assert progress.new_steps == []
    assert progress.cancelled == []
    assert progress.finished == live.finished
    assert replay.instance.winner == First(2, event)
    assert replay.instance.now_after == live.instance.now_after
    assert result_of(replay) == 2


def test_first_replay_reraises_failed_winner() -> None:
    live = new_execution(PayOrExpire)
    writer = HistoryWriter(live)
    live.advance()
    writer.fail(1, "card declined")
    for step in live.advance().cancelled:
        writer.cancel(step.step)
    writer.complete(4, "echoed")
    live.advance()
    replay = new_execution(PayOrExpire, history=copy_history(live))

    replay.advance()

    failure = replay.instance.failure
    assert isinstance(failure, TaskFailed)
    assert failure.step == 1
    assert replay.finished == live.finished


# Child workflows.


def test_child_workflow_becomes_child_step() -> None:
    execution = new_execution(Checkout)

    (step,) = execution.advance().new_steps

    assert step.kind == "child"
    assert step.mode == "execute"
    assert step.name == "Invoice"
    assert step.queue == ""
    assert serializer.decode(step.payload) == [["A-17"], {}, "invoice-A-17"]
    assert step.describe() == "workflow Invoice('A-17')"


def test_function_child_keeps_business_id() -> None:
    execution = new_execution(CheckoutWithFunctionChild)

    (step,) = execution.advance().new_steps

    assert step.kind == "child"
    assert step.name == "refund"
    assert serializer.decode(step.payload) == [["A-17"], {"amount": 300}, "refund-A-17"]


def test_dispatched_child_returns_derived_run_id() -> None:
    execution = new_execution(Checkout)
    execution.advance()

    HistoryWriter(execution).complete(1, 4200)
    progress = execution.advance()

    (step,) = progress.new_steps
    assert step.kind == "child"
    assert step.mode == "dispatch"
    # A dispatched child does not hold the workflow back: it finishes in the same advance.
    assert progress.finished is not None
    assert result_of(execution) == {"total": 4200, "detached": child_run_id(RUN_ID, 2)}


def test_child_run_id_per_parent_step() -> None:
    derived = child_run_id(RUN_ID, 2)

    assert uuid.UUID(derived).version == 5
    assert derived == child_run_id(RUN_ID, 2)
    assert derived != child_run_id(RUN_ID, 3)
    assert derived != child_run_id("run-2", 2)


def test_child_workflow_replays_identically() -> None:
    live = recorded_run(Checkout)
    replay = new_execution(Checkout, history=copy_history(live))

    progress = replay.advance()

    assert progress.new_steps == []
    assert progress.finished == live.finished
    assert commands(replay.history) == commands(live.history)


def test_failed_child_raises_task_failed() -> None:
    execution = new_execution(CheckoutCatchesChild)
    execution.advance()

    HistoryWriter(execution).fail(1, "child run c-1: no stock")
    execution.advance()

    assert result_of(execution) == {
        "task": "workflow Invoice",
        "step": 1,
        "message": "child run c-1: no stock",
    }


def test_dispatch_with_client_inside_workflow_fails() -> None:
    execution = new_execution(DispatchesWithClient)

    finished = execution.advance().finished

    assert finished is not None
    assert finished.error is not None
    assert finished.error["type"] == "DefinitionError"
    assert "cannot pass a client" in finished.error["message"]


# zenflow.now(), zenflow.random() and zenflow.uuid4().


def test_now_follows_resolving_outcomes() -> None:
    execution = new_execution(ReadsClock)
    writer = HistoryWriter(execution)
    execution.advance()
    first = writer.complete(1, "one")
    execution.advance()
    writer.complete(2, "two")
    last = writer.complete(3, "three")
    execution.advance()

    times = result_of(execution)

    assert times == [STARTED_AT, first.at, last.at]


def test_now_replays_identically() -> None:
    live = recorded_run(ReadsClock)
    replay = new_execution(ReadsClock, history=copy_history(live))

    replay.advance()

    assert result_of(replay) == result_of(live)


def test_random_replays_identically() -> None:
    live = recorded_run(DrawsRandom)
    replay = new_execution(DrawsRandom, history=copy_history(live))

    replay.advance()

    assert replay.finished == live.finished


def test_random_differs_between_decisions() -> None:
    drawn = result_of(recorded_run(DrawsRandom))

    assert drawn["before"][0] != drawn["after"][0]
    assert drawn["ids_before"][0] != drawn["ids_after"][0]


def test_random_draws_differ_within_decision() -> None:
    drawn = result_of(recorded_run(DrawsRandom))

    assert drawn["before"][0] != drawn["before"][1]
    assert drawn["ids_before"][0] != drawn["ids_before"][1]


def test_uuid4_has_version_4() -> None:
    drawn = result_of(recorded_run(DrawsRandom))

    assert drawn["versions"] == [4, 4, 4]


def test_random_differs_between_runs() -> None:
    first = new_execution(DrawsRandom, run_id="run-1")
    second = new_execution(DrawsRandom, run_id="run-2")
    drive(first)
    drive(second)

    assert result_of(first)["ids_before"] != result_of(second)["ids_before"]


@pytest.mark.parametrize("function", [zenflow.now, zenflow.random, zenflow.uuid4])
def test_replay_safe_helpers_outside_workflow_fail(function: Callable[[], Any]) -> None:
    with pytest.raises(DefinitionError, match=rf"zenflow\.{function.__name__}\(\)"):
        function()


# on_event handlers.


def approval_history() -> tuple[Execution, list[Progress]]:
    """Run Approval with a comment that arrives between its steps, and return the run.

    History positions: 11 the comment goes to on_event, 12 step 1's result, 13 the
    handler's audit result, 14 step 3's result.
    """
    execution = new_execution(Approval)
    writer = HistoryWriter(execution)
    progresses = [execution.advance()]  # step 1: echo("reserve")
    writer.hand_to_handler("Comment", {"text": "fragile"})
    progresses.append(execution.advance())  # step 2: Audit from on_event
    writer.complete(1, "R-1")
    progresses.append(execution.advance())  # step 3: echo("ship after R-1")
    writer.complete(2, "audited")
    progresses.append(execution.advance())  # on_event returns
    writer.complete(3, "S-1")
    progresses.append(execution.advance())  # handle returns
    return execution, progresses


def test_on_event_handler_yields_task_step() -> None:
    execution = new_execution(Approval)
    writer = HistoryWriter(execution)
    execution.advance()

    start = writer.hand_to_handler("Comment", {"text": "fragile"})
    progress = execution.advance()

    (step,) = progress.new_steps
    assert step.kind == "task"
    assert step.name == "Audit"
    assert step.step == 2
    assert step.decision == 2
    assert step.describe() == "Audit('Comment: fragile')"
    assert execution.instance.handler_now == start.at
    assert [step.step for step in execution.pending] == [1, 2]


def test_on_event_interleaves_with_handle() -> None:
    execution, progresses = approval_history()

    new_steps = [[step.step for step in progress.new_steps] for progress in progresses]

    assert new_steps == [[1], [2], [3], [], []]
    assert result_of(execution) == {"shipped": "S-1", "notes": ["audited"]}


def test_on_event_replay_repeats_interleaving() -> None:
    live, _ = approval_history()
    replay = new_execution(Approval, history=copy_history(live))

    progress = replay.advance()

    assert progress.new_steps == []
    assert progress.finished == live.finished
    assert commands(replay.history) == commands(live.history)
    assert replay.instance.handler_now == live.instance.handler_now


def test_on_event_parked_replay_continues_live() -> None:
    parked = new_execution(Approval)
    writer = HistoryWriter(parked)
    parked.advance()
    writer.hand_to_handler("Comment", {"text": "fragile"})
    parked.advance()
    writer.complete(1, "R-1")
    parked.advance()
    replay = new_execution(Approval, history=copy_history(parked))
    writer = HistoryWriter(replay, seq=writer.seq)

    progress = replay.advance()
    pending = sorted(step.step for step in replay.pending)
    writer.complete(2, "audited")
    replay.advance()
    writer.complete(3, "S-1")
    replay.advance()

    assert progress.new_steps == []
    assert pending == [2, 3]
    assert result_of(replay) == {"shipped": "S-1", "notes": ["audited"]}


def test_on_event_replay_follows_history_order() -> None:
    live, _ = approval_history()
    history = copy_history(live)
    # Move the comment after step 1's result: handle now resumes first and yields step 3's
    # command at decision 2, where history recorded the handler's Audit.
    (start,) = history.handler_starts
    history.handler_starts = [dataclasses.replace(start, seq=12)]
    outcome = history.steps[1].outcome
    assert outcome is not None
    history.steps[1].outcome = dataclasses.replace(outcome, seq=11)
    replay = new_execution(Approval, history=history)

    error = nondeterminism_of(replay.advance())

    assert error["step"] == 2
    assert error["recorded"] == "Audit('Comment: fragile')"
    assert error["actual"] == "echo('ship after R-1')"


def test_replay_without_on_event_fails() -> None:
    live, _ = approval_history()
    replay = new_execution(ApprovalWithoutHandler, history=copy_history(live), name="Approval")

    progress = replay.advance()

    assert progress.new_steps == []
    error = nondeterminism_of(progress)
    assert "the event 'Comment' to on_event" in error["message"]


def test_missing_on_event_error_names_step() -> None:
    live, _ = approval_history()
    replay = new_execution(ApprovalWithoutHandler, history=copy_history(live), name="Approval")

    error = nondeterminism_of(replay.advance())

    # Like the other non-determinism failures, the stored error names the step where replay
    # diverged and what history recorded there. The run_failed entry takes its step from it.
    assert error.get("step") == 2
    assert error.get("recorded") == "on_event('Comment', ...)"
    assert error.get("actual") == "no on_event"


def test_two_handlers_run_in_history_order() -> None:
    live = new_execution(Approval)
    writer = HistoryWriter(live)
    live.advance()
    writer.hand_to_handler("Comment", {"text": "first"})
    writer.hand_to_handler("Comment", {"text": "second"})
    progress = live.advance()
    writer.complete(3, "audited second")
    writer.complete(2, "audited first")
    writer.complete(1, "R-1")
    live.advance()
    writer.complete(4, "S-1")
    live.advance()
    replay = new_execution(Approval, history=copy_history(live))

    replayed = replay.advance()

    assert [step.describe() for step in progress.new_steps] == [
        "Audit('Comment: first')",
        "Audit('Comment: second')",
    ]
    assert result_of(live)["notes"] == ["audited second", "audited first"]
    assert replayed.new_steps == []
    assert replay.finished == live.finished


def test_first_resumes_at_winner_position() -> None:
    live = new_execution(RaceWithComments)
    writer = HistoryWriter(live)
    live.advance()
    writer.complete(2)  # the timer fires first, so handle resumes before the comment
    live.advance()
    writer.hand_to_handler("Comment", {"text": "late"})
    live.advance()
    writer.complete(1, "charged late")
    writer.complete(3, "echoed")
    writer.complete(4, "audited")
    live.advance()
    replay = new_execution(RaceWithComments, history=copy_history(live))

    progress = replay.advance()

    assert [step.describe() for step in live.history.steps.values()][2:] == [
        "echo(1)",
        "Audit('Comment: late')",
    ]
    assert progress.new_steps == []
    assert replay.finished == live.finished


def test_run_end_closes_running_handler() -> None:
    execution = new_execution(Approval)
    writer = HistoryWriter(execution)
    execution.advance()
    writer.hand_to_handler("Comment", {"text": "fragile"})
    execution.advance()
    writer.complete(1, "R-1")
    execution.advance()

    writer.complete(3, "S-1")  # handle ends while the handler waits for its audit
    progress = execution.advance()

    assert progress.finished is not None
    assert execution.threads == []
    assert result_of(execution) == {"shipped": "S-1", "notes": []}
