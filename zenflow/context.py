"""The run that workflow code is executing for, and a logger that is silent during replay.

The engine sets the context while it drives a workflow generator. Workflow code reads it
through :func:`current_run` and logs through :func:`get_logger`, whose lines are dropped
while the engine replays recorded history, so each line appears once per run and not once
per replay.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime as dt
import hashlib
import random as random_module
import uuid as uuid_module
from collections.abc import Callable
from typing import Any

import structlog


@dataclasses.dataclass
class RunContext:
    """The run being driven: its ids, and whether the generator is replaying history.

    The engine sets ``now`` and ``decision`` before each resumption of the generator.
    ``now`` is the instant that history recorded when the workflow's last wait was resolved
    (the run's start before the first ``yield``), so it is the same on every replay.
    """

    run_id: str
    workflow: str
    business_id: str | None = None
    replaying: bool = False
    now: dt.datetime | None = None
    decision: int = 0
    _random: random_module.Random | None = dataclasses.field(default=None, repr=False)
    _random_decision: int = dataclasses.field(default=-1, repr=False)

    def random(self) -> random_module.Random:
        """Return the random generator of the current decision, seeded from the run id."""
        if self._random is None or self._random_decision != self.decision:
            seed = hashlib.sha256(f"{self.run_id}:{self.decision}".encode()).digest()
            self._random = random_module.Random(seed)
            self._random_decision = self.decision
        return self._random


def _require_run(what: str) -> RunContext:
    context = _current.get()
    if context is None:
        from zenflow.errors import DefinitionError

        raise DefinitionError(
            f"zenflow.{what}() is for workflow code, where it returns the same value on every "
            "replay; outside a workflow use the standard library instead"
        )
    return context


def now() -> dt.datetime:
    """Return the workflow's current time, an aware UTC datetime that replays identically.

    It is the instant at which the engine recorded the event that resumed the workflow (a
    task result, a timer, an event), or the run's start before the first ``yield``.
    """
    context = _require_run("now")
    assert context.now is not None
    return context.now


def random() -> random_module.Random:
    """Return a random generator for workflow code that replays the same numbers.

    Its seed derives from the run id and the number of ``yield`` passed, so the values
    depend only on the workflow's history.
    """
    return _require_run("random").random()


def uuid4() -> uuid_module.UUID:
    """Return a random (version 4) UUID that replays identically, for workflow code."""
    bits = _require_run("uuid4").random().getrandbits(128)
    return uuid_module.UUID(int=bits, version=4)


_current: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "zenflow_run", default=None
)


def current_run() -> RunContext | None:
    """Return the run whose workflow code is executing, or None outside workflow code."""
    return _current.get()


def set_current_run(context: RunContext | None) -> contextvars.Token[RunContext | None]:
    """Set the current run (engine use); pass the token to :func:`reset_current_run`."""
    return _current.set(context)


def reset_current_run(token: contextvars.Token[RunContext | None]) -> None:
    _current.reset(token)


@dataclasses.dataclass(frozen=True)
class TaskContext:
    """The task attempt an agent is executing: use it to build idempotency keys."""

    run_id: str
    workflow: str
    step: int
    attempt: int
    task: str
    # Set by the agent: called with the details of each heartbeat, and raising
    # AttemptCancelled once the agent gave up on the attempt.
    beat: Callable[[Any], None] | None = dataclasses.field(default=None, compare=False)

    @property
    def idempotency_key(self) -> str:
        """A key that is the same for every attempt of this step of this run."""
        return f"{self.run_id}:{self.step}"


def heartbeat(details: Any = None) -> None:
    """Report that the running task attempt is alive and making progress.

    A task with a ``heartbeat`` interval must call it at least that often. ``details``, if
    given, must be encodable; the latest is shown by ``zenflow runs show``. Outside an
    agent, as in a unit test that calls ``handle()`` directly, it does nothing.

    Raises:
        AttemptCancelled: the agent gave up on this attempt (it ran past its timeout); let
            the error end the task.
    """
    context = _current_task.get()
    if context is not None and context.beat is not None:
        context.beat(details)


_current_task: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "zenflow_task", default=None
)


def current_task() -> TaskContext | None:
    """Return the task attempt being executed by an agent, or None outside task code."""
    return _current_task.get()


def set_current_task(context: TaskContext | None) -> contextvars.Token[TaskContext | None]:
    """Set the current task (agent use)."""
    return _current_task.set(context)


class ReplaySafeLogger:
    """A structlog logger proxy that drops every call while the current run is replaying."""

    def __init__(self, name: str) -> None:
        self._logger = structlog.get_logger(name)

    def bind(self, **values: Any) -> ReplaySafeLogger:
        bound = ReplaySafeLogger.__new__(ReplaySafeLogger)
        bound._logger = self._logger.bind(**values)
        return bound

    def _log(self, level: str, event: str, **values: Any) -> None:
        context = _current.get()
        if context is not None and context.replaying:
            return
        getattr(self._logger, level)(event, **values)

    def debug(self, event: str, **values: Any) -> None:
        self._log("debug", event, **values)

    def info(self, event: str, **values: Any) -> None:
        self._log("info", event, **values)

    def warning(self, event: str, **values: Any) -> None:
        self._log("warning", event, **values)

    def error(self, event: str, **values: Any) -> None:
        self._log("error", event, **values)

    def exception(self, event: str, **values: Any) -> None:
        self._log("exception", event, **values)


def get_logger(name: str = "zenflow.workflow") -> ReplaySafeLogger:
    """Return a logger for workflow code that logs nothing while history is replayed."""
    return ReplaySafeLogger(name)
