"""aio-pika helpers shared by the asyncio client, the engine and the agent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from zenflow import _amqp_properties, _tls, protocol
from zenflow.config import redact_url
from zenflow.errors import TransportError

# Errors of a lost connection or channel, of a publish that RabbitMQ did not confirm, and of
# a call on a channel that is closed while its robust connection reconnects (aiormq's
# ChannelInvalidStateError, a RuntimeError).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.AMQPException,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)

# Seconds between reconnection attempts of a robust connection (aio-pika's default is 5).
# A reconnect_interval parameter in the AMQP URL takes precedence.
RECONNECT_INTERVAL = 1.0

# Seconds that one publish waits for RabbitMQ's confirm before it counts as failed, and the
# least that a retry near its deadline waits.
CONFIRM_TIMEOUT = 10.0
MIN_CONFIRM_TIMEOUT = 1.0
# Pauses between publish attempts: doubled from the first up to the maximum, in seconds.
RETRY_DELAY_FIRST = 0.1
RETRY_DELAY_MAX = 2.0

# One message with a property that pamqp cannot decode would otherwise close the connection
# at every delivery and stop the consumer for good (see zenflow._amqp_properties).
_amqp_properties.install()


async def connect(
    amqp_url: str, *, name: str, timeout: float = 10.0, log: Any = None
) -> aio_pika.abc.AbstractRobustConnection:
    """Open a robust connection, which reconnects and restores channels and consumers.

    With ``log`` (a structlog logger), each lost connection is logged as
    ``amqp_connection_lost`` and each reconnect as ``amqp_reconnected``. An ``amqps://`` URL
    connects with TLS, configured by its query parameters (see :mod:`zenflow._tls`).

    Raises:
        TransportError: the first connection failed; the message has no password.
        ConfigurationError: a TLS file of the URL cannot be loaded.
    """
    address = _tls.parse(amqp_url)
    context = None if address.tls is None else address.tls.context()
    try:
        connection = await connect_robust(
            address.url, name=name, timeout=timeout, ssl_context=context
        )
    except CONNECTION_ERRORS as error:
        hint = _tls.failure_hint(error, address.tls is not None)
        raise TransportError(
            f"cannot connect to RabbitMQ at {redact_url(amqp_url)}: "
            f"{redact_url(describe(error))}{hint}. Check that the broker is running and the "
            "URL is right (--amqp-url or ZENFLOW_AMQP_URL)"
        ) from None
    if log is not None:
        _log_reconnects(connection, amqp_url, log)
    return connection


async def connect_robust(
    amqp_url: str, *, name: str, timeout: float, ssl_context: ssl.SSLContext | None = None
) -> aio_pika.abc.AbstractRobustConnection:
    """Open a robust connection; raise aio-pika's error if the first attempt fails."""
    # The caller reports a failed first attempt, so aiormq's own error line is silenced.
    aiormq_log = logging.getLogger("aiormq.connection")
    level = aiormq_log.level
    aiormq_log.setLevel(logging.CRITICAL)
    options: dict[str, Any] = {}
    if "reconnect_interval" not in parse_qs(urlsplit(amqp_url).query):
        options["reconnect_interval"] = RECONNECT_INTERVAL
    try:
        return await aio_pika.connect_robust(
            amqp_url,
            timeout=timeout,
            client_properties={"connection_name": name},
            ssl_context=ssl_context,
            **options,
        )
    finally:
        aiormq_log.setLevel(level)


def _log_reconnects(
    connection: aio_pika.abc.AbstractRobustConnection, amqp_url: str, log: Any
) -> None:
    url = redact_url(amqp_url)
    lost_at: list[float] = []

    def on_close(_connection: Any, error: BaseException | None) -> None:
        if error is None or connection.is_closed or isinstance(error, asyncio.CancelledError):
            return  # closed by this process: a lost connection comes with its error
        lost_at[:] = [time.monotonic()]
        reason = redact_url(describe(error))
        log.warning("amqp_connection_lost", url=url, error=reason)

    def on_reconnect(_connection: Any) -> None:
        seconds = round(time.monotonic() - lost_at[0], 2) if lost_at else None
        log.info("amqp_reconnected", url=url, seconds_disconnected=seconds)

    connection.close_callbacks.add(on_close)
    connection.reconnect_callbacks.add(on_reconnect)


