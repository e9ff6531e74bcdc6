"""The run that workflow code is executing for, and a logger that is silent during replay.

The engine sets the context while it drives a workflow generator. Workflow code reads it
through :func:`current_run` and logs through :func:`get_logger`, whose lines are dropped
while the engine replays recorded history, so each line appears once per run and not once
per replay.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any

import structlog


@dataclasses.dataclass
class RunContext:
    """The run being driven: its ids, and whether the generator is replaying history."""

    run_id: str
    workflow: str
    business_id: str | None = None
    replaying: bool = False


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

    @property
    def idempotency_key(self) -> str:
        """A key that is the same for every attempt of this step of this run."""
        return f"{self.run_id}:{self.step}"


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
