"""aio-pika helpers shared by the asyncio client, the engine and the agent."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from zenflow import _amqp_properties, _tls, protocol
from zenflow.config import redact_url
from zenflow.errors import TransportError

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.AMQPException,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)

# One message with a property that pamqp cannot decode would otherwise close the connection
# at every delivery and stop the consumer for good (see zenflow._amqp_properties).
_amqp_properties.install()


async def connect(
    amqp_url: str, *, name: str, timeout: float = 10.0
) -> aio_pika.abc.AbstractRobustConnection:
    """Open a robust connection, which reconnects and restores channels and consumers.

    An ``amqps://`` URL connects with TLS, configured by its query parameters (see
    :mod:`zenflow._tls`).

    Raises:
        TransportError: the first connection failed; the message has no password.
        ConfigurationError: a TLS file of the URL cannot be loaded.
    """
    address = _tls.parse(amqp_url)
    context = None if address.tls is None else address.tls.context()
    # A failed first attempt is reported once, by the TransportError below; aiormq would
    # also log it at error level.
    aiormq_log = logging.getLogger("aiormq.connection")
    level = aiormq_log.level
    aiormq_log.setLevel(logging.CRITICAL)
    try:
        return await aio_pika.connect_robust(
            address.url,
            timeout=timeout,
            client_properties={"connection_name": name},
            ssl_context=context,
        )
    except CONNECTION_ERRORS as error:
        hint = _tls.failure_hint(error, address.tls is not None)
        raise TransportError(
            f"cannot connect to RabbitMQ at {redact_url(amqp_url)}: "
            f"{redact_url(describe(error))}{hint}. Check that the broker is running and the "
            "URL is right (--amqp-url or ZENFLOW_AMQP_URL)"
        ) from None
    finally:
        aiormq_log.setLevel(level)


def describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def declare_entry(
    channel: aio_pika.abc.AbstractChannel, topology: protocol.Topology
) -> dict[str, Any]:
    """Declare the engine's exchanges and queues; return them by role."""
    engine_exchange = await channel.declare_exchange(
        topology.engine_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    runs_exchange = await channel.declare_exchange(
        topology.runs_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    requests = await channel.declare_queue(topology.requests_queue, durable=True)
    await requests.bind(engine_exchange, topology.requests_routing_key)
    results = await channel.declare_queue(topology.results_queue, durable=True)
    return {
        "engine_exchange": engine_exchange,
        "runs_exchange": runs_exchange,
        "requests": requests,
        "results": results,
    }


async def declare_task_queue(
    channel: aio_pika.abc.AbstractChannel, topology: protocol.Topology, queue: str
) -> aio_pika.abc.AbstractQueue:
    return await channel.declare_queue(topology.task_queue(queue), durable=True)
