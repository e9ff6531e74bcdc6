"""Tasks: the units of work that agents execute.

A task is either a class with ``__init__`` and ``handle`` or a function decorated with
:func:`task`. Inside a workflow, constructing a task class or calling a decorated function
returns something to ``yield``; it does not run the task. The agent runs it later, in another
process, from the name and the arguments.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import re
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, overload

from zenflow.commands import TaskCall
from zenflow.errors import DefinitionError
from zenflow.retry import Retry, seconds_of

DEFAULT_QUEUE = "default"

# Queue names become part of AMQP queue names, so they are kept to a portable alphabet.
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
_TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,199}$")


def validate_queue_name(queue: Any, owner: str) -> str:
    """Return ``queue`` if it is a valid queue name, else raise DefinitionError naming it."""
    if not isinstance(queue, str) or not _QUEUE_NAME.match(queue):
        raise DefinitionError(
            f"invalid queue {queue!r} for {owner}: use 1 to 100 letters, digits, '_', '.' or '-'"
        )
    return queue


def validate_name(name: Any, owner: str) -> str:
    """Return ``name`` if it is a valid task or workflow name, else raise DefinitionError."""
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        raise DefinitionError(
            f"invalid name {name!r} for {owner}: start with a letter or '_' and use up to 200 "
            "letters, digits, '_', '.' or '-'"
        )
    return name


class Task:
    """Base class of class-style tasks.

    Subclasses define ``__init__`` to take the task's arguments and ``handle`` (sync or
    ``async def``) to do the work. Class attributes:

    - ``queue``: the queue that agents consume the task from (default ``"default"``).
    - ``task_name``: the name the task is registered and sent under (default: the class name).
    - ``retry``: a :class:`~zenflow.Retry` policy (default: the application's, see
      :func:`~zenflow.set_default_retry`, which is "no retry" unless set).
    - ``timeout``: the longest an attempt may run, as a ``timedelta`` (default: no limit).
      An attempt that runs longer fails with ``TaskTimeout`` and is retried per ``retry``.
    - ``heartbeat``: the longest time between two :func:`zenflow.heartbeat` calls of a
      running attempt (default: not checked). A longer silence fails the attempt with
      ``TaskHeartbeatTimeout``.

    A subclass may define ``retry_delay(self, error, attempt)``, which the agent calls after
    a failed attempt (``attempt`` counts from 1) to decide the delay before the next one:
    return a ``timedelta``, or ``None`` to stop retrying. The ``retry`` policy's attempts and
    ``non_retryable`` still apply.

    The arguments passed to the constructor are captured and sent to the agent, which builds
    the instance again with the same arguments. They must therefore be encodable by
    :mod:`zenflow.serializer`.
    """

    task_name: ClassVar[str]
    queue: ClassVar[str] = DEFAULT_QUEUE
    retry: ClassVar[Retry | None] = None
    timeout: ClassVar[dt.timedelta | None] = None
    heartbeat: ClassVar[dt.timedelta | None] = None

    _zenflow_args: tuple[Any, ...]
    _zenflow_kwargs: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.task_name = validate_name(cls.__dict__.get("task_name", cls.__name__), cls.__qualname__)
        validate_queue_name(cls.queue, cls.__qualname__)
        validate_options(cls.retry, cls.timeout, cls.heartbeat, cls.__qualname__)
        hook = cls.__dict__.get("retry_delay")
        if hook is not None and not callable(hook):
            raise DefinitionError(
                f"invalid retry_delay {hook!r} for {cls.__qualname__}: define a method "
                "retry_delay(self, error, attempt) that returns a timedelta or None"
            )

    def __new__(cls, *args: Any, **kwargs: Any) -> Task:
        instance = super().__new__(cls)
        instance._zenflow_args = args
        instance._zenflow_kwargs = kwargs
        return instance

    def handle(self) -> Any:
        """Do the task's work and return its result; subclasses must override it."""
        raise NotImplementedError(f"{type(self).__qualname__}.handle() is not implemented")

    def to_call(self) -> TaskCall:
        """Return the command that runs this task and waits for its result."""
        owner = type(self).__qualname__
        queue = validate_queue_name(self.queue, owner)
        return TaskCall(
            self.task_name,
            queue,
            self._zenflow_args,
            dict(self._zenflow_kwargs),
            retry=self.retry,
            timeout=seconds_of(self.timeout, "timeout", owner),
            heartbeat=seconds_of(self.heartbeat, "heartbeat", owner),
        )

    def dispatch(self) -> TaskCall:
        """Return the command that starts this task without waiting for its result."""
        return self.to_call().dispatch()


