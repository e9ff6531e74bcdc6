"""Commands: the values a workflow generator yields.

A workflow never runs a task itself. It yields a command that describes the task, and the
engine records the command, publishes it to the task's queue and sends the result back into
the generator. Commands are frozen so that the recorded and the replayed ones compare by
value.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Literal, NamedTuple

from zenflow.retry import Retry

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
    # How the task runs, not what it does: replay does not compare these, so a deploy may
    # change them for runs in progress. None takes the application's default retry policy.
    retry: Retry | None = dataclasses.field(default=None, compare=False)
    timeout: float | None = dataclasses.field(default=None, compare=False)  # seconds
    heartbeat: float | None = dataclasses.field(default=None, compare=False)  # seconds

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


@dataclasses.dataclass(frozen=True)
class Timer:
    """A durable wait, resolved by the engine to a fire instant when first yielded.

    ``rule`` is one of ``{"kind": "duration", "seconds": float}``,
    ``{"kind": "until", "at": aware datetime}``, ``{"kind": "time_of_day", "at": "HH:MM:SS",
    "tz": zone}``, ``{"kind": "weekday", "weekday": 0..6, "at": ..., "tz": ...}`` and
    ``{"kind": "day_of_month", "day": 1..31, "at": ..., "tz": ...}``. Replay compares rules,
    not instants, so a replayed ``wait.for_(hours=1)`` matches the recorded one.
    """

    rule: dict[str, Any]

    def describe(self) -> str:
        return describe_rule(self.rule)


@dataclasses.dataclass(frozen=True)
class EventWait:
    """A wait for the next event with one of ``names``, or for ``timeout`` seconds."""

    names: tuple[str, ...]
    timeout: float | None = None

    def describe(self) -> str:
        names = " or ".join(repr(name) for name in self.names)
        if self.timeout is None:
            return f"wait for event {names}"
        return f"wait for event {names}, timeout {format_seconds(self.timeout)}"


@dataclasses.dataclass(frozen=True)
class FirstOf:
    """Several commands raced against each other; the first to finish wins."""

    commands: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Event:
    """An event delivered to a workflow's wait: its name, data and arrival time."""

    name: str
    data: Any
    received_at: dt.datetime


class First(NamedTuple):
    """The winner of ``wait.first(...)``: its position among the commands and its value."""

    position: int
    value: Any


def describe_rule(rule: dict[str, Any]) -> str:
    """Format a timer rule for history and error messages."""
    kind = rule.get("kind")
    if kind == "duration":
        return f"wait {format_seconds(float(rule['seconds']))}"
    if kind == "until":
        return f"wait until {rule['at'].isoformat()}"
    zone = rule.get("tz", "UTC")
    if kind == "time_of_day":
        return f"wait until {rule['at']} {zone}"
    if kind == "weekday":
        day = _WEEKDAYS[int(rule["weekday"])]
        return f"wait until {day} {rule['at']} {zone}"
    if kind == "day_of_month":
        return f"wait until day {rule['day']} of the month, {rule['at']} {zone}"
    return f"wait {rule!r}"


def format_seconds(seconds: float) -> str:
    """Format a duration such as ``1h30m`` or ``2.5s``."""
    if seconds < 60:
        return f"{seconds:g}s"
    whole = round(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d" if days else "", f"{hours}h" if hours else ""]
    parts += [f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts)


_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
