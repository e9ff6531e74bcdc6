"""A task that ends its agent process, for the poison-message tests.

``crash`` appends the agent's process id to a journal file, waits ``delay`` seconds and
calls ``os._exit(1)``, as a crash in native code or the out-of-memory killer would end the
agent. Each execution adds one line, so a test counts executions from the journal. The
delay lets the tasks delivered with it start, so that they die with it.
"""

from __future__ import annotations

import os
import time

from zenflow import Workflow, task


@task
def crash(journal: str, delay: float) -> None:
    with open(journal, "a") as file:
        file.write(f"{os.getpid()}\n")
    time.sleep(delay)
    os._exit(1)


@task
def pause(value: int, seconds: float) -> int:
    time.sleep(seconds)
    return value


class CrashesAgent(Workflow):
    """Runs ``crash`` beside ``siblings`` tasks that sleep ``seconds``, all in parallel."""

    def __init__(self, journal: str, delay: float, siblings: int, seconds: float) -> None:
        self.journal = journal
        self.delay = delay
        self.siblings = siblings
        self.seconds = seconds

    def handle(self):  # type: ignore[no-untyped-def]
        pauses = [pause(index, self.seconds) for index in range(self.siblings)]
        return (yield [crash(self.journal, self.delay), *pauses])


class Quick(Workflow):
    """One short task on the queue of ``crash``."""

    def __init__(self, value: int) -> None:
        self.value = value

    def handle(self):  # type: ignore[no-untyped-def]
        return (yield pause(self.value, 0.0))
