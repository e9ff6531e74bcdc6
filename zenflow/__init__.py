"""zenflow: durable workflows as Python generators, over RabbitMQ and a relational database.

User code imports everything from here::

    from zenflow import Task, Workflow, task, workflow, Client
"""

from zenflow import wait
from zenflow.aioclient import AsyncClient
from zenflow.client import Client, default_client
from zenflow.commands import Event, First, TaskCall
from zenflow.context import current_run, current_task, get_logger, now, random, uuid4
from zenflow.errors import (
    ConfigurationError,
    DefinitionError,
    NonDeterminismError,
    RequestRejected,
    RunFailed,
    RunNotFound,
    RunTimeout,
    SerializationError,
    StoreError,
    TaskFailed,
    TransportError,
    ZenflowError,
)
from zenflow.task import Task, TaskFunction, task
from zenflow.workflow import Workflow, WorkflowCall, WorkflowFunction, workflow

__all__ = [
    "AsyncClient",
    "Client",
    "ConfigurationError",
    "DefinitionError",
    "Event",
    "First",
    "NonDeterminismError",
    "RequestRejected",
    "RunFailed",
    "RunNotFound",
    "RunTimeout",
    "SerializationError",
    "StoreError",
    "Task",
    "TaskCall",
    "TaskFailed",
    "TaskFunction",
    "TransportError",
    "Workflow",
    "WorkflowCall",
    "WorkflowFunction",
    "ZenflowError",
    "current_run",
    "current_task",
    "default_client",
    "get_logger",
    "now",
    "random",
    "task",
    "uuid4",
    "wait",
    "workflow",
]
