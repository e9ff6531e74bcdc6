"""Registration of the tasks and workflows that an engine or agent may run, found by module.

Only what is registered can run: a message names a task or workflow, and the name is looked
up here. Nothing from a message is ever imported or unpickled.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from zenflow.errors import ConfigurationError, DefinitionError
from zenflow.task import Task, TaskFunction
from zenflow.workflow import Workflow, WorkflowFunction


@dataclasses.dataclass(frozen=True)
class TaskDefinition:
    name: str
    queue: str
    target: type[Task] | TaskFunction

    @property
    def is_async(self) -> bool:
        if isinstance(self.target, TaskFunction):
            return inspect.iscoroutinefunction(self.target.function)
        return inspect.iscoroutinefunction(self.target.handle)

    def prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[], Any]:
        """Bind the arguments and return a callable that runs the task once.

        Raises:
            TypeError: the arguments do not fit the task's signature.
        """
        if isinstance(self.target, TaskFunction):
            function = self.target.function
            self.target.signature.bind(*args, **kwargs)
            return lambda: function(*args, **kwargs)
        instance = self.target(*args, **kwargs)
        return instance.handle

    def retry_hook(self, call: Callable[[], Any] | None) -> Callable[..., Any] | None:
        """Return the task's ``retry_delay(error, attempt)`` hook, if it has one.

        ``call`` is what :meth:`prepare` returned, bound to a class task's instance.
        """
        if isinstance(self.target, TaskFunction):
            return self.target.retry_delay
        instance = getattr(call, "__self__", None)
        hook = getattr(instance, "retry_delay", None)
        return hook if callable(hook) else None


@dataclasses.dataclass(frozen=True)
class WorkflowDefinition:
    name: str
    target: type[Workflow] | WorkflowFunction

    def check_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise TypeError with a readable message unless the arguments fit the signature."""
        try:
            if isinstance(self.target, WorkflowFunction):
                self.target.signature.bind(*args, **kwargs)
            elif self.target.__init__ is object.__init__:
                if args or kwargs:
                    raise TypeError("takes no arguments")
            else:
                inspect.signature(self.target.__init__).bind(None, *args, **kwargs)
        except TypeError as error:
            raise TypeError(f"invalid arguments for workflow {self.name}: {error}") from None

    def instantiate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Workflow | None:
        """Create the workflow object (class style), or return None (function style)."""
        if isinstance(self.target, WorkflowFunction):
            return None
        return self.target(*args, **kwargs)

    def begin(
        self, instance: Workflow | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Call the workflow: return its generator, or its result if it is not a generator."""
        if instance is not None:
            return instance.handle()
        assert isinstance(self.target, WorkflowFunction)
        return self.target.function(*args, **kwargs)


class Registry:
    """The tasks and workflows of an application, by name."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskDefinition] = {}
        self.workflows: dict[str, WorkflowDefinition] = {}
        self.modules: list[str] = []

    def add_task(self, target: type[Task] | TaskFunction) -> None:
        definition = TaskDefinition(target.task_name, target.queue, target)
        existing = self.tasks.get(definition.name)
        if existing is not None and existing.target is not target:
            raise DefinitionError(
                f"two tasks are named {definition.name!r}: {_where(existing.target)} and "
                f"{_where(target)}; set task_name (or @task(name=...)) on one of them"
            )
        self.tasks[definition.name] = definition

    def add_workflow(self, target: type[Workflow] | WorkflowFunction) -> None:
        definition = WorkflowDefinition(target.workflow_name, target)
        existing = self.workflows.get(definition.name)
        if existing is not None and existing.target is not target:
            raise DefinitionError(
                f"two workflows are named {definition.name!r}: {_where(existing.target)} and "
                f"{_where(target)}; set workflow_name (or @workflow(name=...)) on one of them"
            )
        self.workflows[definition.name] = definition

    def add_module(self, module: Any) -> None:
        """Register every task and workflow that is an attribute of ``module``."""
        for value in list(vars(module).values()):
            if isinstance(value, TaskFunction):
                self.add_task(value)
            elif isinstance(value, WorkflowFunction):
                self.add_workflow(value)
            elif isinstance(value, type) and value not in (Task, Workflow):
                if issubclass(value, Task) and "handle" in _defined_methods(value):
                    self.add_task(value)
                elif issubclass(value, Workflow) and "handle" in _defined_methods(value):
                    self.add_workflow(value)
        self.modules.append(module.__name__)

    def queues(self) -> list[str]:
        return sorted({definition.queue for definition in self.tasks.values()})


def _defined_methods(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (Task, Workflow, object):
            break
        names.update(vars(klass))
    return names


def _where(target: Any) -> str:
    function = getattr(target, "function", target)
    return f"{function.__module__}.{function.__qualname__}"


# zenflow installs these top-level packages, so an application module cannot use their names.
RESERVED_MODULES = frozenset({"zenflow", "engine", "agent", "cli"})


def load_registry(module_names: Iterable[str], *, search_path: Path | None = None) -> Registry:
    """Import the application modules and register their tasks and workflows.

    The current working folder (or ``search_path``) is put first on ``sys.path``, as
    ``python -m`` does, so that ``--app myapp`` finds ``./myapp.py``.

    Raises:
        ConfigurationError: no module is given, or one fails to import; the message names
            the module and the error.
        DefinitionError: two tasks or two workflows share a name.
    """
    names = list(module_names)
    if not names:
        raise ConfigurationError(
            "no application module given: pass --app MODULE or set ZENFLOW_APP"
        )
    folder = str(search_path or Path.cwd())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    registry = Registry()
    for name in names:
        if name.split(".")[0] in RESERVED_MODULES:
            raise ConfigurationError(
                f"application module {name!r} has the name of one of zenflow's packages "
                f"({', '.join(sorted(RESERVED_MODULES))}), which the zenflow process has "
                "already imported; rename your module"
            )
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name and name.startswith(error.name):
                raise ConfigurationError(
                    f"application module {name!r} not found in {folder} or on sys.path; "
                    "check --app or ZENFLOW_APP"
                ) from None
            raise ConfigurationError(
                f"application module {name!r} failed to import: {type(error).__name__}: {error}"
            ) from error
        except Exception as error:
            raise ConfigurationError(
                f"application module {name!r} failed to import: {type(error).__name__}: {error}"
            ) from error
        registry.add_module(module)
    return registry
