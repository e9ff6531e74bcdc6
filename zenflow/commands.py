"""Commands: the values a workflow generator yields.

A workflow never runs a task itself. It yields a command that describes the task, and the
engine records the command, publishes it to the task's queue and sends the result back into
the generator. Commands are frozen so that the recorded and the replayed ones compare by
value.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Mode = Literal["execute", "dispatch"]


@dataclasses.dataclass(frozen=True)
class TaskCall:
    """One task to run with its arguments.

    ``mode`` is ``"execute"`` when the workflow waits for the result at the ``yield``, and
    ``"dispatch"`` when it starts the task and goes on at once (the ``yield`` returns
    ``None``).
    """

    name: str
    queue: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    mode: Mode = "execute"

    def dispatch(self) -> TaskCall:
        """Return this call as fire-and-forget: the workflow does not wait for its result."""
        return dataclasses.replace(self, mode="dispatch")

    def describe(self) -> str:
        """Format the call as Python source, for logs, history and error messages."""
        return describe_call(self.name, self.args, self.kwargs, self.mode)


def describe_call(name: str, args: Any, kwargs: Any, mode: str = "execute") -> str:
    """Format a call as ``Name(arg, key=value)``, prefixed by ``dispatch`` when detached."""
    parts = [_short(repr(arg)) for arg in args]
    parts += [f"{key}={_short(repr(value))}" for key, value in dict(kwargs).items()]
    text = f"{name}({', '.join(parts)})"
    return f"dispatch {text}" if mode == "dispatch" else text


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
