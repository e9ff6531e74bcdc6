"""The exception tree of zenflow.

Every error that zenflow raises derives from :class:`ZenflowError`. The subtrees follow who
must react: the author of a workflow or task (:class:`DefinitionError`,
:class:`SerializationError`, :class:`TaskFailed`, :class:`NonDeterminismError`), the operator
(:class:`ConfigurationError`, :class:`TransportError`, :class:`StoreError`), or the caller of a
client (:class:`RunFailed`, :class:`RunTimeout`, :class:`RequestRejected`).
"""

from __future__ import annotations

from typing import Any


class ZenflowError(Exception):
    """Root of every error raised by zenflow."""


class ConfigurationError(ZenflowError):
    """A setting, URL, flag or application module is missing or invalid."""


class DefinitionError(ZenflowError):
    """A task or workflow is defined or used in a way zenflow cannot run."""


class SerializationError(ZenflowError):
    """A value cannot be encoded for the wire, or a body cannot be decoded.

    ``path`` locates the value inside the encoded structure, for example
    ``args[1]['items'][0]``; it is empty when the whole body is at fault.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class TransportError(ZenflowError):
    """RabbitMQ is unreachable, refused a publish, or closed the connection."""


class StoreError(ZenflowError):
    """The history database is unreachable, not migrated, or failed a query."""


class NonDeterminismError(ZenflowError):
    """The workflow's code yielded a command that differs from its recorded history.

    Replay feeds recorded results back into a fresh generator, so the generator must yield
    the same commands in the same order each time. This error names the step, the recorded
    command and the new one; the run stops with it and nothing more is dispatched for it.
    """

    def __init__(self, message: str, *, step: int, recorded: str | None, actual: str | None):
        super().__init__(message)
        self.step = step
        self.recorded = recorded
        self.actual = actual


class NonRetryableError(ZenflowError):
    """Raised by task code for a failure that no retry can fix, such as a declined card.

    The attempt fails and no further attempt runs, whatever the task's retry policy.
    Any exception with a true ``non_retryable`` attribute has the same effect.
    """

    non_retryable = True


class AttemptCancelled(ZenflowError):
    """Raised by :func:`zenflow.heartbeat` in a task attempt that the agent gave up on.

    The agent gives up on an attempt that ran past its timeout. An ``async`` task is
    cancelled at once. A sync task cannot be stopped from outside its thread, so its next
    ``heartbeat()`` call raises this error to end it.
    """


class TaskFailed(ZenflowError):
    """A task raised an exception; raised inside the workflow at the task's ``yield``.

    The original exception lives in another process, so it is carried by its type name,
    message and formatted traceback instead of by its class.
    """

    def __init__(
        self,
        task: str,
        error_type: str,
        error_message: str,
        traceback: str = "",
        *,
        step: int | None = None,
    ) -> None:
        super().__init__(f"task {task} failed with {error_type}: {error_message}")
        self.task = task
        self.error_type = error_type
        self.error_message = error_message
        self.traceback = traceback
        self.step = step

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_task_failed,
            (self.task, self.error_type, self.error_message, self.traceback, self.step),
        )


def _rebuild_task_failed(
    task: str, error_type: str, error_message: str, traceback: str, step: int | None
) -> TaskFailed:
    return TaskFailed(task, error_type, error_message, traceback, step=step)


class RunFailed(ZenflowError):
    """A run that a client waited for ended as failed; ``error`` is the stored error."""

    def __init__(self, run_id: str, error: dict[str, Any]) -> None:
        error_type = error.get("type", "Error")
        message = error.get("message", "")
        super().__init__(f"run {run_id} failed with {error_type}: {message}")
        self.run_id = run_id
        self.error = error


class RunTimeout(ZenflowError):
    """A client waited longer than its timeout; the run (or the queued start) goes on.

    ``run_id`` names the run waited for, when there is one.
    """

    def __init__(self, message: str, *, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


class RequestRejected(ZenflowError):
    """The engine rejected a request (unknown workflow, invalid arguments, ...).

    ``code`` is the machine-readable reason from the engine's reply, for example
    ``unknown_workflow``; the message is the engine's explanation.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RunNotFound(ZenflowError):
    """No run has the given run id or business id."""
