"""The blocking client, built on pika, for web applications, scripts and tests.

A :class:`Client` owns one AMQP connection and is not thread-safe; use one per thread, or
:func:`default_client`, which keeps one per thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pika
import pika.exceptions

from zenflow import _tls, protocol, serializer
from zenflow._client_common import (
    DEFAULT_REPLY_TIMEOUT,
    FINISHED_STATUSES,
    PENDING,
    RETRY_DELAY_FIRST,
    RETRY_DELAY_MAX,
    START_GRACE,
    WorkflowRef,
    build_control,
    build_event,
    build_start,
    delivery_failed,
    delivery_timeout_setting,
    login_rejected,
    lookup_request,
    never_created,
    read_reply,
    reply_lost,
    run_outcome,
    start_timeout,
    tls_failure,
    wait_timed_out,
)
from zenflow.config import Settings, redact_url
from zenflow.errors import RunNotFound, RunTimeout

T = TypeVar("T")

_CONNECTION_ERRORS = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.StreamLostError,
    ConnectionError,
    OSError,
)
# Connection errors that another attempt cannot fix.
_LOGIN_ERRORS = (
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
    pika.exceptions.AuthenticationError,
)


class Client:
    """Start runs and read their state over RabbitMQ, blocking the calling thread.

    Parameters:
        amqp_url: the broker URL; defaults to ``ZENFLOW_AMQP_URL``, then
            ``amqp://guest:guest@localhost:5672/``.
        namespace: the prefix of exchange and queue names; defaults to ``ZENFLOW_NAMESPACE``,
            then ``zenflow``.
        connect_timeout: seconds that one connection attempt waits for the broker.
        delivery_timeout: maximum seconds that a request spends reaching RabbitMQ. While the
            broker is unreachable or the connection breaks, the client reconnects and
            publishes again until RabbitMQ confirms the request, and raises
            ``TransportError`` after this time. Defaults to ``ZENFLOW_DELIVERY_TIMEOUT``,
            then 15; 0 makes one attempt.
    """

    def __init__(
        self,
        amqp_url: str | None = None,
        *,
        namespace: str | None = None,
        connect_timeout: float = 10.0,
        delivery_timeout: float | None = None,
    ) -> None:
        self.settings = Settings.load(amqp_url=amqp_url, namespace=namespace)
        self.topology = protocol.Topology(self.settings.namespace)
        self._connect_timeout = connect_timeout
        self._delivery_timeout = delivery_timeout_setting(delivery_timeout)
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._reply_queue: str | None = None
        self._replies: dict[str, bytes] = {}
        self._finished: dict[str, bytes] = {}

    # Connection handling.

    def _connect(self, timeout: float) -> Any:
        """Return the open channel, or make one connection attempt of ``timeout`` seconds."""
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self.close()
        address = _tls.parse(self.settings.amqp_url)
        parameters = pika.URLParameters(address.url)
        if address.tls is not None:
            parameters.ssl_options = pika.SSLOptions(address.tls.context())
        parameters.socket_timeout = timeout
        parameters.blocked_connection_timeout = self._connect_timeout
        try:
            self._connection = pika.BlockingConnection(parameters)
            channel = self._connection.channel()
            channel.confirm_delivery()
            _declare_entry(channel, self.topology)
            result = channel.queue_declare("", exclusive=True, auto_delete=True)
            self._reply_queue = result.method.queue
            channel.basic_consume(self._reply_queue, self._on_message, auto_ack=True)
        except _CONNECTION_ERRORS:
            self.close()
            raise
        self._channel = channel
        return channel

    def _retrying(self, operation: Callable[[Any], T], *, publishing: bool = False) -> T:
        """Run ``operation(channel)`` until it succeeds, reconnecting after a lost
        connection or a publish that RabbitMQ did not confirm. Pass ``publishing=True`` when
        the operation publishes a request, so that the error states that it may have arrived.

        Raises:
            TransportError: ``delivery_timeout`` seconds passed without success.
        """
        deadline = time.monotonic() + self._delivery_timeout
        delay = RETRY_DELAY_FIRST
        # The first connection attempt gets the full connect_timeout, later ones what is
        # left of the delivery timeout.
        connect_timeout = self._connect_timeout
        first = True
        while True:
            connected = False
            try:
                channel = self._connect(connect_timeout)
                connected = True
                return operation(channel)
            except _LOGIN_ERRORS as error:
                self.close()
                raise login_rejected(self.settings.amqp_url, _describe(error)) from None
            except _CONNECTION_ERRORS as error:
                self.close()
                failure = tls_failure(self.settings.amqp_url, error, _describe(error))
                if first and not connected and failure is not None:
                    raise failure from None
                first = False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise delivery_failed(
                        self.settings.amqp_url,
                        self._delivery_timeout,
                        _describe(error),
                        connected=connected,
                        publishing=publishing,
                    ) from None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, RETRY_DELAY_MAX)
            connect_timeout = max(0.1, min(self._connect_timeout, deadline - time.monotonic()))

    def close(self) -> None:
        """Close the connection; the next call opens a new one."""
        connection, self._connection, self._channel = self._connection, None, None
        self._reply_queue = None
        if connection is not None and connection.is_open:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _on_message(self, _channel: Any, _method: Any, properties: Any, body: bytes) -> None:
        if properties.type == "run_finished":
            run = serializer.decode(body)
            self._finished[str(run.get("run_id"))] = body
        elif properties.correlation_id:
            self._replies[properties.correlation_id] = body

    # Requests.

    def start(
        self,
        workflow: WorkflowRef,
        *args: Any,
        business_id: str | None = None,
        if_running: str = "reject",
        reply_timeout: float | None = None,
        **kwargs: Any,
    ) -> str:
        """Start a run of ``workflow`` and return its run id once the broker confirmed it.

        ``workflow`` is a name (no import of the workflow's code needed), a Workflow
        subclass or a function decorated with ``@workflow``. ``business_id``,
        ``if_running`` and ``reply_timeout`` are reserved and not passed to the workflow.

        By default the request waits in RabbitMQ until an engine takes it, and problems
        that only the engine can see (unknown workflow name, invalid arguments) fail the
        run's start without telling the caller. With ``reply_timeout`` (seconds), the call
        also waits for the engine's acceptance and raises ``RequestRejected`` for them.

        A business id belongs to at most one active (running or paused) run. When the
        caller gives one, the call waits for the engine's reply (30 seconds unless
        ``reply_timeout`` says otherwise). If an active run already has it,
        ``if_running="reject"`` (the default) raises ``RequestRejected`` with the code
        ``business_id_in_use`` naming that run, and ``if_running="return_existing"``
        returns that run's id instead of starting a new run.

        Raises:
            TypeError: the arguments do not fit a workflow given as class or function.
            SerializationError: an argument cannot be encoded; the message names it.
            TransportError: RabbitMQ did not confirm the request within ``delivery_timeout``
                seconds (unreachable, connection lost, message returned or nacked).
            RequestRejected: (with ``reply_timeout``) the engine rejected the request.
            RunTimeout: (with ``reply_timeout``) no engine replied in time; the request
                stays queued and the run starts when an engine takes it.
        """
        request, body = build_start(workflow, args, kwargs, business_id, if_running)
        assert request.run_id is not None
        extra = {"delivery_mode": pika.DeliveryMode.Persistent, "message_id": request.run_id}
        timeout = start_timeout(request, reply_timeout)
        if timeout is None:
            self._publish_request(body, extra)
            return request.run_id
        try:
            reply = self._call(body, timeout, extra)
        except RunTimeout as error:
            raise RunTimeout(str(error), run_id=request.run_id) from None
        return str(reply.get("run_id") or request.run_id)

    def send_event(
        self, run: str, name: str, data: Any = None, *, timeout: float = DEFAULT_REPLY_TIMEOUT
    ) -> dict[str, Any]:
        """Send the event ``name`` with ``data`` to a run, by run id or business id.

        The run's first wait for ``name`` receives it; if none waits, the event is kept in
        order for the next wait for that name. Returns the engine's reply: ``run_id`` and
        ``delivered`` (whether a wait took the event at once).

        Raises:
            RunNotFound: no run has that id or business id.
            RequestRejected: the run has finished (code ``run_finished``).
            SerializationError: ``data`` cannot be encoded.
        """
        return self._call(build_event(run, name, data), timeout, _persistent())

    def kill(
        self,
        run: str,
        *,
        reason: str | None = None,
        by: str | None = None,
        timeout: float = DEFAULT_REPLY_TIMEOUT,
    ) -> dict[str, Any]:
        """Kill a run: it dispatches nothing more, its timers are cancelled, and its active
        children are killed too. ``by`` (default user@host) and ``reason`` are recorded.

        Raises:
            RunNotFound: no run has that id or business id.
            RequestRejected: the run has finished (code ``run_finished``).
        """
        body = build_control("kill", run, by, reason)
        return self._call(body, timeout, _persistent(), resend=False)

    def pause(
        self, run: str, *, by: str | None = None, timeout: float = DEFAULT_REPLY_TIMEOUT
    ) -> dict[str, Any]:
        """Pause a run: running tasks finish and are recorded, the workflow makes no new
        decision until :meth:`resume`.

        Raises:
            RunNotFound: no run has that id or business id.
            RequestRejected: the run has finished or is already paused.
        """
        body = build_control("pause", run, by, None)
        return self._call(body, timeout, _persistent(), resend=False)

    def resume(
        self, run: str, *, by: str | None = None, timeout: float = DEFAULT_REPLY_TIMEOUT
    ) -> dict[str, Any]:
        """Resume a paused run, with the results and timers that arrived meanwhile.

        Raises:
            RunNotFound: no run has that id or business id.
            RequestRejected: the run has finished or is not paused.
        """
        body = build_control("resume", run, by, None)
        return self._call(body, timeout, _persistent(), resend=False)

    def retry(
        self, run: str, *, by: str | None = None, timeout: float = DEFAULT_REPLY_TIMEOUT
    ) -> dict[str, Any]:
        """Run a failed run again from where it failed; its history stays.

        If a task's failure ended the run, that step gets a new series of attempts under its
        retry policy and the workflow goes on from there. If the workflow's code failed, it
        is replayed with the code the engine runs now. The reply has the run's ``status``,
        and the retried ``step`` and its new ``attempt`` when a task is retried.

        Raises:
            RunNotFound: no run has that id or business id.
            RequestRejected: the run has not failed (code ``invalid_state``), or another
                active run has its business id (code ``business_id_taken``).
        """
        return self._call(
            build_control("retry", run, by, None), timeout, _persistent(), resend=False
        )

    def get_run(
        self, run_id: str | None = None, *, business_id: str | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Return the state of a run by run id or business id, as the engine stores it.

        Raises:
            RunNotFound: no run has that id.
            RunTimeout: the engine did not reply within ``timeout`` seconds.
        """
        request = protocol.GetRunRequest(run_id=run_id, business_id=business_id)
        reply = self._call(serializer.encode(request.to_body()), timeout)
        run: dict[str, Any] = reply["run"]
        return run

    def wait(self, run_id: str, timeout: float | None = None) -> Any:
        """Wait until the run finishes and return its result.

        ``run_id`` may also be a business id, which names its active run, or else its most
        recent run. The engine announces finished runs on the runs exchange. The state is
        also polled every few seconds, so a notification lost to a reconnect only delays the
        return.

        Raises:
            RunFailed: the run failed; ``error`` holds the stored error.
            RunTimeout: the run did not finish within ``timeout`` seconds (it goes on).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        run_id = self._run_id_of(run_id, _remaining(deadline, 30.0))
        binding = self.topology.run_finished_binding(run_id)
        poll_interval = 1.0
        first_poll = time.monotonic()

        def bind(channel: Any) -> None:
            channel.queue_bind(self._reply_queue, self.topology.runs_exchange, binding)

        try:
            while True:
                self._retrying(bind)
                run = self._get_started_run(run_id, first_poll, _remaining(deadline, 30.0))
                next_poll = time.monotonic() + poll_interval
                poll_interval = min(poll_interval * 2, 5.0)
                while run["status"] not in FINISHED_STATUSES and time.monotonic() < next_poll:
                    if run_id in self._finished:
                        run = serializer.decode(self._finished.pop(run_id))
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        raise wait_timed_out(run_id, timeout, run["status"])
                    self._process_events(deadline, min(0.5, next_poll - time.monotonic()))
                if run["status"] in FINISHED_STATUSES:
                    return run_outcome(run)
        finally:
            self._finished.pop(run_id, None)
            if self._channel is not None and self._channel.is_open:
                try:
                    self._channel.queue_unbind(
                        self._reply_queue, self.topology.runs_exchange, binding
                    )
                except _CONNECTION_ERRORS:
                    self.close()

    def _run_id_of(self, reference: str, timeout: float) -> str:
        """Return the run id that a run id or business id names.

        An unknown run id is returned as is, because its start may still be on its way.
        """
        try:
            reply = self._call(lookup_request(reference), timeout)
        except RunNotFound:
            if protocol.is_run_id(reference):
                return reference
            raise
        return str(reply["run"]["run_id"])

    def _get_started_run(self, run_id: str, since: float, timeout: float) -> dict[str, Any]:
        """Return the run's state, or a pending state while its start may still be queued.

        The engine handles requests concurrently, so a query sent right after a start can
        overtake it. A missing run therefore counts as not yet started for ``START_GRACE``
        seconds.
        """
        try:
            return self.get_run(run_id, timeout=timeout)
        except RunNotFound:
            if time.monotonic() - since > START_GRACE:
                raise never_created(run_id) from None
            return {"run_id": run_id, "status": PENDING}

    def run(
        self,
        workflow: WorkflowRef,
        *args: Any,
        timeout: float | None = None,
        business_id: str | None = None,
        if_running: str = "reject",
        **kwargs: Any,
    ) -> Any:
        """Start a run, wait for it and return its result (see :meth:`start`, :meth:`wait`)."""
        run_id = self.start(
            workflow, *args, business_id=business_id, if_running=if_running, **kwargs
        )
        return self.wait(run_id, timeout=timeout)

    def _publish_request(self, body: bytes, properties: dict[str, Any]) -> None:
        self._retrying(
            lambda channel: self._basic_publish(channel, body, properties), publishing=True
        )

    def _basic_publish(self, channel: Any, body: bytes, properties: dict[str, Any]) -> None:
        # With confirms on, pika raises UnroutableError for a returned message and NackError
        # for a nack, so a return means that RabbitMQ did not confirm the request.
        channel.basic_publish(
            self.topology.engine_exchange,
            self.topology.requests_routing_key,
            body,
            pika.BasicProperties(content_type=protocol.MSGPACK_CONTENT_TYPE, **properties),
            mandatory=True,
        )

    def _call(
        self,
        body: bytes,
        timeout: float,
        properties: dict[str, Any] | None = None,
        *,
        resend: bool = True,
    ) -> dict[str, Any]:
        """Publish a request with ``reply_to`` and wait up to ``timeout`` seconds, from
        RabbitMQ's confirm on, for the engine's reply.

        The reply queue is deleted with its connection. After a reconnect the request is
        therefore published again with the same message id, which the engine recognises
        for starts and events. With ``resend=False`` (requests that the engine does not
        deduplicate) a lost connection raises TransportError instead.
        """
        correlation_id = uuid.uuid4().hex

        def publish(channel: Any) -> None:
            self._basic_publish(
                channel,
                body,
                {
                    **(properties or {}),
                    "correlation_id": correlation_id,
                    "reply_to": self._reply_queue,
                },
            )

        self._retrying(publish, publishing=True)
        deadline = time.monotonic() + timeout
        while correlation_id not in self._replies:
            if time.monotonic() >= deadline:
                raise RunTimeout(
                    f"the engine did not reply within {timeout} seconds; is `zenflow engine` "
                    f"running with namespace {self.settings.namespace!r}?"
                )
            try:
                assert self._connection is not None
                self._connection.process_data_events(min(0.5, deadline - time.monotonic()))
            except _CONNECTION_ERRORS as error:
                self.close()
                if not resend:
                    raise reply_lost(self.settings.amqp_url, _describe(error)) from None
                self._retrying(publish, publishing=True)
        return read_reply(self._replies.pop(correlation_id))

    def _process_events(self, deadline: float | None, slice_seconds: float) -> None:
        limit = slice_seconds
        if deadline is not None:
            limit = min(slice_seconds, deadline - time.monotonic())

        def process(_channel: Any) -> None:
            assert self._connection is not None
            self._connection.process_data_events(max(0.0, limit))

        self._retrying(process)


def _remaining(deadline: float | None, default: float) -> float:
    if deadline is None:
        return default
    return max(0.1, deadline - time.monotonic())


def _declare_entry(channel: Any, topology: protocol.Topology) -> None:
    """Declare the engine's entry exchange and queue, so that starts wait for an engine."""
    channel.exchange_declare(topology.engine_exchange, "direct", durable=True)
    channel.exchange_declare(topology.runs_exchange, "topic", durable=True)
    channel.queue_declare(topology.requests_queue, durable=True)
    channel.queue_bind(
        topology.requests_queue, topology.engine_exchange, topology.requests_routing_key
    )


def _describe(error: BaseException) -> str:
    # pika's connection errors have an empty str(); their repr names the cause, such as
    # "AMQPConnectorSocketConnectError: ConnectionRefusedError(111, 'Connection refused')".
    text = str(error) or (repr(error.args[0]) if error.args else "")
    return redact_url(f"{type(error).__name__}: {text}" if text else type(error).__name__)


_local = threading.local()


def default_client() -> Client:
    """Return this thread's default client, configured from ``ZENFLOW_*`` variables."""
    client = getattr(_local, "client", None)
    if client is None:
        client = Client()
        _local.client = client
    return client


def _persistent() -> dict[str, Any]:
    return {"delivery_mode": pika.DeliveryMode.Persistent, "message_id": protocol.new_run_id()}