F = TypeVar("F", bound=Callable[..., Any])


class TaskFunction:
    """A function decorated with :func:`task`.

    Calling it returns a :class:`~zenflow.commands.TaskCall` to yield from a workflow, after
    checking the arguments against the function's signature. :meth:`run` calls the function
    itself, which is what the agent does.
    """

    def __init__(
        self,
        function: Callable[..., Any],
        *,
        name: str | None,
        queue: str,
        retry: Retry | None = None,
        timeout: dt.timedelta | float | None = None,
        heartbeat: dt.timedelta | float | None = None,
        retry_delay: Callable[[BaseException, int], dt.timedelta | None] | None = None,
    ) -> None:
        functools.update_wrapper(self, function)
        self.function = function
        owner = function.__qualname__
        self.task_name = validate_name(name or function.__name__, owner)
        self.queue = validate_queue_name(queue, owner)
        self.signature = inspect.signature(function)
        validate_options(retry, timeout, heartbeat, owner)
        if retry_delay is not None and not callable(retry_delay):
            raise DefinitionError(
                f"invalid retry_delay {retry_delay!r} for {owner}: use a function of "
                "(error, attempt) that returns a timedelta or None"
            )
        self.retry = retry
        self.timeout = seconds_of(timeout, "timeout", owner)
        self.heartbeat = seconds_of(heartbeat, "heartbeat", owner)
        self.retry_delay = retry_delay

    def __call__(self, *args: Any, **kwargs: Any) -> TaskCall:
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"invalid arguments for task {self.task_name}: {error}") from None
        return TaskCall(
            self.task_name,
            self.queue,
            args,
            kwargs,
            retry=self.retry,
            timeout=self.timeout,
            heartbeat=self.heartbeat,
        )

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the decorated function directly (in tests, or in the agent)."""
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<task {self.task_name} on queue {self.queue!r}>"


RetryDelay = Callable[[BaseException, int], dt.timedelta | None]


@overload
def task(function: F, /) -> TaskFunction: ...


@overload
def task(
    *,
    name: str | None = None,
    queue: str = DEFAULT_QUEUE,
    retry: Retry | None = None,
    timeout: dt.timedelta | float | None = None,
    heartbeat: dt.timedelta | float | None = None,
    retry_delay: RetryDelay | None = None,
) -> Callable[[Callable[..., Any]], TaskFunction]: ...


def task(
    function: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str = DEFAULT_QUEUE,
    retry: Retry | None = None,
    timeout: dt.timedelta | float | None = None,
    heartbeat: dt.timedelta | float | None = None,
    retry_delay: RetryDelay | None = None,
) -> TaskFunction | Callable[[Callable[..., Any]], TaskFunction]:
    """Declare a function (sync or ``async def``) as a task, as ``@task`` or ``@task(...)``.

    Parameters:
        name: the registered name; defaults to the function's name.
        queue: the queue that agents consume the task from; defaults to ``"default"``.
        retry: the retry policy; defaults to the application's (see ``set_default_retry``).
        timeout: the longest an attempt may run (a ``timedelta`` or seconds).
        heartbeat: the longest time between two ``zenflow.heartbeat()`` calls.
        retry_delay: a function of ``(error, attempt)`` that returns the delay before the
            next attempt, or ``None`` to stop retrying.
    """
    options: dict[str, Any] = {
        "name": name,
        "queue": queue,
        "retry": retry,
        "timeout": timeout,
        "heartbeat": heartbeat,
        "retry_delay": retry_delay,
    }
    if function is not None:
        return TaskFunction(function, **options)

    def decorate(inner: Callable[..., Any]) -> TaskFunction:
        return TaskFunction(inner, **options)

    return decorate


def validate_options(retry: Any, timeout: Any, heartbeat: Any, owner: str) -> None:
    """Raise DefinitionError naming the value unless the task's run options are valid."""
    if retry is not None and not isinstance(retry, Retry):
        raise DefinitionError(
            f"invalid retry {retry!r} for {owner}: use zenflow.Retry(attempts=..., ...)"
        )
    seconds_of(timeout, "timeout", owner)
    seconds_of(heartbeat, "heartbeat", owner)
