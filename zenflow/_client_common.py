"""Logic shared by the blocking and the asyncio client: building requests, reading replies."""

from __future__ import annotations

import getpass
import math
import os
import socket
from typing import Any

from zenflow import _tls, protocol, serializer
from zenflow.config import redact_url
from zenflow.errors import (
    ConfigurationError,
    DefinitionError,
    RequestRejected,
    RunFailed,
    RunNotFound,
    RunTimeout,
    TransportError,
)
from zenflow.workflow import Workflow, WorkflowCall, WorkflowFunction

FINISHED_STATUSES = frozenset({"completed", "failed", "killed"})

# Seconds during which wait() treats an unknown run id as a start still in flight: the
# engine handles requests concurrently, so a query can overtake the start sent before it.
START_GRACE = 10.0

WorkflowRef = str | type[Workflow] | WorkflowFunction | WorkflowCall


def build_start(
    workflow: WorkflowRef,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    business_id: str | None,
    if_running: str = "reject",
) -> tuple[protocol.StartRequest, bytes]:
    """Validate what can be validated locally and return the request and its msgpack body.

    A class or decorated function is checked against its signature here; a workflow given
    by name is checked by the engine, which sends an error reply.

    Raises:
        TypeError: the arguments do not fit the workflow's signature.
        SerializationError: an argument cannot be encoded; the message names its path.
    """
    name: str
    if isinstance(workflow, str):
        name = workflow
    elif isinstance(workflow, WorkflowCall):
        name, args, kwargs = workflow.name, workflow.args + args, {**workflow.kwargs, **kwargs}
        business_id = business_id or workflow.business_id
    elif isinstance(workflow, WorkflowFunction):
        workflow(*args, **kwargs)  # checks the signature
        name = workflow.workflow_name
    elif isinstance(workflow, type) and issubclass(workflow, Workflow):
        instance = workflow(*args, **kwargs)
        name = workflow.workflow_name
        business_id = business_id or instance.id()
    else:
        raise DefinitionError(
            f"cannot start {workflow!r}: pass a workflow name, a Workflow subclass or a "
            "function decorated with @workflow"
        )
    if business_id is not None:
        problem = protocol.text_problem(business_id, protocol.MAX_BUSINESS_ID_LENGTH)
        if problem is not None:
            raise DefinitionError(f"invalid business id: it {problem}")
    if if_running not in protocol.IF_RUNNING_POLICIES:
        raise DefinitionError(
            f"invalid if_running {if_running!r}: use one of "
            f"{', '.join(protocol.IF_RUNNING_POLICIES)}"
        )
    request = protocol.StartRequest(
        workflow=name,
        args=tuple(args),
        kwargs=dict(kwargs),
        run_id=protocol.new_run_id(),
        business_id=business_id,
        if_running=if_running,
    )
    body = request.to_body()
    serializer.encode(body["args"], name="args")
    serializer.encode(body["kwargs"], name="kwargs")
    return request, serializer.encode(body)


# Seconds that a client keeps trying to get a request confirmed by RabbitMQ while the broker
# is unreachable or the connection breaks. The value is meant to cover a broker restart or a
# short network fault, and still be short enough for a caller that serves a user.
DEFAULT_DELIVERY_TIMEOUT = 15.0
# Pauses between attempts: doubled from the first up to the maximum, in seconds.
RETRY_DELAY_FIRST = 0.1
RETRY_DELAY_MAX = 1.0


def delivery_timeout_setting(value: float | None) -> float:
    """Return the delivery timeout: ``value``, else ``ZENFLOW_DELIVERY_TIMEOUT``, else the
    default.

    Raises:
        ConfigurationError: the value is negative or not a number.
    """
    source = "delivery_timeout"
    shown: object = value
    if value is None:
        text = os.environ.get("ZENFLOW_DELIVERY_TIMEOUT", "")
        if not text:
            return DEFAULT_DELIVERY_TIMEOUT
        source, shown = "ZENFLOW_DELIVERY_TIMEOUT", text
        try:
            value = float(text)
        except ValueError:
            value = math.nan
    if not value >= 0:
        raise ConfigurationError(
            f"invalid {source} {shown!r}: use 0 or more seconds (0 makes one attempt)"
        )
    return float(value)


def delivery_failed(
    amqp_url: str, timeout: float, cause: str, *, connected: bool, publishing: bool
) -> TransportError:
    """Return the error for an operation on RabbitMQ that kept failing for ``timeout``.

    ``connected`` is True when the last attempt reached the broker, and ``publishing`` when
    the operation was the publish of a request, which may then have arrived.
    """
    url = redact_url(amqp_url)
    advice = "Check that the broker is running, or give the client a longer delivery_timeout"
    if not connected:
        return TransportError(
            f"cannot connect to RabbitMQ at {url} (tried for {timeout:g} seconds, "
            f"delivery_timeout): {redact_url(cause)}. Check that the broker is running and the "
            "URL is right (the given URL, or ZENFLOW_AMQP_URL), or give the client a longer "
            "delivery_timeout"
        )
    if publishing:
        return TransportError(
            f"RabbitMQ at {url} did not confirm the request within {timeout:g} seconds "
            f"(delivery_timeout): {redact_url(cause)}. The request may or may not have reached "
            f"the broker. {advice}"
        )
    return TransportError(
        f"the connection to RabbitMQ at {url} kept failing for {timeout:g} seconds "
        f"(delivery_timeout): {redact_url(cause)}. {advice}"
    )


