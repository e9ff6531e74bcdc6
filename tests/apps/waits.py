"""Workflows that wait: timers, events, races, children, run control, deterministic values."""

from __future__ import annotations

import datetime as dt
import time

import zenflow
from zenflow import Task, TaskFailed, Workflow, task, wait, workflow


@task
def add(a: int, b: int) -> int:
    return a + b


@task
def slow(value: object, seconds: float) -> object:
    time.sleep(seconds)
    return value


@task
def explode(message: str) -> None:
    raise ValueError(message)


class Sleeper(Workflow):
    """Sleeps, then returns when it woke up according to the workflow clock."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def handle(self):  # type: ignore[no-untyped-def]
        before = zenflow.now()
        yield wait.for_(seconds=self.seconds)
        after = zenflow.now()
        return {"before": before, "after": after}


class SleepUntil(Workflow):
    def __init__(self, moment: dt.datetime) -> None:
        self.moment = moment

    def handle(self):  # type: ignore[no-untyped-def]
        yield wait.until(self.moment)
        return zenflow.now()


class WaitsAtWeekday(Workflow):
    """Waits for a calendar instant far enough ahead to stay parked during a test."""

    def __init__(self, zone: str) -> None:
        self.zone = zone

    def handle(self):  # type: ignore[no-untyped-def]
        yield wait.weekday("monday", "09:00", tz=self.zone)
        return "woke"


class WaitsForEvent(Workflow):
    def __init__(self, name: str, timeout: float | None = None) -> None:
        self.name = name
        self.timeout = timeout

    def handle(self):  # type: ignore[no-untyped-def]
        event = yield wait.event(self.name, timeout=self.timeout)
        if event is None:
            return {"timed_out": True}
        return {"timed_out": False, "name": event.name, "data": event.data}


class TwoEventsAfterTask(Workflow):
    """Runs a slow task first; events sent meanwhile must wait for the two later waits."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def handle(self):  # type: ignore[no-untyped-def]
        yield slow("first", self.seconds)
        one = yield wait.event("Item")
        two = yield wait.event("Item")
        return [one.data, two.data]


class TimeoutThenWaitAgain(Workflow):
    """A wait that times out, then a second wait on the same name."""

    def __init__(self, first_timeout: float, second_timeout: float) -> None:
        self.first_timeout = first_timeout
        self.second_timeout = second_timeout

    def handle(self):  # type: ignore[no-untyped-def]
        first = yield wait.event("Late", timeout=self.first_timeout)
        second = yield wait.event("Late", timeout=self.second_timeout)
        return [None if first is None else first.data, None if second is None else second.data]


