"""Tasks: the units of work that agents execute.

A task is either a class with ``__init__`` and ``handle`` or a function decorated with
:func:`task`. Inside a workflow, constructing a task class or calling a decorated function
returns something to ``yield``; it does not run the task. The agent runs it later, in another
process, from the name and the arguments.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, overload

from zenflow.commands import TaskCall
from zenflow.errors import DefinitionError

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

    The arguments passed to the constructor are captured and sent to the agent, which builds
    the instance again with the same arguments. They must therefore be encodable by
    :mod:`zenflow.serializer`.
    """

    task_name: ClassVar[str]
    queue: ClassVar[str] = DEFAULT_QUEUE

    _zenflow_args: tuple[Any, ...]
    _zenflow_kwargs: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.task_name = validate_name(cls.__dict__.get("task_name", cls.__name__), cls.__qualname__)
        validate_queue_name(cls.queue, cls.__qualname__)

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
        queue = validate_queue_name(self.queue, type(self).__qualname__)
        return TaskCall(self.task_name, queue, self._zenflow_args, dict(self._zenflow_kwargs))

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

    def __init__(self, function: Callable[..., Any], *, name: str | None, queue: str) -> None:
        functools.update_wrapper(self, function)
        self.function = function
        self.task_name = validate_name(name or function.__name__, function.__qualname__)
        self.queue = validate_queue_name(queue, function.__qualname__)
        self.signature = inspect.signature(function)

    def __call__(self, *args: Any, **kwargs: Any) -> TaskCall:
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"invalid arguments for task {self.task_name}: {error}") from None
        return TaskCall(self.task_name, self.queue, args, kwargs)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the decorated function directly (in tests, or in the agent)."""
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<task {self.task_name} on queue {self.queue!r}>"


@overload
def task(function: F, /) -> TaskFunction: ...


@overload
def task(
    *, name: str | None = None, queue: str = DEFAULT_QUEUE
) -> Callable[[Callable[..., Any]], TaskFunction]: ...


def task(
    function: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str = DEFAULT_QUEUE,
) -> TaskFunction | Callable[[Callable[..., Any]], TaskFunction]:
    """Declare a function (sync or ``async def``) as a task, as ``@task`` or ``@task(...)``.

    Parameters:
        name: the registered name; defaults to the function's name.
        queue: the queue that agents consume the task from; defaults to ``"default"``.
    """
    if function is not None:
        return TaskFunction(function, name=name, queue=queue)

    def decorate(inner: Callable[..., Any]) -> TaskFunction:
        return TaskFunction(inner, name=name, queue=queue)

    return decorate
