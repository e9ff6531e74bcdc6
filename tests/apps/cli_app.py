"""A workflow whose task waits on a queue that no agent consumes, for the CLI tests.

The CLI tests run an engine with ``--app flows --app cli_app`` and an agent with only
``--app flows``, so a run of ``Stuck`` stays running with its first step queued.
"""

from __future__ import annotations

from zenflow import Task, Workflow

UNCONSUMED_QUEUE = "nobody"


class Unconsumed(Task):
    queue = UNCONSUMED_QUEUE

    def __init__(self, value: str) -> None:
        self.value = value

    def handle(self) -> str:
        return self.value


class Stuck(Workflow):
    def __init__(self, value: str) -> None:
        self.value = value

    def handle(self):  # type: ignore[no-untyped-def]
        return (yield Unconsumed(self.value))
