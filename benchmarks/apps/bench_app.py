"""Tasks and workflows run by benchmarks/bench.py: no-op work, so only zenflow's cost shows."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from zenflow import Workflow, task, wait


@task
def noop(value: int) -> int:
    """Return the argument: a task whose own run time is negligible."""
    return value


class Chain(Workflow):
    """``count`` sequential no-op steps; each waits for the result of the one before."""

    def __init__(self, count: int) -> None:
        self.count = count

    def handle(self) -> Generator[Any, int, int]:
        total = 0
        for index in range(self.count):
            total += yield noop(index)
        return total


class OneStep(Workflow):
    """A single no-op step, for throughput: start, one task, completion."""

    def __init__(self, value: int) -> None:
        self.value = value

    def handle(self) -> Generator[Any, int, int]:
        return (yield noop(self.value))


class OneTimer(Workflow):
    """A single durable timer of ``seconds`` and no task, for the timers' firing delay."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def handle(self) -> Generator[Any, None, float]:
        yield wait.for_(seconds=self.seconds)
        return self.seconds
