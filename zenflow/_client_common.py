"""Logic shared by the blocking and the asyncio client: building requests, reading replies."""

from __future__ import annotations

import getpass
import socket
from typing import Any

from zenflow import protocol, serializer
from zenflow.errors import DefinitionError, RequestRejected, RunFailed, RunNotFound, RunTimeout
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