def tls_failure(amqp_url: str, error: BaseException, cause: str) -> TransportError | None:
    """Return the error for a first connection that failed over TLS, or None.

    A certificate that fails verification, or a broker that closes the connection after the
    TLS handshake, is a configuration problem: retrying until ``delivery_timeout`` would
    only delay the advice.
    """
    hint = _tls.failure_hint(error, _tls.parse(amqp_url).tls is not None)
    if not hint:
        return None
    return TransportError(
        f"cannot connect to RabbitMQ at {redact_url(amqp_url)}: {redact_url(cause)}{hint}. "
        "Check that the broker is running and the URL is right (the given URL, or "
        "ZENFLOW_AMQP_URL)"
    )


def login_rejected(amqp_url: str, cause: str) -> TransportError:
    """Return the error for a broker that rejected the login or the virtual host."""
    return TransportError(
        f"RabbitMQ at {redact_url(amqp_url)} rejected the connection: {redact_url(cause)}. "
        "Check the user, password and virtual host in the URL (the given URL, or "
        "ZENFLOW_AMQP_URL)"
    )


def reply_lost(amqp_url: str, cause: str) -> TransportError:
    """Return the error for a confirmed request whose reply was lost with the connection."""
    return TransportError(
        f"the connection to RabbitMQ at {redact_url(amqp_url)} was lost after the broker "
        f"confirmed the request, before the engine's reply arrived ({redact_url(cause)}). The "
        "engine applies the request when it takes it: read the run's state with get_run "
        "before sending the request again"
    )


# Seconds a request waits for the engine's reply when the caller needs the result: control
# requests, events, and starts with a business id or an if_running policy, whose outcome
# only the engine can decide.
DEFAULT_REPLY_TIMEOUT = 30.0


def start_timeout(request: protocol.StartRequest, reply_timeout: float | None) -> float | None:
    """Return how long a start waits for the engine's reply, or None to only publish."""
    needs_answer = request.business_id is not None or request.if_running != "reject"
    if reply_timeout is None and needs_answer:
        return DEFAULT_REPLY_TIMEOUT
    return reply_timeout


def lookup_request(reference: str) -> bytes:
    """Return the body of a get_run request for a run id or a business id.

    The engine looks a run id up as a business id too when no run has that id.
    """
    if protocol.is_run_id(reference):
        request = protocol.GetRunRequest(run_id=reference)
    else:
        request = protocol.GetRunRequest(business_id=reference)
    return serializer.encode(request.to_body())


def run_target(run: str) -> protocol.RunTarget:
    problem = protocol.text_problem(run, protocol.MAX_BUSINESS_ID_LENGTH)
    if problem is not None:
        raise DefinitionError(f"invalid run id or business id: it {problem}")
    return protocol.RunTarget(run=run)


def build_event(run: str, name: str, data: Any) -> bytes:
    """Validate an event and return its request body.

    Raises:
        DefinitionError: the run reference or the event name is invalid.
        SerializationError: ``data`` cannot be encoded; the message names where.
    """
    from zenflow.wait import check_event_name

    check_event_name(name)
    serializer.encode(data, name="data")
    return serializer.encode(protocol.EventRequest(run_target(run), name, data).to_body())


def build_control(action: str, run: str, by: str | None, reason: str | None) -> bytes:
    """Return the body of a kill, pause or resume request; ``by`` defaults to user@host."""
    if by is None:
        by = f"{getpass.getuser()}@{socket.gethostname()}"
    request = protocol.ControlRequest(action, run_target(run), by=by[:255], reason=reason)
    if reason is not None and len(reason) > protocol.MAX_REASON_LENGTH:
        raise DefinitionError(f"reason is longer than {protocol.MAX_REASON_LENGTH} characters")
    return serializer.encode(request.to_body())


PENDING = "pending"  # the status wait() gives a run that the engine has not created yet

REJECTION_HINT = (
    "the engine may have rejected the start request (unknown workflow, invalid "
    "arguments, or a business id that an active run has): start with reply_timeout=... "
    "to get its reason, and check that "
    "`zenflow engine` runs with the same namespace"
)


def wait_timed_out(run_id: str, timeout: float | None, status: str) -> RunTimeout:
    """Return the error for a wait that timed out, saying whether the run exists at all."""
    if status == PENDING:
        return RunTimeout(
            f"run {run_id} was not created within {timeout:g} seconds; {REJECTION_HINT}",
            run_id=run_id,
        )
    return RunTimeout(
        f"run {run_id} did not finish within {timeout:g} seconds; it goes on", run_id=run_id
    )


def never_created(run_id: str) -> RunNotFound:
    """Return the error for a run that still does not exist ``START_GRACE`` after a wait began."""
    return RunNotFound(
        f"no run has the id {run_id!r} after {START_GRACE:g} seconds; if it was just started, "
        f"{REJECTION_HINT}"
    )


def read_reply(body: bytes) -> dict[str, Any]:
    """Decode an engine reply and raise RequestRejected or RunNotFound when it is an error."""
    reply = serializer.decode(body)
    if not isinstance(reply, dict):
        raise RequestRejected("invalid_reply", f"the engine sent an invalid reply: {reply!r}")
    if not reply.get("ok"):
        error = reply.get("error") or {}
        code = str(error.get("code", "error"))
        message = str(error.get("message", "the engine rejected the request"))
        if code == "run_not_found":
            raise RunNotFound(message)
        raise RequestRejected(code, message)
    return reply


def run_outcome(run: dict[str, Any]) -> Any:
    """Return a finished run's result, or raise RunFailed with its stored error."""
    if run["status"] in ("failed", "killed"):
        raise RunFailed(run["run_id"], run.get("error") or {})
    return run.get("result")
