"""Workflows and tasks used by the end-to-end tests."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import os
import time
import uuid
from pathlib import Path

from zenflow import Task, TaskCall, TaskFailed, Workflow, get_logger, task, workflow

log = get_logger("flows")


class Double(Task):
    def __init__(self, value: int) -> None:
        self.value = value

    def handle(self) -> int:
        return self.value * 2


class AsyncAdd(Task):
    queue = "async"

    def __init__(self, left: int, right: int) -> None:
        self.left = left
        self.right = right

    async def handle(self) -> int:
        await asyncio.sleep(0.01)
        return self.left + self.right


class Fail(Task):
    def __init__(self, message: str) -> None:
        self.message = message

    def handle(self) -> None:
        raise ValueError(self.message)


@task
def echo(value: object) -> object:
    return value


@task
def slow_echo(value: object, seconds: float) -> object:
    time.sleep(seconds)
    return value


@task
def touch(path: str) -> str:
    """Create a file: the side effect of a fire-and-forget task that tests can observe."""
    Path(path).write_text(str(os.getpid()))
    return path


class Sequential(Workflow):
    def __init__(self, start: int) -> None:
        self.start = start

    def handle(self):  # type: ignore[no-untyped-def]
        a = yield Double(self.start)
        b = yield AsyncAdd(a, 1)
        c = yield echo(b)
        return [a, b, c]


class Branching(Workflow):
    def __init__(self, value: int) -> None:
        self.value = value

    def handle(self):  # type: ignore[no-untyped-def]
        doubled = yield Double(self.value)
        if doubled > 10:
            return ("big", (yield echo("big branch")))
        return ("small", (yield AsyncAdd(doubled, 100)))


class Parallel(Workflow):
    def __init__(self, count: int) -> None:
        self.count = count

    def handle(self):  # type: ignore[no-untyped-def]
        results = yield [Double(index) for index in range(self.count)]
        left, right = yield (AsyncAdd(1, 2), echo("x"))
        return {"doubled": results, "pair": [left, right]}


class CatchAndContinue(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        try:
            yield Fail("card declined")
        except TaskFailed as error:
            log.info("caught_task_failure", error=error.error_message)
            recovered = yield echo(f"recovered from {error.error_type}: {error.error_message}")
            return {
                "recovered": recovered,
                "traceback_has_frame": "raise ValueError" in error.traceback,
            }
        return "not reached"


class Uncaught(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        yield Double(1)
        yield Fail("boom")
        return "not reached"


class NeverYields(Workflow):
    def __init__(self, value: int) -> None:
        self.value = value

    def handle(self) -> dict[str, int]:
        return {"value": self.value}


class ReturnsBeforeYield(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        if True:
            return "early"
        yield Double(1)  # makes handle a generator


def add_twice(value: int):  # type: ignore[no-untyped-def]
    first = yield AsyncAdd(value, 1)
    second = yield AsyncAdd(first, 1)
    return second


class YieldFrom(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        result = yield from add_twice(10)
        doubled = yield Double(result)
        return doubled


class DispatchAndGo(Workflow):
    def __init__(self, path: str) -> None:
        self.path = path

    def handle(self):  # type: ignore[no-untyped-def]
        detached = yield touch(self.path).dispatch()
        value = yield echo("after dispatch")
        return {"detached": detached, "value": value}


class YieldsNonCommand(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        yield 42


class YieldsGenerator(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        yield add_twice(1)


class ReturnsGenerator(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        yield Double(1)
        return add_twice(1)


class RichValues(Workflow):
    """Round-trips values that JSON cannot carry through a task and back."""

    def __init__(self, payload: dict) -> None:
        self.payload = payload

    def handle(self):  # type: ignore[no-untyped-def]
        echoed = yield echo(self.payload)
        return echoed


def rich_payload() -> dict:
    return {
        "when": dt.datetime(2026, 3, 29, 1, 30, tzinfo=dt.UTC),
        "price": decimal.Decimal("19.99"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "raw": b"\x00\xff",
        "pair": (1, "a"),
        "tags": {"x", "y"},
        "big": 2**80,
        (1, 2): "tuple key",
        3: "int key",
    }


class Ordered(Workflow):
    """A workflow with a business id taken from its argument."""

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id

    def id(self) -> str:
        return f"order-{self.order_id}"

    def handle(self):  # type: ignore[no-untyped-def]
        return (yield echo(self.order_id))


@workflow
def function_flow(value: int):  # type: ignore[no-untyped-def]
    doubled = yield Double(value)
    return (yield echo(doubled))


class Steps(Workflow):
    """``count`` sequential steps, for crash-recovery and benchmark tests."""

    def __init__(self, count: int, seconds: float = 0.0) -> None:
        self.count = count
        self.seconds = seconds

    def handle(self):  # type: ignore[no-untyped-def]
        total = 0
        for index in range(self.count):
            total += yield slow_echo(index, self.seconds)
        return total


@task
def returns_unencodable() -> object:
    return {"fine": 1, "bad": [object()]}


class TaskReturnsUnencodable(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        return (yield returns_unencodable())


class YieldsUnencodableArgument(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        return (yield echo({"when": object()}))


@task
def task_identity() -> dict:
    from zenflow import current_task

    context = current_task()
    assert context is not None
    return {"step": context.step, "attempt": context.attempt, "key": context.idempotency_key}


class Identity(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        yield Double(1)
        return (yield task_identity())


class Chatty(Workflow):
    """Logs once between its two steps; replay must not log that line again."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def handle(self):  # type: ignore[no-untyped-def]
        first = yield Double(1)
        self.log.info("chatty_between_steps", marker=self.marker)
        second = yield slow_echo(first, 0.5)
        return second


class CallsUnregisteredTask(Workflow):
    """Yields a task by name that no agent registers, on a queue of its own."""

    def handle(self):  # type: ignore[no-untyped-def]
        return (yield TaskCall("orphan_task", "orphans"))


@task
def exits(code: int) -> None:
    raise SystemExit(code)


class CatchesTaskExit(Workflow):
    """A task raising SystemExit fails its attempt; the agent keeps serving."""

    def handle(self):  # type: ignore[no-untyped-def]
        try:
            yield exits(3)
        except TaskFailed as failure:
            return f"caught {failure.error_type}"
        return "not raised"


class ExitsMidway(Workflow):
    def handle(self):  # type: ignore[no-untyped-def]
        yield Double(1)
        raise SystemExit(4)


@task
def returns_bytes(size: int) -> bytes:
    return b"x" * size


class ReturnsBigValue(Workflow):
    def __init__(self, size: int) -> None:
        self.size = size

    def handle(self):  # type: ignore[no-untyped-def]
        return len((yield returns_bytes(self.size)))


class YieldsBadQueue(Workflow):
    """Yields a hand-built TaskCall whose queue name RabbitMQ would refuse."""

    def handle(self):  # type: ignore[no-untyped-def]
        return (yield TaskCall("echo", "bad queue\x00name", args=(1,)))