class AnyOfEvents(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        event = yield wait.event(["Approved", "Rejected"], timeout=60)
        return event.name


class RaceTaskAndTimer(Workflow):
    def __init__(self, task_seconds: float, timer_seconds: float) -> None:
        self.task_seconds = task_seconds
        self.timer_seconds = timer_seconds

    def handle(self):  # type: ignore[no-untyped-def]
        winner = yield wait.first(
            slow("task", self.task_seconds),
            wait.for_(seconds=self.timer_seconds),
            wait.event("Cancel"),
        )
        return [winner.position, winner.value if winner.position != 2 else winner.value.data]


class Child(Workflow):
    def __init__(self, value: int) -> None:
        self.value = value

    def handle(self):  # type: ignore[no-untyped-def]
        return (yield add(self.value, 1))


class FailingChild(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        yield explode("child broke")


class Parent(Workflow):
    def __init__(self, value: int) -> None:
        self.value = value

    def handle(self):  # type: ignore[no-untyped-def]
        first = yield Child(self.value)
        detached = yield Child(100).dispatch()
        try:
            yield FailingChild()
        except TaskFailed as failure:
            caught = f"{failure.error_type}: {failure.error_message}"
        return {"first": first, "detached": detached, "caught": caught}


class ParentOfSleeper(Workflow):
    """A parent waiting for a child that sleeps long, to be killed meanwhile."""

    def handle(self):  # type: ignore[no-untyped-def]
        return (yield Sleeper(3600))


class Deterministic(Workflow):
    """Draws values that must not change when the run is replayed."""

    def handle(self):  # type: ignore[no-untyped-def]
        first = (zenflow.now(), zenflow.random().random(), zenflow.uuid4())
        yield add(1, 1)
        second = (zenflow.now(), zenflow.random().randint(0, 10**9), zenflow.uuid4())
        yield wait.event("Go")
        return {"first": first, "second": second}


class ParallelThenWait(Workflow):
    """A parallel step of slow tasks, used to pause and kill while tasks run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def handle(self):  # type: ignore[no-untyped-def]
        values = yield [slow(index, self.seconds) for index in range(3)]
        yield wait.for_(seconds=0.5)
        return values


class OrderById(Workflow):
    """Declares its business id, so a second start while it runs is rejected."""

    def __init__(self, order: str) -> None:
        self.order = order

    def id(self) -> str:
        return f"order-{self.order}"

    def handle(self):  # type: ignore[no-untyped-def]
        event = yield wait.event("Done", timeout=120)
        return None if event is None else event.data


class Everything(Workflow):
    """Uses every kind of command, so that its replay can be compared with its history."""

    def handle(self):  # type: ignore[no-untyped-def]
        stamp = zenflow.now()
        token = zenflow.uuid4()
        total = yield add(1, 2)
        pair = yield [add(total, 1), add(total, 2)]
        yield wait.for_(seconds=0.3)
        child = yield Child(total)
        event = yield wait.event("Continue", timeout=120)
        winner = yield wait.first(wait.for_(seconds=0.2), wait.event("Never"))
        lucky = zenflow.random().randint(1, 1000)
        return {
            "stamp": stamp,
            "token": token,
            "pair": pair,
            "child": child,
            "event": event.data,
            "winner": winner.position,
            "lucky": lucky,
        }


class SlowStep(Task):
    """A class task used by pause tests: it reports when it started through a file."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def handle(self) -> float:
        time.sleep(self.seconds)
        return self.seconds


class WaitsOnCalendar(Workflow):
    """Waits for the next 09:00 of a calendar rule in a zone: "time_of_day", "weekday"
    (Mondays) or "day_of_month" (the 1st)."""

    def __init__(self, rule: str, zone: str) -> None:
        self.rule = rule
        self.zone = zone

    def handle(self):  # type: ignore[no-untyped-def]
        if self.rule == "time_of_day":
            yield wait.at("09:00", tz=self.zone)
        elif self.rule == "weekday":
            yield wait.weekday("monday", "09:00", tz=self.zone)
        else:
            yield wait.day_of_month(1, "09:00", tz=self.zone)
        return "woke"


class TimeoutTaskThenWait(Workflow):
    """A wait that times out, a slow task, then a second wait on the same name.

    An event sent during the task has no wait to take it, so it must be kept for the second
    wait.
    """

    def __init__(self, timeout: float, seconds: float) -> None:
        self.timeout = timeout
        self.seconds = seconds

    def handle(self):  # type: ignore[no-untyped-def]
        first = yield wait.event("Late", timeout=self.timeout)
        yield slow("between", self.seconds)
        second = yield wait.event("Late", timeout=60)
        return [None if first is None else first.data, None if second is None else second.data]


class ParentOfFailingChild(Workflow):
    """Does not catch its child's failure, so the run fails at the child's yield."""

    def handle(self):  # type: ignore[no-untyped-def]
        yield FailingChild()
        return "unreachable"


@workflow
def plus_one(value: int):  # type: ignore[no-untyped-def]
    return (yield add(value, 1))


class ParentOfFunction(Workflow):
    """Runs a @workflow function as its child."""

    def __init__(self, value: int) -> None:
        self.value = value

    def handle(self):  # type: ignore[no-untyped-def]
        return (yield plus_one(self.value))


class EchoesDrawnValues(Workflow):
    """Passes its drawn values to a task, so that history records them, then parks at an
    event. A replay that draws other values yields another command."""

    def handle(self):  # type: ignore[no-untyped-def]
        drawn = [zenflow.now(), zenflow.random().random(), zenflow.uuid4()]
        echoed = yield slow(drawn, 0)
        yield wait.event("Go")
        return {"drawn": drawn, "echoed": echoed}


class ParentOfOrder(Workflow):
    """Starts OrderById as its child and returns the failure if the child cannot start."""

    def __init__(self, order: str) -> None:
        self.order = order

    def handle(self):  # type: ignore[no-untyped-def]
        try:
            return (yield OrderById(self.order))
        except TaskFailed as failure:
            return {"error_type": failure.error_type, "message": failure.error_message}


class ParentOfWaiter(Workflow):
    """Waits for a child that waits for the event "Ping"."""

    def handle(self):  # type: ignore[no-untyped-def]
        return (yield WaitsForEvent("Ping", 60))
