"""Tasks and workflows that attack retries, timeouts and manual retry.

Each task appends a line to the trace file that the test names, at the start of every
attempt, as in the ``failures`` app: ``time attempt pid note``.
"""

from __future__ import annotations

import datetime as dt
import os
import time

from failures import trace  # tests/apps is on the path of the engine and agents

import zenflow
from zenflow import Retry, Task, TaskFailed, Workflow, wait, workflow

QUEUE = "adversarial"


class FailsTwiceQuickly(Task):
    """Fails its first two attempts of a step, with 0.3 s between attempts."""

    queue = QUEUE
    retry = Retry(attempts=5, initial=dt.timedelta(milliseconds=300), backoff=1.5)

    def __init__(self, path: str) -> None:
        self.path = path

    def handle(self) -> str:
        trace(self.path)
        context = zenflow.current_task()
        assert context is not None
        if context.attempt <= 2:
            raise ConnectionError(f"failure at attempt {context.attempt}")
        return f"ok at attempt {context.attempt}"


class FailsOnceSlowRetry(Task):
    """Fails its first attempt, and the retry is due 2 s later."""

    queue = QUEUE
    retry = Retry(attempts=3, initial=dt.timedelta(seconds=2))

    def __init__(self, path: str) -> None:
        self.path = path

    def handle(self) -> str:
        count = trace(self.path)
        if count == 1:
            raise ConnectionError("first attempt fails")
        return f"ok after {count} executions"


class FailsUntilFile(Task):
    """Fails until ``unlock`` exists, without retries."""

    queue = QUEUE

    def __init__(self, path: str, unlock: str) -> None:
        self.path = path
        self.unlock = unlock

    def handle(self) -> str:
        trace(self.path)
        if not os.path.exists(self.unlock):
            raise RuntimeError(f"{self.unlock} does not exist yet")
        return "unlocked"


class SlowlyFailsUntilFile(FailsUntilFile):
    """Like FailsUntilFile, but each attempt takes 1.5 s, so a retried run stays running."""

    def handle(self) -> str:
        time.sleep(1.5)
        return super().handle()


class FailsUntilFileWithBackoff(FailsUntilFile):
    """Like FailsUntilFile, with three attempts per series, 1 s apart."""

    retry = Retry(attempts=3, initial=dt.timedelta(seconds=1), backoff=1.0)


class Sleeps(Task):
    """Sleeps ``seconds`` without heartbeats, then returns."""

    queue = QUEUE

    def __init__(self, path: str, seconds: float) -> None:
        self.path = path
        self.seconds = seconds

    def handle(self) -> str:
        trace(self.path)
        time.sleep(self.seconds)
        trace(self.path, "done")
        return f"slept {self.seconds} s"


class HangsSync(Task):
    """A sync task that outlives its 0.3 s timeout and never calls heartbeat()."""

    queue = QUEUE
    timeout = dt.timedelta(seconds=0.3)

    def __init__(self, path: str, seconds: float) -> None:
        self.path = path
        self.seconds = seconds

    def handle(self) -> None:
        trace(self.path)
        time.sleep(self.seconds)
        trace(self.path, "done")


class Quick(Task):
    """Returns at once."""

    queue = QUEUE

    def __init__(self, path: str) -> None:
        self.path = path

    def handle(self) -> str:
        trace(self.path)
        return "quick"


class TightLoop(Task):
    """Fails every attempt, under a policy of many attempts without delay."""

    queue = QUEUE
    retry = Retry(attempts=30, initial=dt.timedelta(0))

    def __init__(self, path: str) -> None:
        self.path = path

    def handle(self) -> None:
        raise RuntimeError("always")


class LongBeats(Task):
    """Runs ``seconds`` with heartbeats, in at most three attempts."""

    queue = QUEUE
    retry = Retry(attempts=3, initial=dt.timedelta(milliseconds=100))

    def __init__(self, path: str, seconds: float) -> None:
        self.path = path
        self.seconds = seconds

    def handle(self) -> str:
        count = trace(self.path)
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            zenflow.heartbeat()
            time.sleep(0.1)
        trace(self.path, "done")
        return f"execution {count}"


TASKS = {
    cls.__name__: cls
    for cls in (
        FailsTwiceQuickly,
        FailsOnceSlowRetry,
        FailsUntilFile,
        SlowlyFailsUntilFile,
        FailsUntilFileWithBackoff,
        Sleeps,
        HangsSync,
        Quick,
        TightLoop,
        LongBeats,
    )
}


@workflow
def one(kind: str, *args: object) -> object:
    """Run one task by class name; its final failure fails the run."""
    value = yield TASKS[kind](*args)
    return {"value": value}


@workflow
def caught(kind: str, *args: object) -> object:
    """Run one task by class name and return its result or its error."""
    try:
        value = yield TASKS[kind](*args)
    except TaskFailed as error:
        return {"error": error.error_type, "message": error.error_message}
    return {"value": value}


@workflow
def dispatch_then_wait(flaky_path: str, slow_path: str, seconds: float) -> object:
    """Dispatch a task that fails once, then wait for a slow task."""
    yield FailsOnceSlowRetry(flaky_path).dispatch()
    value = yield Sleeps(slow_path, seconds)
    return {"value": value}


@workflow
def race_with_timer(path: str, seconds: float) -> object:
    """Race a task that fails once (retry in 2 s) against a timer."""
    winner = yield wait.first(FailsOnceSlowRetry(path), wait.for_(seconds))
    return {"position": winner[0]}


@workflow
def parallel_one_retries(flaky_path: str, quick_path: str) -> object:
    """Run a task that retries beside one that does not."""
    values = yield [FailsTwiceQuickly(flaky_path), Quick(quick_path)]
    return {"values": values}


@workflow
def code_fails(path: str) -> object:
    """Run a task, then fail in workflow code."""
    yield Quick(path)
    raise ValueError("the workflow itself is broken")


@workflow
def parent_of_failing_child(path: str, unlock: str) -> object:
    """Wait for a child whose task fails until ``unlock`` exists."""
    value = yield one("FailsUntilFile", path, unlock)
    return {"child": value}


class Keyed(Workflow):
    """A workflow with a business id, whose task fails until a file exists."""

    def __init__(self, key: str, path: str, unlock: str) -> None:
        self.key, self.path, self.unlock = key, path, unlock

    def id(self) -> str:
        return self.key

    def handle(self):  # type: ignore[no-untyped-def]
        value = yield FailsUntilFile(self.path, self.unlock)
        return {"value": value}


class KeyHolder(Workflow):
    """Holds a business id while it waits for the event ``release``."""

    def __init__(self, key: str) -> None:
        self.key = key

    def id(self) -> str:
        return self.key

    def handle(self):  # type: ignore[no-untyped-def]
        yield wait.event("release")
        return "released"


class FailsLateOnce(Task):
    """Fails its first execution after 1 s, and the retry is due 1 s later."""

    queue = QUEUE
    retry = Retry(attempts=3, initial=dt.timedelta(seconds=1))

    def __init__(self, path: str) -> None:
        self.path = path

    def handle(self) -> str:
        count = trace(self.path)
        if count == 1:
            time.sleep(1.0)
            raise ConnectionError("first execution fails late")
        return f"ok after {count} executions"


@workflow
def dispatch_late(path: str) -> object:
    """Dispatch a task that fails after the run has completed."""
    yield FailsLateOnce(path).dispatch()
    return "done"
