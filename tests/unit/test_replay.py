"""Replay of recorded history by engine.replay, without a broker or a database.

Each test drives an :class:`Execution` the way the engine does: advance, record the outcome
of every new step, advance again. A replay is a fresh execution of the same (or changed)
workflow code over a copy of the recorded history.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from engine.replay import Execution, History, Outcome, Progress, Step
from zenflow import Task, TaskFailed, Workflow, current_run, get_logger, serializer, task, workflow
from zenflow.context import RunContext
from zenflow.registry import Registry, WorkflowDefinition


class ReserveStock(Task):
    queue = "stock"

    def __init__(self, sku: str, quantity: int = 1) -> None:
        self.sku = sku
        self.quantity = quantity


class Reserve(Task):
    """ReserveStock under a new name."""

    queue = "stock"

    def __init__(self, sku: str) -> None:
        self.sku = sku


class ReserveElsewhere(Task):
    """ReserveStock with the same name and arguments, on another queue."""

    task_name = "ReserveStock"
    queue = "warehouse"

    def __init__(self, sku: str) -> None:
        self.sku = sku


class Ship(Task):
    queue = "parked"

    def __init__(self, reservation: object) -> None:
        self.reservation = reservation


class Audit(Task):
    queue = "stock"

    def __init__(self, note: str) -> None:
        self.note = note


class Fail(Task):
    def __init__(self, message: str) -> None:
        self.message = message


@task
def echo(value: object) -> object:
    return value


@task(queue="side")
def notify(note: str) -> None:
    return None


# The recorded code, and one changed version per kind of non-determinism.


class Shipment(Workflow):
    def __init__(self, sku: str) -> None:
        self.sku = sku

    def handle(self):  # type: ignore[no-untyped-def]
        log = get_logger("shipping")
        log.info("shipment_started", sku=self.sku)
        reservation = yield ReserveStock(self.sku)
        log.info("stock_reserved", reservation=reservation)
        label = yield Ship(reservation)
        self.log.info("shipment_labelled", label=label)
        return {"reservation": reservation, "label": label}


class ShipmentRenamedTask(Shipment):
    def handle(self):  # type: ignore[no-untyped-def]
        reservation = yield Reserve(self.sku)
        label = yield Ship(reservation)
        return {"reservation": reservation, "label": label}


class ShipmentChangedArgument(Shipment):
    def handle(self):  # type: ignore[no-untyped-def]
        reservation = yield ReserveStock(self.sku, quantity=2)
        label = yield Ship(reservation)
        return {"reservation": reservation, "label": label}


class ShipmentInsertedStep(Shipment):
    def handle(self):  # type: ignore[no-untyped-def]
        log = get_logger("shipping")
        log.info("shipment_started", sku=self.sku)
        try:
            reservation = yield ReserveStock(self.sku)
            log.info("stock_reserved", reservation=reservation)
            yield Audit("inserted")
            label = yield Ship(reservation)
            return {"reservation": reservation, "label": label}
        finally:
            log.info("shipment_closed")


class ShipmentReturnsEarlier(Shipment):
    def handle(self):  # type: ignore[no-untyped-def]
        reservation = yield ReserveStock(self.sku)
        return {"reservation": reservation}


class ShipmentRemovedFirstStep(Shipment):
    def handle(self):  # type: ignore[no-untyped-def]
        label = yield Ship("no reservation")
        return {"label": label}


class ShipmentAsList(Shipment):
    def handle(self):  # type: ignore[no-untyped-def]
        (reservation,) = yield [ReserveStock(self.sku)]
        label = yield Ship(reservation)
        return {"reservation": reservation, "label": label}


class ShipmentDispatched(Shipment):
    def handle(self):  # type: ignore[no-untyped-def]
        reservation = yield ReserveStock(self.sku).dispatch()
        label = yield Ship(reservation)
        return {"reservation": reservation, "label": label}


class ShipmentOtherQueue(Shipment):
    def handle(self):  # type: ignore[no-untyped-def]
        reservation = yield ReserveElsewhere(self.sku)
        label = yield Ship(reservation)
        return {"reservation": reservation, "label": label}


class Batch(Workflow):
    def __init__(self, skus: list[str]) -> None:
        self.skus = skus

    def handle(self):  # type: ignore[no-untyped-def]
        reservations = yield [ReserveStock(sku) for sku in self.skus]
        label = yield Ship(reservations)
        return {"reservations": reservations, "label": label}


class BatchOneMore(Batch):
    def handle(self):  # type: ignore[no-untyped-def]
        reservations = yield [ReserveStock(sku) for sku in [*self.skus, "C-3"]]
        label = yield Ship(reservations)
        return {"reservations": reservations, "label": label}


class BatchOneFewer(Batch):
    def handle(self):  # type: ignore[no-untyped-def]
        reservations = yield [ReserveStock(sku) for sku in self.skus[:-1]]
        label = yield Ship(reservations)
        return {"reservations": reservations, "label": label}


class BatchChangedItem(Batch):
    def handle(self):  # type: ignore[no-untyped-def]
        reservations = yield [ReserveStock(self.skus[0]), ReserveStock("X-9")]
        label = yield Ship(reservations)
        return {"reservations": reservations, "label": label}


class CatchAndContinue(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        log = get_logger("payments")
        try:
            yield Fail("card declined")
        except TaskFailed as error:
            log.info("payment_failed", error=error.error_message)
            refund = yield echo(f"recovered from {error.error_type}: {error.error_message}")
            more = yield [echo("a"), echo("b")]
            return {"refund": refund, "more": more, "failed_step": error.step}
        return "not reached"


class Uncaught(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        yield echo(1)
        yield Fail("boom")
        return "not reached"


def reserve_twice(sku: str):  # type: ignore[no-untyped-def]
    first = yield ReserveStock(sku)
    second = yield ReserveStock(sku, quantity=2)
    return [first, second]


class UsesHelper(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        reservations = yield from reserve_twice("A-1")
        label = yield Ship(reservations)
        return {"reservations": reservations, "label": label}


class EmptyList(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        nothing = yield []
        value = yield echo(len(nothing))
        also_nothing = yield []
        return {"nothing": nothing, "value": value, "also_nothing": also_nothing}


class DispatchOnly(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        first = yield notify("one").dispatch()
        second = yield [notify("two").dispatch(), notify("three").dispatch()]
        return {"first": first, "second": second}


class DispatchThenWait(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        detached = yield [notify("start").dispatch(), echo("waited")]
        return detached


class RecordsReplayFlag(Workflow):
    """Appends ``current_run().replaying`` at each point the generator resumes."""

    seen: list[bool] = []

    def handle(self):  # type: ignore[no-untyped-def]
        RecordsReplayFlag.seen.append(_replaying())
        yield echo(1)
        RecordsReplayFlag.seen.append(_replaying())
        yield echo(2)
        RecordsReplayFlag.seen.append(_replaying())
        return None


class EchoesMap(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        return (yield echo({"a": 1, "b": 2}))


class EchoesReorderedMap(EchoesMap):
    def handle(self):  # type: ignore[no-untyped-def]
        return (yield echo({"b": 2, "a": 1}))


@workflow
def reserve_and_ship(sku: str):  # type: ignore[no-untyped-def]
    reservation = yield ReserveStock(sku)
    return (yield Ship(reservation))


def _replaying() -> bool:
    run = current_run()
    assert run is not None
    return run.replaying


# Driving executions.


def registry_with(*targets: Any) -> Registry:
    registry = Registry()
    for target in targets:
        registry.add_workflow(target)
    return registry


def definition(target: Any, name: str | None = None) -> WorkflowDefinition:
    """Return ``target`` registered under ``name``, as changed code keeps the old name."""
    return WorkflowDefinition(name or target.workflow_name, target)


def new_execution(
    target: Any, *args: Any, history: History | None = None, name: str | None = None
) -> Execution:
    workflow = definition(target, name)
    context = RunContext(run_id="run-1", workflow=workflow.name)
    return Execution(workflow, context, args, {}, history)


def succeed(step: Step) -> Outcome:
    """Return a result that names the step, so that later commands depend on it.

    ``Fail`` steps fail with a ValueError carrying the task's argument, as an agent reports.
    """
    if step.name == "Fail":
        args, _kwargs = serializer.decode(step.payload)
        return Outcome(
            False,
            error={
                "type": "ValueError",
                "message": args[0],
                "traceback": "Traceback (most recent call last):\n  raise ValueError(message)\n",
            },
        )
    return Outcome(True, value=f"{step.name}#{step.step}")


def drive(
    execution: Execution,
    resolve: Callable[[Step], Outcome] = succeed,
    stop_before: int | None = None,
) -> list[Progress]:
    """Advance until the run finishes, or until step ``stop_before`` is scheduled.

    Dispatched steps get no outcome, as their result never resumes the workflow.
    """
    progresses = [execution.advance()]
    while progresses[-1].finished is None:
        waiting = [
            step for step in execution.pending if step.mode == "execute" and step.outcome is None
        ]
        assert waiting, "the execution waits for nothing but did not finish"
        if stop_before is not None and any(step.step >= stop_before for step in waiting):
            break
        for step in waiting:
            execution.record_outcome(step.step, resolve(step))
        progresses.append(execution.advance())
    return progresses


def copy_history(execution: Execution) -> History:
    """Return the history as the engine would load it from the database."""
    steps = sorted(execution.history.steps.values(), key=lambda step: step.step)
    return History([dataclasses.replace(step) for step in steps])


def commands(history: History) -> list[tuple[Any, ...]]:
    return [
        (step.step, step.decision, step.mode, step.name, step.queue, step.payload, step.batch)
        for step in sorted(history.steps.values(), key=lambda step: step.step)
    ]


def recorded_run(target: Any, *args: Any) -> Execution:
    execution = new_execution(target, *args)
    drive(execution)
    assert execution.finished is not None
    return execution


# Replay of unchanged code.


@pytest.mark.parametrize(
    ("target", "args"),
    [
        (Shipment, ("A-1",)),
        (Batch, (["A-1", "B-2"],)),
        (CatchAndContinue, ()),
        (UsesHelper, ()),
        (EmptyList, ()),
        (DispatchOnly, ()),
        (DispatchThenWait, ()),
    ],
)
def test_replay_repeats_recorded_run(target: Any, args: tuple[Any, ...]) -> None:
    live = recorded_run(target, *args)
    history = copy_history(live)

    replay = new_execution(target, *args, history=history)
    progress = replay.advance()

    assert progress.new_steps == []
    assert progress.finished == live.finished
    assert commands(replay.history) == commands(live.history)
    assert replay.next_step == live.next_step


def test_replay_result_matches_live_result() -> None:
    live = recorded_run(Shipment, "A-1")
    replay = new_execution(Shipment, "A-1", history=copy_history(live))

    finished = replay.advance().finished

    assert finished is not None
    assert finished.status == "completed"
    assert finished.result == live.finished.result  # type: ignore[union-attr]


def test_recorded_commands_of_shipment() -> None:
    live = recorded_run(Shipment, "A-1")

    described = [step.describe() for step in live.history.steps.values()]

    assert described == ["ReserveStock('A-1')", "Ship('ReserveStock#1')"]


def test_parked_replay_continues_live() -> None:
    parked = new_execution(Shipment, "A-1")
    drive(parked, stop_before=2)
    history = copy_history(parked)
    assert sorted(history.steps) == [1, 2]
    assert history.steps[2].outcome is None

    replay = new_execution(Shipment, "A-1", history=history)
    progress = replay.advance()
    assert progress.new_steps == []
    assert progress.finished is None
    assert [step.step for step in replay.pending] == [2]

    replay.record_outcome(2, Outcome(True, value="label-7"))
    finished = replay.advance().finished
    assert finished is not None
    assert finished.status == "completed"


def test_parked_replay_schedules_next_step() -> None:
    parked = new_execution(Batch, ["A-1", "B-2"])
    drive(parked, stop_before=1)
    history = copy_history(parked)
    history.steps[1].outcome = Outcome(True, value="r1")

    replay = new_execution(Batch, ["A-1", "B-2"], history=history)
    assert replay.advance().new_steps == []

    replay.record_outcome(2, Outcome(True, value="r2"))
    progress = replay.advance()

    assert [step.describe() for step in progress.new_steps] == ["Ship(['r1', 'r2'])"]
    assert progress.new_steps[0].step == 3
    assert progress.new_steps[0].decision == 2


def test_reordered_map_argument_matches() -> None:
    live = recorded_run(EchoesMap)
    replay = new_execution(EchoesReorderedMap, history=copy_history(live), name="EchoesMap")

    finished = replay.advance().finished

    assert finished is not None
    assert finished.status == "completed"


def test_function_workflow_replays() -> None:
    registry = registry_with(reserve_and_ship)
    definition = registry.workflows["reserve_and_ship"]
    live = Execution(definition, RunContext("run-2", definition.name), ("A-1",), {})
    drive(live)

    replay = Execution(
        definition, RunContext("run-2", definition.name), ("A-1",), {}, copy_history(live)
    )
    progress = replay.advance()

    assert progress.new_steps == []
    assert progress.finished == live.finished


# Changed code.

MISMATCHES = [
    pytest.param(
        Shipment,
        ShipmentRenamedTask,
        ("A-1",),
        1,
        "ReserveStock('A-1')",
        "Reserve('A-1')",
        id="task-renamed",
    ),
    pytest.param(
        Shipment,
        ShipmentChangedArgument,
        ("A-1",),
        1,
        "ReserveStock('A-1')",
        "ReserveStock('A-1', quantity=2)",
        id="argument-changed",
    ),
    pytest.param(
        Shipment,
        ShipmentInsertedStep,
        ("A-1",),
        2,
        "Ship('ReserveStock#1')",
        "Audit('inserted')",
        id="step-inserted",
    ),
    pytest.param(
        Shipment,
        ShipmentReturnsEarlier,
        ("A-1",),
        2,
        "Ship('ReserveStock#1')",
        "the workflow completed here",
        id="returns-earlier",
    ),
    pytest.param(
        Shipment,
        ShipmentRemovedFirstStep,
        ("A-1",),
        1,
        "ReserveStock('A-1')",
        "Ship('no reservation')",
        id="first-step-removed",
    ),
    pytest.param(
        Shipment,
        ShipmentAsList,
        ("A-1",),
        1,
        "ReserveStock('A-1')",
        "[ReserveStock('A-1')]",
        id="single-became-list",
    ),
    pytest.param(
        Shipment,
        ShipmentDispatched,
        ("A-1",),
        1,
        "ReserveStock('A-1')",
        "dispatch ReserveStock('A-1')",
        id="execute-became-dispatch",
    ),
    pytest.param(
        Batch,
        BatchOneMore,
        (["A-1", "B-2"],),
        1,
        "[ReserveStock('A-1'), ReserveStock('B-2')]",
        "[ReserveStock('A-1'), ReserveStock('B-2'), ReserveStock('C-3')]",
        id="list-grew",
    ),
    pytest.param(
        Batch,
        BatchOneFewer,
        (["A-1", "B-2"],),
        1,
        "[ReserveStock('A-1'), ReserveStock('B-2')]",
        "[ReserveStock('A-1')]",
        id="list-shrank",
    ),
    pytest.param(
        Batch,
        BatchChangedItem,
        (["A-1", "B-2"],),
        2,
        "ReserveStock('B-2')",
        "ReserveStock('X-9')",
        id="list-item-changed",
    ),
]


@pytest.mark.parametrize(
    ("recorded_code", "changed_code", "args", "step", "recorded", "actual"), MISMATCHES
)
def test_changed_code_fails_with_mismatch(
    recorded_code: Any,
    changed_code: Any,
    args: tuple[Any, ...],
    step: int,
    recorded: str,
    actual: str,
) -> None:
    live = recorded_run(recorded_code, *args)
    name = recorded_code.workflow_name
    replay = new_execution(changed_code, *args, history=copy_history(live), name=name)

    progress = replay.advance()

    assert progress.new_steps == []
    assert progress.finished is not None
    assert progress.finished.status == "failed"
    error = progress.finished.error
    assert error is not None
    assert error["type"] == "NonDeterminismError"
    assert error["step"] == step
    assert error["recorded"] == recorded
    assert error["actual"] == actual
    assert f"at step {step}" in error["message"]
    assert f"workflow {name} " in error["message"]
    assert recorded in error["message"]
    assert actual in error["message"]


@pytest.mark.parametrize(
    ("recorded_code", "changed_code", "args", "step", "recorded", "actual"), MISMATCHES
)
def test_parked_mismatch_schedules_nothing(
    recorded_code: Any,
    changed_code: Any,
    args: tuple[Any, ...],
    step: int,
    recorded: str,
    actual: str,
) -> None:
    parked = new_execution(recorded_code, *args)
    last_step = max(recorded_run(recorded_code, *args).history.steps)
    drive(parked, stop_before=last_step)
    name = recorded_code.workflow_name
    replay = new_execution(changed_code, *args, history=copy_history(parked), name=name)

    # The engine records the parked step's result first, then advances.
    replay.record_outcome(last_step, Outcome(True, value="late result"))
    progress = replay.advance()
    after = replay.advance()

    assert progress.new_steps == []
    assert progress.finished is not None
    assert progress.finished.error["type"] == "NonDeterminismError"  # type: ignore[index]
    assert replay.threads == []
    assert after.new_steps == []
    assert sorted(replay.history.steps) == sorted(parked.history.steps)


def test_queue_change_named_in_error() -> None:
    live = recorded_run(Shipment, "A-1")
    replay = new_execution(ShipmentOtherQueue, "A-1", history=copy_history(live), name="Shipment")

    finished = replay.advance().finished

    assert finished is not None
    assert finished.error is not None
    assert finished.error["type"] == "NonDeterminismError"
    # Only the queue differs, so the two descriptions must show it to explain the failure.
    assert finished.error["recorded"] != finished.error["actual"]


def test_mismatch_logs_nothing_from_workflow() -> None:
    live = recorded_run(Shipment, "A-1")
    replay = new_execution(ShipmentInsertedStep, "A-1", history=copy_history(live), name="Shipment")

    with capture_logs() as logs:
        replay.advance()

    # Neither the replayed lines nor the finally block of the dropped generator log.
    assert logs == []


# Logging and the replay flag.


def test_logger_logs_during_live_run() -> None:
    execution = new_execution(Shipment, "A-1")

    with capture_logs() as logs:
        drive(execution)

    events = [line["event"] for line in logs]
    assert events == ["shipment_started", "stock_reserved", "shipment_labelled"]


def test_logger_silent_until_last_result() -> None:
    live = recorded_run(Shipment, "A-1")
    replay = new_execution(Shipment, "A-1", history=copy_history(live))

    with capture_logs() as logs:
        replay.advance()

    # The engine replays when a step's result arrives: code after the last recorded
    # result runs for the first time, so it logs.
    assert [line["event"] for line in logs] == ["shipment_labelled"]


def test_logger_resumes_after_replayed_part() -> None:
    parked = new_execution(Shipment, "A-1")
    drive(parked, stop_before=2)
    replay = new_execution(Shipment, "A-1", history=copy_history(parked))

    with capture_logs() as replay_logs:
        replay.advance()
    replay.record_outcome(2, Outcome(True, value="label-7"))
    with capture_logs() as live_logs:
        replay.advance()

    assert replay_logs == []
    assert [line["event"] for line in live_logs] == ["shipment_labelled"]
    assert live_logs[0]["label"] == "label-7"


def test_caught_failure_logs_once() -> None:
    with capture_logs() as live_logs:
        live = recorded_run(CatchAndContinue)
    replay = new_execution(CatchAndContinue, history=copy_history(live))
    with capture_logs() as replay_logs:
        replay.advance()

    assert [line["event"] for line in live_logs] == ["payment_failed"]
    assert replay_logs == []


def test_replaying_flag_follows_history() -> None:
    RecordsReplayFlag.seen = []
    parked = new_execution(RecordsReplayFlag)
    drive(parked, stop_before=2)
    assert RecordsReplayFlag.seen == [False, False]

    RecordsReplayFlag.seen = []
    replay = new_execution(RecordsReplayFlag, history=copy_history(parked))
    replay.advance()
    replay.record_outcome(2, Outcome(True, value=2))
    replay.advance()

    assert RecordsReplayFlag.seen == [True, True, False]


def test_replaying_flag_cleared_after_advance() -> None:
    live = recorded_run(Shipment, "A-1")
    replay = new_execution(Shipment, "A-1", history=copy_history(live))

    replay.advance()

    assert replay.context.replaying is False
    assert current_run() is None


# Task failures, helpers, empty lists and dispatch.


def test_caught_failure_replays_identically() -> None:
    live = recorded_run(CatchAndContinue)
    assert live.finished is not None
    assert live.finished.status == "completed"
    replay = new_execution(CatchAndContinue, history=copy_history(live))

    progress = replay.advance()

    assert progress.new_steps == []
    assert progress.finished == live.finished
    described = [step.describe() for step in live.history.steps.values()]
    assert described == [
        "Fail('card declined')",
        "echo('recovered from ValueError: card declined')",
        "echo('a')",
        "echo('b')",
    ]


def test_uncaught_failure_replays_identically() -> None:
    live = recorded_run(Uncaught)
    assert live.finished is not None
    replay = new_execution(Uncaught, history=copy_history(live))

    finished = replay.advance().finished

    assert finished is not None
    assert finished.status == "failed"
    assert finished.error is not None
    assert finished.error["type"] == "TaskFailed"
    assert finished.error["step"] == 2
    assert finished.error["cause"]["message"] == "boom"
    assert finished.error["type"] == live.finished.error["type"]  # type: ignore[index]


def test_yield_from_numbers_helper_steps() -> None:
    live = recorded_run(UsesHelper)

    described = [step.describe() for step in live.history.steps.values()]
    decisions = [step.decision for step in live.history.steps.values()]

    assert described == [
        "ReserveStock('A-1')",
        "ReserveStock('A-1', quantity=2)",
        "Ship(['ReserveStock#1', 'ReserveStock#2'])",
    ]
    assert decisions == [1, 2, 3]


def test_empty_list_resumes_without_steps() -> None:
    execution = new_execution(EmptyList)

    first = execution.advance()
    assert [step.describe() for step in first.new_steps] == ["echo(0)"]
    execution.record_outcome(1, Outcome(True, value=0))
    second = execution.advance()

    assert second.new_steps == []
    assert second.finished is not None
    assert second.finished.status == "completed"
    assert sorted(execution.history.steps) == [1]


def test_empty_list_replays_identically() -> None:
    live = recorded_run(EmptyList)
    replay = new_execution(EmptyList, history=copy_history(live))

    finished = replay.advance().finished

    assert finished is not None
    assert finished == live.finished
    assert finished.result is not None
    result = serializer.decode(finished.result)
    assert result == {"nothing": [], "value": "echo#1", "also_nothing": []}


def test_dispatch_only_finishes_in_one_advance() -> None:
    execution = new_execution(DispatchOnly)

    progress = execution.advance()

    assert [step.mode for step in progress.new_steps] == ["dispatch"] * 3
    assert [step.describe() for step in progress.new_steps] == [
        "dispatch notify('one')",
        "dispatch notify('two')",
        "dispatch notify('three')",
    ]
    assert progress.finished is not None
    assert progress.finished.status == "completed"


def test_dispatched_result_ignored_by_replay() -> None:
    live = recorded_run(DispatchThenWait)
    history = copy_history(live)
    history.steps[1].outcome = Outcome(True, value="dispatched task result")
    replay = new_execution(DispatchThenWait, history=history)

    finished = replay.advance().finished

    assert finished == live.finished


def test_dispatch_mixed_with_waited_step() -> None:
    execution = new_execution(DispatchThenWait)

    progress = execution.advance()

    assert [step.mode for step in progress.new_steps] == ["dispatch", "execute"]
    assert progress.finished is None
    execution.record_outcome(2, Outcome(True, value="waited"))
    finished = execution.advance().finished
    assert finished is not None
    assert finished.status == "completed"
