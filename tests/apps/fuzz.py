"""Workflows and tasks for the fuzz tests: fast, and harmless with any argument a fuzzer sends."""

from __future__ import annotations

from datetime import timedelta

from zenflow import Workflow, task, wait


@task
def double(value: object) -> object:
    return value * 2  # type: ignore[operator]


@task
def echo(value: object) -> object:
    return value


class Pipeline(Workflow):
    """Two steps: the result of ``Pipeline(n)`` is ``[2 * n, 2 * n]``."""

    def __init__(self, value: object) -> None:
        self.value = value

    def handle(self):  # type: ignore[no-untyped-def]
        doubled = yield double(self.value)
        echoed = yield echo(doubled)
        return [doubled, echoed]


class Waiter(Workflow):
    """Waits for the event ``Go``, then returns twice its data; business id ``waiter-<key>``."""

    def __init__(self, key: str) -> None:
        self.key = key

    def id(self) -> str:
        return f"waiter-{self.key}"

    def handle(self):  # type: ignore[no-untyped-def]
        event = yield wait.event("Go", timeout=timedelta(minutes=10))
        if event is None:
            return None
        return (yield double(event.data))
