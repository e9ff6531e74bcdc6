"""Workflows: durable business processes written as Python generators.

A workflow's ``handle`` yields commands (tasks, lists of tasks, dispatched tasks) and gets
their results back at each ``yield``. The engine records every command and result and
rebuilds the generator after a restart by replaying them, so workflow code must be
deterministic: the same inputs and results must lead to the same commands in the same order.
Read outside state in tasks; in workflow code, use ``zenflow.now()``, ``zenflow.random()``
and ``zenflow.uuid4()``, which return the same values on every replay.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from zenflow.commands import describe_call
from zenflow.context import ReplaySafeLogger, get_logger
from zenflow.errors import DefinitionError
from zenflow.task import validate_name

if TYPE_CHECKING:
    from zenflow.client import Client


class Workflow:
    """Base class of class-style workflows.

    Subclasses take the workflow's arguments in ``__init__`` and define ``handle``, usually
    a generator. They may define ``id()`` to return a business id, such as
    ``f"order-{self.order_id}"``, by which the run can be found. ``workflow_name`` sets the
    registered name (default: the class name).
    """

    workflow_name: ClassVar[str]

    _zenflow_args: tuple[Any, ...]
    _zenflow_kwargs: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.workflow_name = validate_name(
            cls.__dict__.get("workflow_name", cls.__name__), cls.__qualname__
        )

    def __new__(cls, *args: Any, **kwargs: Any) -> Workflow:
        instance = super().__new__(cls)
        instance._zenflow_args = args
        instance._zenflow_kwargs = kwargs
        return instance

    def handle(self) -> Any:
        """Run the workflow: yield commands and return the run's result."""
        raise NotImplementedError(f"{type(self).__qualname__}.handle() is not implemented")

    def id(self) -> str | None:
        """Return the run's business id, or None for none (the default)."""
        return None

    @property
    def log(self) -> ReplaySafeLogger:
        """A logger that is silent while the engine replays this run's history."""
        return get_logger(type(self).__module__)

    def to_call(self) -> WorkflowCall:
        return WorkflowCall(
            self.workflow_name, self._zenflow_args, dict(self._zenflow_kwargs), self.id()
        )

    def dispatch(self, *, client: Client | None = None) -> Any:
        """Start this workflow as a new run without waiting for it.

        Outside a workflow, the run starts at once, through ``client`` or else the default
        client configured from ``ZENFLOW_*`` environment variables, and its run id is
        returned. Inside a workflow, the call returns a command: ``yield`` it to start the
        workflow as a child run, and the ``yield`` returns the child's run id.
        """
        return self.to_call().dispatch(client=client)


@dataclasses.dataclass(frozen=True)
class WorkflowCall:
    """A workflow with its arguments, ready to be started as a run.

    Yielded inside a workflow, it starts a child run: with ``mode="execute"`` the ``yield``
    returns the child's result (or raises its failure as :class:`~zenflow.TaskFailed`), with
    ``mode="dispatch"`` it returns the child's run id at once.
    """

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    business_id: str | None = None
    mode: Literal["execute", "dispatch"] = "execute"

    def dispatch(self, *, client: Client | None = None) -> Any:
        """Start the workflow: a run id outside a workflow, a child command inside one."""
        from zenflow.context import current_run

        if current_run() is not None:
            if client is not None:
                raise DefinitionError(
                    f"cannot pass a client when dispatching workflow {self.name} inside a "
                    "workflow: yield the returned command to start it as a child run"
                )
            return dataclasses.replace(self, mode="dispatch")
        if client is None:
            from zenflow.client import default_client

            client = default_client()
        return client.start(self.name, *self.args, business_id=self.business_id, **self.kwargs)

    def describe(self) -> str:
        return describe_call(self.name, self.args, self.kwargs, self.mode)


G = TypeVar("G", bound=Callable[..., Any])


class WorkflowFunction:
    """A (generator) function decorated with :func:`workflow`.

    Calling it returns a :class:`WorkflowCall`; ``my_workflow(1, 2).dispatch()`` starts it.
    """

    def __init__(self, function: Callable[..., Any], *, name: str | None) -> None:
        functools.update_wrapper(self, function)
        self.function = function
        self.workflow_name = validate_name(name or function.__name__, function.__qualname__)
        self.signature = inspect.signature(function)

    def __call__(self, *args: Any, business_id: str | None = None, **kwargs: Any) -> WorkflowCall:
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(
                f"invalid arguments for workflow {self.workflow_name}: {error}"
            ) from None
        return WorkflowCall(self.workflow_name, args, kwargs, business_id)

    def __repr__(self) -> str:
        return f"<workflow {self.workflow_name}>"


def workflow(function: Callable[..., Any] | None = None, /, *, name: str | None = None) -> Any:
    """Declare a (generator) function as a workflow: ``@workflow`` or ``@workflow(name=...)``.

    Calling the decorated function returns a :class:`WorkflowCall`, so that
    ``order_flow("A-17", 4200).dispatch()`` starts a run.
    """
    if function is not None:
        return WorkflowFunction(function, name=name)

    def decorate(inner: Callable[..., Any]) -> WorkflowFunction:
        return WorkflowFunction(inner, name=name)

    return decorate
