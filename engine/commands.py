"""Turn what a workflow generator yielded into commands, or explain why it cannot."""

from __future__ import annotations

import inspect
from typing import Any, Literal

from zenflow.commands import EventWait, FirstOf, TaskCall, Timer
from zenflow.errors import DefinitionError
from zenflow.task import Task, TaskFunction, validate_name, validate_queue_name
from zenflow.workflow import Workflow, WorkflowCall, WorkflowFunction

# The condition that resumes one yield: its single command, every command of a list, or the
# first command of a wait.first(...) to finish.
Grouping = Literal["single", "all", "first"]
Command = TaskCall | WorkflowCall | Timer | EventWait


def to_commands(yielded: Any, workflow: str) -> tuple[list[Command], Grouping]:
    """Return the commands of one ``yield`` and how the workflow waits for them.

    Raises:
        DefinitionError: the value is not a command; the message names it and, for a
            generator object, suggests ``yield from``.
    """
    if isinstance(yielded, list | tuple):
        calls = [
            _to_call(item, workflow, f"item {index} of the yielded list")
            for index, item in enumerate(yielded)
        ]
        return calls, "all"
    if isinstance(yielded, FirstOf):
        calls = [
            _to_call(item, workflow, f"item {index} of wait.first()")
            for index, item in enumerate(yielded.commands)
        ]
        return calls, "first"
    return [_to_call(yielded, workflow, "the yielded value")], "single"


def _to_call(value: Any, workflow: str, where: str) -> Command:
    if isinstance(value, TaskCall):
        return _checked(value, workflow, where)
    if isinstance(value, Task):
        return value.to_call()
    if isinstance(value, Timer | EventWait | WorkflowCall):
        return value
    if isinstance(value, Workflow):
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
    if isinstance(value, WorkflowFunction):
        return (
            f"workflow {workflow}: {where} is the workflow function {value.workflow_name} "
            f"itself; call it with its arguments: `yield {value.workflow_name}(...)`"
        )
    if isinstance(value, FirstOf):
        return (
            f"workflow {workflow}: {where} is a wait.first(); yield it on its own, not inside "
            "a list or another wait.first()"
        )
    return (
        f"workflow {workflow}: {where} is {shown} of type {kind}, which is not a command; "
        "yield a task, a child workflow, a wait, a list of them, or wait.first(...)"
    )


def _short_repr(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
