"""Turn what a workflow generator yielded into commands, or explain why it cannot."""

from __future__ import annotations

import inspect
from typing import Any

from zenflow.commands import TaskCall
from zenflow.errors import DefinitionError
from zenflow.task import Task, TaskFunction, validate_name, validate_queue_name
from zenflow.workflow import Workflow, WorkflowCall, WorkflowFunction


def to_commands(yielded: Any, workflow: str) -> tuple[list[TaskCall], bool]:
    """Return the task calls of one ``yield`` and whether it yielded a list.

    Raises:
        DefinitionError: the value is not a command; the message names it and, for a
            generator object, suggests ``yield from``.
    """
    if isinstance(yielded, list | tuple):
        calls = [
            _to_call(item, workflow, f"item {index} of the yielded list")
            for index, item in enumerate(yielded)
        ]
        return calls, True
    return [_to_call(yielded, workflow, "the yielded value")], False


def _to_call(value: Any, workflow: str, where: str) -> TaskCall:
    if isinstance(value, TaskCall):
        return _checked(value, workflow, where)
    if isinstance(value, Task):
        return value.to_call()
    raise DefinitionError(explain_not_a_command(value, workflow, where))


def _checked(call: TaskCall, workflow: str, where: str) -> TaskCall:
    """Return ``call`` if its fields are valid; a TaskCall built by hand is not checked."""
    owner = f"workflow {workflow}, {where}"
    validate_name(call.name, owner)
    validate_queue_name(call.queue, owner)
    if call.mode not in ("execute", "dispatch"):
        raise DefinitionError(f"{owner}: invalid mode {call.mode!r}: use 'execute' or 'dispatch'")
    if not isinstance(call.args, tuple | list):
        raise DefinitionError(f"{owner}: args must be a tuple, not {type(call.args).__name__}")
    if not isinstance(call.kwargs, dict) or not all(isinstance(key, str) for key in call.kwargs):
        raise DefinitionError(f"{owner}: kwargs must be a dict with string keys")
    return call


def explain_not_a_command(value: Any, workflow: str, where: str) -> str:
    """Describe why ``value`` cannot be yielded, with a hint for common mistakes."""
    shown = _short_repr(value)
    kind = type(value).__name__
    if inspect.isgenerator(value):
        return (
            f"workflow {workflow}: {where} is a generator object ({shown}); to run a helper "
            "generator's steps use `yield from helper(...)` instead of `yield helper(...)`"
        )
    if inspect.iscoroutine(value):
        value.close()
        return (
            f"workflow {workflow}: {where} is a coroutine ({shown}); workflows are generators, "
            "so define handle with `def`, and put async code in a task"
        )
    if isinstance(value, TaskFunction):
        return (
            f"workflow {workflow}: {where} is the task function {value.task_name} itself; call "
            f"it with its arguments: `yield {value.task_name}(...)`"
        )
    if isinstance(value, type) and issubclass(value, Task):
        return (
            f"workflow {workflow}: {where} is the task class {value.__name__}; yield an "
            f"instance: `yield {value.__name__}(...)`"
        )
    if isinstance(value, Workflow | WorkflowCall | WorkflowFunction):
        # NOTE: child workflows need their own command kind; until then they are rejected.
        return (
            f"workflow {workflow}: {where} is a workflow ({shown}); child workflows are not "
            "supported yet, so start it from a task or restructure it as a helper generator "
            "used with `yield from`"
        )
    return (
        f"workflow {workflow}: {where} is {shown} of type {kind}, which is not a command; "
        "yield a task, a list of tasks, or task.dispatch()"
    )


def _short_repr(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
