"""zenflow: durable workflows as Python generators, over RabbitMQ and a relational database.

User code imports everything from here::

    from zenflow import Task, Workflow, task, workflow, Client
"""

from zenflow import wait
from zenflow.aioclient import AsyncClient
from zenflow.client import Client, default_client
from zenflow.commands import Event, First, TaskCall
from zenflow.context import current_run, current_task, get_logger, heartbeat, now, random, uuid4
from zenflow.errors import (
    AttemptCancelled,
    ConfigurationError,
    DefinitionError,
    NonDeterminismError,
    NonRetryableError,
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
from zenflow.retry import Retry, set_default_retry
from zenflow.task import Task, TaskFunction, task
from zenflow.workflow import Workflow, WorkflowCall, WorkflowFunction, workflow

__all__ = [
    "AsyncClient",
    "AttemptCancelled",
    "Client",
    "ConfigurationError",
    "DefinitionError",
    "Event",
    "First",
    "NonDeterminismError",
    "NonRetryableError",
    "RequestRejected",
    "Retry",
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
    "heartbeat",
    "now",
    "random",
    "set_default_retry",
    "task",
    "uuid4",
    "wait",
    "workflow",
]
