"""Retry policies: how often a failed task attempt is tried again, and after what delay.

A policy is set per task (``retry = Retry(...)`` on a :class:`~zenflow.Task` class, or
``@task(retry=Retry(...))``) or for the whole application with :func:`set_default_retry`.
Without either, a task runs once and its failure reaches the workflow's ``yield`` at once.

The engine resolves the policy when the workflow yields the task, records it with the step and
sends it with every attempt. The agent reports whether an error may be retried (see
``non_retryable``) and calls the task's ``retry_delay`` hook, if it has one. The engine then
decides, and waits for the delay with a durable timer, so a retry that is due while the engine
is down happens after its restart with the attempt count kept.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Iterable, Mapping
from typing import Any

from zenflow.errors import DefinitionError

# A delay longer than this is almost certainly a unit mistake; a workflow can wait longer
# with zenflow.wait.
MAX_DELAY = dt.timedelta(days=366)
MAX_ATTEMPTS = 10_000


@dataclasses.dataclass(frozen=True)
class Retry:
    """A retry policy.

    Parameters:
        attempts: the maximum number of attempts, the first one included. 1 means no retry.
        initial: the delay before the second attempt.
        backoff: the factor that multiplies the delay after each further failure.
        max_delay: the maximum delay between two attempts.
        non_retryable: exception classes (or their names, such as ``"ValueError"`` or
            ``"billing.errors.CardDeclined"``) that are never retried, subclasses included.

    An exception with a true ``non_retryable`` attribute, such as
    :class:`~zenflow.NonRetryableError`, is never retried either.
    """

    attempts: int = 3
    initial: dt.timedelta = dt.timedelta(seconds=1)
    backoff: float = 2.0
    max_delay: dt.timedelta = dt.timedelta(hours=1)
    non_retryable: tuple[type[BaseException] | str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise DefinitionError(f"invalid attempts {self.attempts!r}: use an integer")
        if not 1 <= self.attempts <= MAX_ATTEMPTS:
            raise DefinitionError(
                f"invalid attempts {self.attempts}: use 1 (no retry) to {MAX_ATTEMPTS}"
            )
        for name in ("initial", "max_delay"):
            value = getattr(self, name)
            if not isinstance(value, dt.timedelta):
                raise DefinitionError(
                    f"invalid {name} {value!r}: use a datetime.timedelta, such as "
                    "timedelta(seconds=5)"
                )
            if not dt.timedelta(0) <= value <= MAX_DELAY:
                raise DefinitionError(f"invalid {name} {value}: use 0 to {MAX_DELAY.days} days")
        if (
            isinstance(self.backoff, bool)
            or not isinstance(self.backoff, int | float)
            or not math.isfinite(self.backoff)
            or not 1.0 <= self.backoff <= 100.0
        ):
            raise DefinitionError(
                f"invalid backoff {self.backoff!r}: use a factor from 1.0 (constant delay) to 100"
            )
        if isinstance(self.non_retryable, str | type):
            object.__setattr__(self, "non_retryable", (self.non_retryable,))
        elif isinstance(self.non_retryable, tuple | list | set | frozenset):
            object.__setattr__(self, "non_retryable", tuple(self.non_retryable))
        else:
            raise DefinitionError(
                f"invalid non_retryable {self.non_retryable!r}: use a tuple of exception "
                "classes or their names"
            )
        for kind in self.non_retryable:
            if isinstance(kind, str) and kind:
                continue
            if isinstance(kind, type) and issubclass(kind, BaseException):
                continue
            raise DefinitionError(
                f"invalid non_retryable entry {kind!r}: use exception classes or their names"
            )

    def delay(self, attempt: int) -> dt.timedelta | None:
        """Return the delay after failed attempt number ``attempt``, or None after the last."""
        if attempt >= self.attempts:
            return None
        try:
            seconds = self.initial.total_seconds() * self.backoff ** (attempt - 1)
        except OverflowError:
            return self.max_delay
        return min(dt.timedelta(seconds=min(seconds, MAX_DELAY.total_seconds())), self.max_delay)

    def to_wire(self) -> dict[str, Any]:
        """Return the policy as sent with each task attempt."""
        return {
            "attempts": self.attempts,
            "initial": self.initial.total_seconds(),
            "backoff": float(self.backoff),
            "max_delay": self.max_delay.total_seconds(),
            "non_retryable": [_type_name(kind) for kind in self.non_retryable],
        }

    @classmethod
    def from_wire(cls, fields: Mapping[str, Any]) -> Retry:
        """Build a policy from :meth:`to_wire`'s map; raise DefinitionError if it is invalid."""
        names = fields.get("non_retryable") or ()
        if isinstance(names, str):
            names = (names,)
        if not isinstance(names, list | tuple):
            raise DefinitionError(f"invalid non_retryable {names!r}: use a list of names")
        try:
            return cls(
                attempts=fields["attempts"],
                initial=dt.timedelta(seconds=float(fields["initial"])),
                backoff=fields["backoff"],
                max_delay=dt.timedelta(seconds=float(fields["max_delay"])),
                non_retryable=tuple(str(name) for name in names),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise DefinitionError(f"invalid retry policy {dict(fields)!r}: {error}") from None


NO_RETRY = Retry(attempts=1)
_default = NO_RETRY


def set_default_retry(policy: Retry | None) -> None:
    """Set the policy of tasks that declare none; ``None`` restores "no retry".

    Call it in the application module that the engine and the agents import (``--app``).
    """
    global _default
    if policy is not None and not isinstance(policy, Retry):
        raise DefinitionError(f"invalid default retry policy {policy!r}: use zenflow.Retry(...)")
    _default = policy or NO_RETRY


def default_retry() -> Retry:
    """Return the policy of tasks that declare none."""
    return _default


def is_non_retryable(error: BaseException, names: Iterable[str]) -> bool:
    """Return whether ``error`` must not be retried under a policy's ``non_retryable`` names.

    A name matches the class of the error or of one of its bases, by its bare name or by its
    module-qualified name.
    """
    try:
        if bool(getattr(error, "non_retryable", False)):
            return True
    except Exception:  # a property of user code that raises counts as not set
        pass
    expected = set(names)
    if not expected:
        return False
    for kind in type(error).__mro__:
        qualified = f"{kind.__module__}.{kind.__qualname__}"
        if kind.__name__ in expected or qualified in expected:
            return True
    return False


def _type_name(kind: type[BaseException] | str) -> str:
    if isinstance(kind, str):
        return kind
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def seconds_of(value: Any, name: str, owner: str) -> float | None:
    """Return a timeout given as a timedelta or a number of seconds, checked, or None."""
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise DefinitionError(
            f"invalid {name} {value!r} for {owner}: use a datetime.timedelta or seconds"
        )
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_DELAY.total_seconds():
        raise DefinitionError(
            f"invalid {name} {value!r} for {owner}: use more than 0 and at most "
            f"{MAX_DELAY.days} days"
        )
    return seconds
