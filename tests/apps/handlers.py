"""Workflows with ``on_event`` handlers that run tasks, interleaved with ``handle``."""

from __future__ import annotations

import time

import zenflow
from zenflow import TaskFailed, Workflow, WorkflowCall, task, wait


@task
def echo_later(value: object, seconds: float) -> object:
    time.sleep(seconds)
    return value


class Ledger(Workflow):
    """Records every event that no wait takes; "Charge" events run a task in the handler."""

    def __init__(self) -> None:
        self.seen: list[list[object]] = []
        self.charged: list[object] = []

    def handle(self):  # type: ignore[no-untyped-def]
        yield echo_later("warm-up", 0.0)
        stop = yield wait.event("Stop")
        return {"seen": self.seen, "charged": self.charged, "stop": stop.data}

    def on_event(self, name: str, data: object):  # type: ignore[no-untyped-def]
        self.seen.append([name, data])
        if name == "Charge":
            value = yield echo_later(data, 0.2)
            self.charged.append(value)


class FailingHandler(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        yield wait.event("Never", timeout=120)

    def on_event(self, name: str, data: object) -> None:
        raise ValueError(f"cannot handle {name}")


class StartsUnknownChild(Workflow):
    """Yields a child workflow that no engine registers."""

    def handle(self):  # type: ignore[no-untyped-def]
        try:
            yield WorkflowCall("NoSuchWorkflow", (1,))
        except TaskFailed as failure:
            return [failure.error_type, failure.error_message]
        return "started"


class SlowTaskVictim(Workflow):
    """Waits on a slow task step, the target of a forged child start in a test."""

    def handle(self):  # type: ignore[no-untyped-def]
        return (yield echo_later("genuine", 1.5))


class WakesAtLocalTime(Workflow):
    """Sleeps until the next time the clock of ``zone`` shows ``clock``; returns the time."""

    def __init__(self, clock: str, zone: str) -> None:
        self.clock = clock
        self.zone = zone

    def handle(self):  # type: ignore[no-untyped-def]
        yield wait.at(self.clock, tz=self.zone)
        return zenflow.now()


class DispatchesAndLeaves(Workflow):
    """Dispatches a child and completes at once; the child must still run."""

    def handle(self):  # type: ignore[no-untyped-def]
        return (yield ChildOfLeaver(7).dispatch())


class ChildOfLeaver(Workflow):
    def __init__(self, value: int) -> None:
        self.value = value

    def handle(self):  # type: ignore[no-untyped-def]
        return (yield echo_later(self.value, 0.1))


class BadIdChild(Workflow):
    def __init__(self, business_id: object) -> None:
        self.business_id = business_id

    def id(self):  # type: ignore[no-untyped-def]
        if self.business_id == "raise":
            raise KeyError("no id")
        return self.business_id

    def handle(self):  # type: ignore[no-untyped-def]
        return "started"
        yield  # a generator that never yields


class ParentOfBadIdChild(Workflow):
    def __init__(self, business_id: object) -> None:
        self.business_id = business_id

    def handle(self):  # type: ignore[no-untyped-def]
        yield echo_later("first", 0.0)
        return (yield BadIdChild(self.business_id))


class HandlerOrder(Workflow):
    """Collects the data of events given to on_event, until "Stop"."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    def handle(self):  # type: ignore[no-untyped-def]
        yield wait.event("Stop")
        return self.seen

    def on_event(self, name: str, data: object) -> None:
        self.seen.append(data)


class ParentOfLeaverChild(Workflow):
    """Runs ChildOfLeaver as its first step and reports a failure to start it."""

    def handle(self):  # type: ignore[no-untyped-def]
        try:
            return (yield ChildOfLeaver(1))
        except TaskFailed as failure:
            return [failure.error_type, failure.error_message]
