"""A workflow for the kill-load tests: sequential and parallel tasks on two queues, a timer.

The tests kill engines and agents with SIGKILL while many runs of ``Mixed`` are under way,
then check each run's result against ``expected_mixed``.
"""

from __future__ import annotations

import time

from zenflow import Task, Workflow, task, wait

SIDE_QUEUE = "side"


@task
def add(left: int, right: int, seconds: float) -> int:
    time.sleep(seconds)
    return left + right


class Multiply(Task):
    queue = SIDE_QUEUE

    def __init__(self, value: int, factor: int, seconds: float) -> None:
        self.value = value
        self.factor = factor
        self.seconds = seconds

    def handle(self) -> int:
        time.sleep(self.seconds)
        return self.value * self.factor


class Mixed(Workflow):
    """Seven steps: a task, three parallel tasks, a timer and two more tasks, in that order.

    Steps 1 to 4, 6 and 7 are tasks, and step 5 is the timer.
    """

    def __init__(self, number: int, seconds: float, timer: float) -> None:
        self.number = number
        self.seconds = seconds
        self.timer = timer

    def handle(self):  # type: ignore[no-untyped-def]
        first = yield add(self.number, 1, self.seconds)
        doubled, tripled, summed = yield [
            Multiply(first, 2, self.seconds),
            Multiply(first, 3, self.seconds),
            add(first, first, self.seconds),
        ]
        yield wait.for_(seconds=self.timer)
        total = yield add(doubled + tripled, summed, self.seconds)
        last = yield Multiply(total, 10, self.seconds)
        return {"number": self.number, "parallel": [doubled, tripled, summed], "last": last}


def expected_mixed(number: int) -> dict[str, object]:
    """Return the result of a run of ``Mixed`` with ``number``."""
    first = number + 1
    parallel = [first * 2, first * 3, first * 2]
    return {"number": number, "parallel": parallel, "last": sum(parallel) * 10}
