"""Tasks that fail, hang or run long, for the retry, timeout and lease tests.

Each task appends a line to a file named by the test (``trace``) at the start of every
attempt, so that a test counts executions and reads their times without trusting the store.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from pathlib import Path

import zenflow
from zenflow import NonRetryableError, Retry, Task, TaskFailed, workflow

QUEUE = "failures"


def trace(path: str, note: str = "") -> int:
    """Append the current attempt to ``path`` and return the number of lines in the file."""
    context = zenflow.current_task()
    attempt = context.attempt if context else 0
    with open(path, "a", encoding="utf-8") as file:
        file.write(f"{time.time():.6f} {attempt} {os.getpid()} {note}\n")
    return len(Path(path).read_text(encoding="utf-8").splitlines())


class AlwaysFails(Task):
    """Four attempts, with delays of 1, 2 and 4 seconds between them."""

    queue = QUEUE
    retry = Retry(attempts=4, initial=dt.timedelta(seconds=1), backoff=2.0)

    def __init__(self, path: str) -> None:
        self.path = path

    def handle(self) -> None:
        count = trace(self.path)
        raise RuntimeError(f"failure number {count}")


class FlakyTwice(Task):
    """Fails its first two attempts, then succeeds."""

    queue = QUEUE
    retry = Retry(attempts=5, initial=dt.timedelta(milliseconds=200), backoff=1.0)

    def __init__(self, path: str) -> None:
        self.path = path

    def handle(self) -> str:
        count = trace(self.path)
        if count <= 2:
            raise ConnectionError(f"flaky failure number {count}")
        return f"succeeded at attempt {count}"


class Declined(Task):
    """Raises a non-retryable error under a generous policy."""

    queue = QUEUE
    retry = Retry(attempts=5, initial=dt.timedelta(milliseconds=100))

    def __init__(self, path: str) -> None:
        self.path = path

    def handle(self) -> None:
        trace(self.path)
        raise NonRetryableError("card declined")


class BadInput(Task):
    """Raises an error that its policy lists as non-retryable, by class."""

    queue = QUEUE
    retry = Retry(attempts=5, initial=dt.timedelta(milliseconds=100), non_retryable=(KeyError,))

    def __init__(self, path: str) -> None:
        self.path = path

    def handle(self) -> None:
        trace(self.path)
        raise KeyError("customer")  # LookupError's subclass, listed


class DecidesItsDelay(Task):
    """Asks for 0.7 s after the first failure, then stops retrying."""

    queue = QUEUE
    retry = Retry(attempts=5, initial=dt.timedelta(seconds=30))

    def __init__(self, path: str) -> None:
        self.path = path

    def handle(self) -> None:
        trace(self.path)
        raise TimeoutError("the API is slow")

    def retry_delay(self, error: BaseException, attempt: int) -> dt.timedelta | None:
        assert isinstance(error, TimeoutError)
        return dt.timedelta(seconds=0.7) if attempt == 1 else None


class FailsUntilFile(Task):
    """Fails until the file ``unlock`` exists; two attempts per series."""

    queue = QUEUE
    retry = Retry(attempts=2, initial=dt.timedelta(milliseconds=100))

    def __init__(self, path: str, unlock: str) -> None:
        self.path = path
        self.unlock = unlock

    def handle(self) -> str:
        trace(self.path)
        if not os.path.exists(self.unlock):
            raise RuntimeError(f"{self.unlock} does not exist yet")
        return "unlocked"


class SlowAsync(Task):
    """An async task that outlives its 0.5 s timeout."""

    queue = QUEUE
    timeout = dt.timedelta(seconds=0.5)
    retry = Retry(attempts=2, initial=dt.timedelta(milliseconds=100))

    def __init__(self, path: str) -> None:
        self.path = path

    async def handle(self) -> None:
        trace(self.path)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            trace(self.path, "cancelled")
            raise


class SlowSync(Task):
    """A sync task past its timeout, which stops at its next heartbeat."""

    queue = QUEUE
    timeout = dt.timedelta(seconds=0.5)

    def __init__(self, path: str) -> None:
        self.path = path

    def handle(self) -> None:
        trace(self.path)
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                zenflow.heartbeat({"progress": "working"})
                time.sleep(0.05)
        except zenflow.AttemptCancelled:
            trace(self.path, "cancelled")
            raise


class Silent(Task):
    """Promises a heartbeat every 0.5 s and sends none."""

    queue = QUEUE
    heartbeat = dt.timedelta(seconds=0.5)

    def __init__(self, path: str) -> None:
        self.path = path

    async def handle(self) -> None:
        trace(self.path)
        await asyncio.sleep(30)


class Long(Task):
    """Runs for ``seconds``, with heartbeats, and may be retried once."""

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
        return f"ran {self.seconds} s as execution {count}"


class Unheard(Task):
    """A task on a queue that the tests' usual agent does not consume."""

    queue = "unheard"

    def handle(self) -> str:
        return "heard at last"


TASKS = {
    cls.__name__: cls
    for cls in (
        AlwaysFails,
        FlakyTwice,
        Declined,
        BadInput,
        DecidesItsDelay,
        FailsUntilFile,
        SlowAsync,
        SlowSync,
        Silent,
        Long,
        Unheard,
    )
}


@workflow
def attempt(kind: str, *args: object) -> object:
    """Run one task of this module by class name and return its result or its error."""
    try:
        value = yield TASKS[kind](*args)
    except TaskFailed as error:
        return {"error": error.error_type, "message": error.error_message}
    return {"value": value}


@workflow
def must_succeed(kind: str, *args: object) -> object:
    """Run one task; its final failure fails the run."""
    value = yield TASKS[kind](*args)
    return {"value": value}