async def publish_confirmed(
    channel: aio_pika.abc.AbstractChannel,
    exchange: aio_pika.abc.AbstractExchange,
    message: aio_pika.abc.AbstractMessage,
    routing_key: str,
    *,
    deadline: float,
    on_returned: Callable[[], Awaitable[bool]] | None = None,
    on_retry: Callable[[BaseException, int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Publish a mandatory message until RabbitMQ confirms it; return the number of attempts.

    Every failure is retried until ``deadline`` (a ``time.monotonic()`` instant): a lost
    connection or channel (after waiting for the robust channel to be restored), a missing
    confirm, and a nack. A basic.return (no queue took the message) is retried only if
    ``on_returned`` returns True, typically after declaring the queue again. ``on_retry`` is
    called with the error and the attempt number before each retry. Once ``stop`` is set,
    a failed attempt is not retried, so that a process can shut down during an outage.

    A confirm lost with its connection makes the message published twice, so the receiver
    must recognise duplicates.

    Raises:
        aiormq.exceptions.PublishError: RabbitMQ returned the message and ``on_returned``
            did not ask for a retry.
        Any error of ``CONNECTION_ERRORS``: the last failure, once ``deadline`` has passed.
    """
    attempt = 0
    delay = RETRY_DELAY_FIRST
    while True:
        attempt += 1
        # The first attempt gets a full confirm timeout even when the deadline is near.
        timeout = CONFIRM_TIMEOUT
        if attempt > 1:
            timeout = min(CONFIRM_TIMEOUT, max(MIN_CONFIRM_TIMEOUT, deadline - time.monotonic()))
        try:
            await exchange.publish(message, routing_key, mandatory=True, timeout=timeout)
            return attempt
        except aiormq.exceptions.PublishError as error:
            if on_returned is None or not await on_returned():
                raise
            failure: BaseException = error
        except CONNECTION_ERRORS as error:
            failure = error
        if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            raise failure
        if on_retry is not None:
            on_retry(failure, attempt)
        if not await _pause_before_retry(channel, delay, deadline, stop):
            raise failure
        delay = min(delay * 2, RETRY_DELAY_MAX)


async def _pause_before_retry(
    channel: aio_pika.abc.AbstractChannel,
    delay: float,
    deadline: float,
    stop: asyncio.Event | None,
) -> bool:
    """Sleep ``delay`` seconds, then wait for the channel to be open. Return False if
    ``deadline`` passes or ``stop`` is set first."""
    pause = asyncio.ensure_future(_sleep_then_ready(channel, delay, deadline))
    stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
    waited: set[asyncio.Future[Any]] = {pause} if stopped is None else {pause, stopped}
    try:
        await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in waited:
            future.cancel()
    return pause.done() and not pause.cancelled() and bool(pause.result())


async def _sleep_then_ready(
    channel: aio_pika.abc.AbstractChannel, delay: float, deadline: float
) -> bool:
    await asyncio.sleep(max(0.0, min(delay, deadline - time.monotonic())))
    return await wait_until_ready(channel, deadline)


async def wait_until_ready(channel: aio_pika.abc.AbstractChannel, deadline: float) -> bool:
    """Wait until a robust channel is open again, at most until ``deadline``, and return
    whether it is."""
    ready = getattr(channel, "ready", None)
    if ready is None:
        return not channel.is_closed
    try:
        await asyncio.wait_for(ready(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        return False
    return True


async def cancel_consumers(
    consumers: list[tuple[aio_pika.abc.AbstractQueue, str]], timeout: float = 2.0
) -> None:
    """Cancel consumers, waiting at most ``timeout`` seconds, and ignore connection errors.

    While the connection is down, a robust queue would wait for it to come back. A cancel
    that times out still keeps aio-pika from restoring the consumer on reconnect.
    """

    async def cancel(queue: aio_pika.abc.AbstractQueue, tag: str) -> None:
        with contextlib.suppress(*CONNECTION_ERRORS):
            await asyncio.wait_for(queue.cancel(tag), timeout)

    await asyncio.gather(*(cancel(queue, tag) for queue, tag in consumers))


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
