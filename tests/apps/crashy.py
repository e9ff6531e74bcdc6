"""Workflows and tasks for the crash-recovery tests, which kill engines and agents.

The module also exports ``Steps``, ``echo`` and ``slow_echo`` from the ``flows`` test app, so
that one ``--app crashy`` process runs both sets. Like ``flows``, it is imported by name from
``tests/apps``, which the test cluster puts on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flows import Steps, echo, slow_echo

from zenflow import Workflow, task

__all__ = ["Gated", "Steps", "echo", "gated_echo", "slow_echo"]


@task
def gated_echo(value: object, journal: str, gate: str, timeout: float = 60.0) -> object:
    """Append this process's pid to ``journal``, wait until ``gate`` exists, return ``value``.

    Each execution adds one line to the journal, so a test can count executions and know
    when one has started. The test creates the gate file to let the task finish.

    Raises:
        TimeoutError: ``gate`` was not created within ``timeout`` seconds.
    """
    with open(journal, "a") as file:
        file.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + timeout
    while not Path(gate).exists():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for gate file {gate}")
        time.sleep(0.02)
    return value


class Gated(Workflow):
    """Three steps: an echo, a task that waits for a gate file, and another echo."""

    def __init__(self, journal: str, gate: str) -> None:
        self.journal = journal
        self.gate = gate

    def handle(self):  # type: ignore[no-untyped-def]
        before = yield echo("before")
        gated = yield gated_echo("gated", self.journal, self.gate)
        after = yield echo("after")
        return [before, gated, after]
