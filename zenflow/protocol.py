"""The AMQP topology and message schema (version 1) shared by clients, engine and agents.

docs/protocol.md documents the same schema for programs in other languages. Every body is
a map with ``version`` and ``type``. The engine's public entry accepts msgpack
(``application/x-msgpack``, the default) and JSON (``application/json``); task messages and
task results between the engine and agents are msgpack only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import json
import math
import re
import reprlib
import uuid
from collections.abc import Mapping
from typing import Any

from zenflow import serializer
from zenflow.errors import SerializationError, ZenflowError

VERSION = 1
JSON_CONTENT_TYPE = "application/json"
MSGPACK_CONTENT_TYPE = serializer.CONTENT_TYPE

# Bodies larger than this are rejected by the engine's public entry unless the engine is
# configured otherwise; it bounds the memory one message can claim.
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024

# Task arguments and results bigger than this fail the step: RabbitMQ closes the channel on
# a message over its own max_message_size (128 MiB by default), and every step's payload is
# stored in history.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Business ids are indexed, so they have a bounded length.
MAX_BUSINESS_ID_LENGTH = 255

REQUEST_START = "start"
REQUEST_GET_RUN = "get_run"
REQUEST_EVENT = "event"
CONTROL_ACTIONS = ("kill", "pause", "resume", "retry")
REQUEST_TYPES = (REQUEST_START, REQUEST_GET_RUN, REQUEST_EVENT, *CONTROL_ACTIONS)

# Policies of a start whose business id an active run already has: reject the request (the
# default), or return the existing run's id.
IF_RUNNING_POLICIES = ("reject", "return_existing")
MAX_EVENT_NAME_LENGTH = 200
MAX_REASON_LENGTH = 1000

# Matched with fullmatch, because "$" also matches before a trailing newline.
_RUN_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def is_run_id(value: str) -> bool:
    """Return whether ``value`` has the form of a run id (it may still be a business id)."""
    return bool(_RUN_ID.fullmatch(value))


@dataclasses.dataclass(frozen=True)
class Topology:
    """Names of the exchanges and queues for one namespace."""

    namespace: str

    @property
    def engine_exchange(self) -> str:
        """Direct exchange of the engine's public entry."""
        return f"{self.namespace}.engine"

    @property
    def requests_queue(self) -> str:
        return f"{self.namespace}.engine.requests"

    @property
    def results_queue(self) -> str:
        return f"{self.namespace}.engine.results"

    @property
    def runs_exchange(self) -> str:
        """Topic exchange on which the engine announces finished runs."""
        return f"{self.namespace}.runs"

    requests_routing_key = "requests"
    results_routing_key = "results"

    def task_queue(self, queue: str) -> str:
        """AMQP queue name of the task queue ``queue``."""
        return f"{self.namespace}.tasks.{queue}"

    @property
    def dead_letter_queue(self) -> str:
        """Queue of task messages set aside because the agents that took them died too often."""
        return f"{self.namespace}.dead"

    @staticmethod
    def run_finished_key(status: str, run_id: str) -> str:
        return f"run.{status}.{run_id}"

    @staticmethod
    def run_finished_binding(run_id: str) -> str:
        return f"run.*.{run_id}"


class InvalidMessage(ZenflowError):
    """A message that does not follow the schema, with the reason in ``code`` and ``field``."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field

    def to_error(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": str(self)}
        if self.field is not None:
            error["field"] = self.field
        return error


@dataclasses.dataclass(frozen=True)
class StartRequest:
    workflow: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    run_id: str | None = None
    business_id: str | None = None
    if_running: str = "reject"
    # Set by the engine when a workflow starts a child run.
    parent_run_id: str | None = None
    parent_step: int | None = None

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "version": VERSION,
            "type": REQUEST_START,
            "workflow": self.workflow,
            "args": list(self.args),
            "kwargs": self.kwargs,
        }
        if self.run_id is not None:
            body["run_id"] = self.run_id
        if self.business_id is not None:
            body["business_id"] = self.business_id
        if self.if_running != "reject":
            body["if_running"] = self.if_running
        if self.parent_run_id is not None:
            body["parent_run_id"] = self.parent_run_id
            body["parent_step"] = self.parent_step
        return body


@dataclasses.dataclass(frozen=True)
class RunTarget:
    """The run a request is about: by ``run_id``, by ``business_id``, or by ``run`` (either).

    A business id names its active run, or else its most recent run.
    """

    run_id: str | None = None
    business_id: str | None = None
    run: str | None = None

    @property
    def text(self) -> str:
        return next(value for value in (self.run_id, self.business_id, self.run) if value)

    def to_fields(self) -> dict[str, str]:
        fields = {"run_id": self.run_id, "business_id": self.business_id, "run": self.run}
        return {key: value for key, value in fields.items() if value is not None}


@dataclasses.dataclass(frozen=True)
class EventRequest:
    """Send the event ``name`` with ``data`` to a run."""

    target: RunTarget
    name: str
    data: Any = None

    def to_body(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "type": REQUEST_EVENT,
            **self.target.to_fields(),
            "name": self.name,
            "data": self.data,
        }


@dataclasses.dataclass(frozen=True)
class ControlRequest:
    """Kill, pause or resume a run; ``by`` and ``reason`` are recorded in its history."""

    action: str
    target: RunTarget
    by: str | None = None
    reason: str | None = None

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"version": VERSION, "type": self.action, **self.target.to_fields()}
        if self.by is not None:
            body["by"] = self.by
        if self.reason is not None:
            body["reason"] = self.reason
        return body


@dataclasses.dataclass(frozen=True)
class GetRunRequest:
    run_id: str | None = None
    business_id: str | None = None

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"version": VERSION, "type": REQUEST_GET_RUN}
        if self.run_id is not None:
            body["run_id"] = self.run_id
        if self.business_id is not None:
            body["business_id"] = self.business_id
        return body


Request = StartRequest | GetRunRequest | EventRequest | ControlRequest


def decode_body(body: bytes, content_type: str | None, max_bytes: int | None = None) -> Any:
    """Decode a body as JSON or msgpack according to ``content_type``.

    Raises:
        InvalidMessage: the body is too large, or does not decode.
    """
    if max_bytes is not None and len(body) > max_bytes:
        raise InvalidMessage(
            "body_too_large",
            f"message body of {len(body)} bytes exceeds the limit of {max_bytes} bytes",
        )
    media_type = _media_type(content_type)
    if media_type == JSON_CONTENT_TYPE:
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise InvalidMessage("invalid_body", f"body is not valid JSON: {error}") from None
        except RecursionError:
            raise InvalidMessage(
                "invalid_body", "body is not valid JSON: arrays or objects nested too deeply"
            ) from None
    if media_type not in ("", MSGPACK_CONTENT_TYPE):
        raise InvalidMessage(
            "invalid_body",
            f"unsupported content type {content_type!r}: use {MSGPACK_CONTENT_TYPE} or "
            f"{JSON_CONTENT_TYPE}",
        )
    try:
        return serializer.decode(body)
    except SerializationError as error:
        raise InvalidMessage("invalid_body", str(error)) from None


def is_json(content_type: str | None) -> bool:
    return _media_type(content_type) == JSON_CONTENT_TYPE


def _media_type(content_type: str | None) -> str:
    """Return the media type of a Content-Type value in lower case, without parameters.

    The type and subtype are case-insensitive (RFC 2616, section 3.7).
    """
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def parse_request(body: Any) -> Request:
    """Validate a decoded body of the engine's public entry and return the request.

    Raises:
        InvalidMessage: a field is missing or invalid; the error names it.
    """
    if not isinstance(body, Mapping):
        raise InvalidMessage("invalid_body", f"body must be a map, not {type(body).__name__}", None)
    _check_version(body)
    kind = body.get("type")
    if kind == REQUEST_START:
        return _parse_start(body)
    if kind == REQUEST_GET_RUN:
        run_id, business_id = _parse_run_reference(body)
        return GetRunRequest(run_id=run_id, business_id=business_id)
    if kind == REQUEST_EVENT:
        name = body.get("name")
        if name is None:
            raise InvalidMessage("missing_field", "missing field 'name'", "name")
        problem = event_name_problem(name)
        if problem is not None:
            raise InvalidMessage("invalid_field", f"field 'name' {problem}", "name")
        return EventRequest(_parse_target(body), name, body.get("data"))
    if kind in CONTROL_ACTIONS:
        return ControlRequest(
            action=str(kind),
            target=_parse_target(body),
            by=_optional_string(body, "by", MAX_BUSINESS_ID_LENGTH),
            reason=_optional_reason(body),
        )
    if kind is None:
        raise InvalidMessage("missing_field", "missing field 'type'", "type")
    raise InvalidMessage(
        "invalid_field",
        f"unknown request type {_short(kind)}: expected one of {', '.join(REQUEST_TYPES)}",
        "type",
    )


def _check_version(body: Mapping[str, Any]) -> None:
    version = body.get("version")
    if version is None:
        raise InvalidMessage("missing_field", "missing field 'version' (use 1)", "version")
    # type() rather than isinstance() or ==, so that True, 1.0 and Decimal(1) are rejected.
    if type(version) is not int or version != VERSION:
        raise InvalidMessage(
            "unsupported_version",
            f"unsupported schema version {_short(version)}: this engine speaks version {VERSION}",
            "version",
        )


def _parse_start(body: Mapping[str, Any]) -> StartRequest:
    workflow = body.get("workflow")
    if workflow is None:
        raise InvalidMessage("missing_field", "missing field 'workflow'", "workflow")
    if not isinstance(workflow, str) or not workflow:
        raise InvalidMessage(
            "invalid_field",
            f"field 'workflow' must be a non-empty string, not {_short(workflow)}",
            "workflow",
        )
    args = body.get("args", [])
    if not isinstance(args, list | tuple):
        raise InvalidMessage(
            "invalid_field", f"field 'args' must be an array, not {type(args).__name__}", "args"
        )
    kwargs = body.get("kwargs", {})
    if not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs):
        raise InvalidMessage(
            "invalid_field", "field 'kwargs' must be a map with string keys", "kwargs"
        )
    run_id = _optional_id(body, "run_id")
    business_id = _optional_string(body, "business_id", MAX_BUSINESS_ID_LENGTH)
    if_running = body.get("if_running", "reject")
    if if_running not in IF_RUNNING_POLICIES:
        raise InvalidMessage(
            "invalid_field",
            f"field 'if_running' must be one of {', '.join(IF_RUNNING_POLICIES)}, not "
            f"{_short(if_running)}",
            "if_running",
        )
    parent_run_id = _optional_id(body, "parent_run_id")
    parent_step = None
    if parent_run_id is not None:
        parent_step = _require_counter(body, "parent_step")
    return StartRequest(
        workflow,
        tuple(args),
        dict(kwargs),
        run_id,
        business_id,
        if_running,
        parent_run_id,
        parent_step,
    )


def _parse_target(body: Mapping[str, Any]) -> RunTarget:
    run_id = _optional_id(body, "run_id")
    business_id = _optional_string(body, "business_id", MAX_BUSINESS_ID_LENGTH)
    run = _optional_string(body, "run", MAX_BUSINESS_ID_LENGTH)
    if run_id is None and business_id is None and run is None:
        raise InvalidMessage(
            "missing_field", "missing field 'run_id', 'business_id' or 'run'", "run_id"
        )
    return RunTarget(run_id, business_id, run)


def _optional_reason(body: Mapping[str, Any]) -> str | None:
    value = body.get("reason")
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_REASON_LENGTH:
        raise InvalidMessage(
            "invalid_field",
            f"field 'reason' must be a string of at most {MAX_REASON_LENGTH} characters",
            "reason",
        )
    if _SURROGATES.search(value):
        raise InvalidMessage("invalid_field", f"field 'reason' {_SURROGATES_PROBLEM}", "reason")
    return value


def _parse_run_reference(body: Mapping[str, Any]) -> tuple[str | None, str | None]:
    run_id = _optional_id(body, "run_id")
    business_id = _optional_string(body, "business_id", MAX_BUSINESS_ID_LENGTH)
    if run_id is None and business_id is None:
        raise InvalidMessage("missing_field", "missing field 'run_id' or 'business_id'", "run_id")
    return run_id, business_id


def _optional_id(body: Mapping[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not _RUN_ID.fullmatch(value):
        raise InvalidMessage(
            "invalid_field",
            f"field {field!r} must be 1 to 64 letters, digits, '_' or '-', not {_short(value)}",
            field,
        )
    return value


def _optional_string(body: Mapping[str, Any], field: str, max_length: int) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    problem = text_problem(value, max_length)
    if problem is not None:
        raise InvalidMessage("invalid_field", f"field {field!r} {problem}", field)
    return value


_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
# A JSON body can carry lone surrogates ("\ud800"), which no database or UTF-8 text takes.
_SURROGATES = re.compile("[\ud800-\udfff]")
_SURROGATES_PROBLEM = "must not contain lone surrogates (U+D800 to U+DFFF)"


def event_name_problem(name: Any) -> str | None:
    """Say why ``name`` is not a valid event name, or return None if it is.

    Names are printable text without ',', because a run stores the names it waits for as
    one comma-separated value.
    """
    if not isinstance(name, str) or not name:
        return f"must be a non-empty string, not {_short(name)}"
    if len(name) > MAX_EVENT_NAME_LENGTH:
        return f"is {len(name)} characters long; the limit is {MAX_EVENT_NAME_LENGTH}"
    if not name.isprintable() or "," in name:
        return f"must contain only printable characters other than ',': {_short(name)}"
    return None


def text_problem(value: Any, max_length: int) -> str | None:
    """Say why ``value`` is not a usable id text, or return None if it is.

    Ids are stored in indexed text columns: PostgreSQL rejects NUL characters in text, and
    control characters would garble logs and the CLI's output.
    """
    if not isinstance(value, str) or not value:
        return f"must be a non-empty string, not {_short(value)}"
    if len(value) > max_length:
        return f"is {len(value)} characters long; the limit is {max_length}"
    if _CONTROL_CHARACTERS.search(value):
        return f"must not contain control characters: {_short(value)}"
    if _SURROGATES.search(value):
        return f"{_SURROGATES_PROBLEM}: {_short(value)}"
    return None


# Bounded repr for error messages. A decoded body can contain lists nested a thousand levels
# deep or strings megabytes long, and a plain repr() of it would raise RecursionError or be slow.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 3
_SHORT_REPR.maxstring = 60
_SHORT_REPR.maxlong = 60
_SHORT_REPR.maxother = 60


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = _SHORT_REPR.repr(value)
    except Exception:  # for example ValueError from repr() of an int with over 4300 digits
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: Any, limit: int = 200) -> str:
    """Return a shortened repr of a decoded value, safe on any value."""
    return _short(value, limit)


def new_run_id() -> str:
    return str(uuid.uuid4())


def run_id_from_message_id(message_id: str) -> str:
    """Derive a run id from an AMQP message id, so that a redelivered start is idempotent."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"zenflow:start:{message_id}"))


# Task messages and results, between the engine and agents.


@dataclasses.dataclass(frozen=True)
class TaskMessage:
    run_id: str
    workflow: str
    step: int
    attempt: int
    task: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    # The step's retry policy (Retry.to_wire), and the attempt that began the current
    # series of attempts: 1, or the first attempt after a manual retry.
    retry: dict[str, Any] | None = None
    first_attempt: int = 1
    timeout: float | None = None  # seconds an attempt may run
    heartbeat: float | None = None  # seconds allowed between two heartbeat() calls

    def to_body(self) -> dict[str, Any]:
        body = {
            "version": VERSION,
            "type": "task",
            "run_id": self.run_id,
            "workflow": self.workflow,
            "step": self.step,
            "attempt": self.attempt,
            "task": self.task,
            "args": list(self.args),
            "kwargs": self.kwargs,
        }
        if self.retry is not None:
            body["retry"] = self.retry
            body["first_attempt"] = self.first_attempt
        if self.timeout is not None:
            body["timeout"] = self.timeout
        if self.heartbeat is not None:
            body["heartbeat"] = self.heartbeat
        return body

    @property
    def attempt_in_series(self) -> int:
        """The attempt's number since the first attempt or the last manual retry, from 1."""
        return max(1, self.attempt - self.first_attempt + 1)

    @property
    def correlation_id(self) -> str:
        return f"{self.run_id}:{self.step}:{self.attempt}"

    @classmethod
    def from_body(cls, body: Any) -> TaskMessage:
        fields = _require_map(body, "task")
        return cls(
            run_id=_require(fields, "run_id", str),
            workflow=_require(fields, "workflow", str),
            step=_require_counter(fields, "step"),
            attempt=_require_counter(fields, "attempt"),
            task=_require(fields, "task", str),
            args=tuple(_require(fields, "args", list)),
            kwargs=_require_kwargs(fields),
            retry=fields["retry"] if isinstance(fields.get("retry"), dict) else None,
            first_attempt=_counter_or(fields, "first_attempt", 1),
            timeout=_positive_seconds(fields, "timeout"),
            heartbeat=_positive_seconds(fields, "heartbeat"),
        )


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """The outcome of one task attempt, sent by the agent to the message's ``reply_to``."""

    run_id: str
    step: int
    attempt: int
    ok: bool
    workflow: str = ""
    value: Any = None
    error: dict[str, Any] | None = None
    agent: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    # Of a failure: the error must not be retried; or the task's retry_delay hook decided
    # the delay before the next attempt (retry_delay None: stop retrying).
    non_retryable: bool = False
    retry_decided: bool = False
    retry_delay: float | None = None

    def to_body(self) -> dict[str, Any]:
        body = {
            "version": VERSION,
            "type": "task_result",
            "run_id": self.run_id,
            "step": self.step,
            "attempt": self.attempt,
            "workflow": self.workflow,
            "ok": self.ok,
            "value": self.value,
            "error": self.error,
            "agent": self.agent,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        if self.non_retryable:
            body["non_retryable"] = True
        if self.retry_decided:
            body["retry_delay"] = self.retry_delay
        return body

    @classmethod
    def from_body(cls, body: Any) -> TaskResult:
        fields = _require_map(body, "task_result")
        ok = _require(fields, "ok", bool)
        error = fields.get("error")
        if not ok:
            if not isinstance(error, Mapping):
                raise InvalidMessage(
                    "invalid_field", "a failed result needs an 'error' map", "error"
                )
            error = {
                "type": _text(error.get("type", "Error")),
                "message": _text(error.get("message", "")),
                "traceback": _text(error.get("traceback", "")),
            }
        return cls(
            run_id=_require_id(fields, "run_id"),
            step=_require_counter(fields, "step"),
            attempt=_require_counter(fields, "attempt"),
            ok=ok,
            workflow=_text(fields.get("workflow") or ""),
            value=fields.get("value"),
            error=error if not ok else None,
            agent=_CONTROL_CHARACTERS.sub("?", _text(fields.get("agent") or "")),
            started_at=_optional_number(fields, "started_at"),
            finished_at=_optional_number(fields, "finished_at"),
            non_retryable=fields.get("non_retryable") is True,
            retry_decided=_is_retry_delay(fields),
            retry_delay=_optional_number(fields, "retry_delay"),
        )


@dataclasses.dataclass(frozen=True)
class TaskHeartbeat:
    """An agent's report that it still runs a task attempt, sent to the message's ``reply_to``.

    The engine then expects the attempt's result or another heartbeat within ``lease``
    seconds. After that, it counts the attempt as lost and retries it per the step's policy.
    """

    run_id: str
    step: int
    attempt: int
    agent: str
    lease: float
    details: Any = None

    def to_body(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "type": "task_heartbeat",
            "run_id": self.run_id,
            "step": self.step,
            "attempt": self.attempt,
            "agent": self.agent,
            "lease": self.lease,
            "details": self.details,
        }

    @classmethod
    def from_body(cls, body: Any) -> TaskHeartbeat:
        fields = _require_map(body, "task_heartbeat")
        lease = _positive_seconds(fields, "lease")
        if lease is None:
            raise InvalidMessage(
                "invalid_field", "field 'lease' must be a positive number of seconds", "lease"
            )
        return cls(
            run_id=_require_id(fields, "run_id"),
            step=_require_counter(fields, "step"),
            attempt=_require_counter(fields, "attempt"),
            agent=_CONTROL_CHARACTERS.sub("?", _text(fields.get("agent") or ""))[:255],
            lease=min(lease, MAX_LEASE_SECONDS),
            details=fields.get("details"),
        )


# The maximum lease an agent may request; a longer one is cut to this.
MAX_LEASE_SECONDS = 3600.0


# Steps and attempts are stored in 32-bit integer columns.
MAX_COUNTER = 2**31 - 1


def _require_counter(fields: Mapping[str, Any], name: str) -> int:
    value: int = _require(fields, name, int)
    if not 1 <= value <= MAX_COUNTER:
        raise InvalidMessage(
            "invalid_field", f"field {name!r} must be from 1 to {MAX_COUNTER}, not {value}", name
        )
    return value


def _require_id(fields: Mapping[str, Any], name: str) -> str:
    _require(fields, name, str)
    value = _optional_id(fields, name)
    assert value is not None
    return value


def _require_map(body: Any, kind: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise InvalidMessage("invalid_body", f"body must be a map, not {type(body).__name__}")
    _check_version(body)
    if body.get("type") != kind:
        raise InvalidMessage(
            "invalid_field", f"expected type {kind!r}, got {_short(body.get('type'))}", "type"
        )
    return body


def _require(fields: Mapping[str, Any], name: str, kind: type) -> Any:
    if name not in fields:
        raise InvalidMessage("missing_field", f"missing field {name!r}", name)
    value = fields[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidMessage(
            "invalid_field",
            f"field {name!r} must be of type {kind.__name__}, not {type(value).__name__}",
            name,
        )
    return value


def _require_kwargs(fields: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = _require(fields, "kwargs", dict)
    if not all(isinstance(key, str) for key in kwargs):
        raise InvalidMessage(
            "invalid_field", "field 'kwargs' must be a map with string keys", "kwargs"
        )
    return kwargs


def _text(value: Any) -> str:
    """Return ``value`` if it is a string, else a shortened repr of it.

    str() is not used because it can raise on decoded values, for example on deep lists
    or on ints with more than 4300 digits.
    """
    return value if isinstance(value, str) else _short(value)


def _is_retry_delay(fields: Mapping[str, Any]) -> bool:
    """Return whether a result carries a task's retry decision: seconds, or None to stop."""
    if "retry_delay" not in fields:
        return False
    value = fields["retry_delay"]
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _counter_or(fields: Mapping[str, Any], name: str, default: int) -> int:
    if name not in fields:
        return default
    return _require_counter(fields, name)


def _positive_seconds(fields: Mapping[str, Any], name: str) -> float | None:
    """Return the field as seconds if it is a finite positive number, else None."""
    value = _optional_number(fields, name)
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    return value


def _optional_number(fields: Mapping[str, Any], name: str) -> float | None:
    """Return the field as a float, or None when it is missing, not a number or too large."""
    value = fields.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return None
    return None


# Encoding of bodies for replies, which follow the content type of the request.


def encode_body(body: Any, content_type: str | None) -> tuple[bytes, str]:
    """Encode a reply body as JSON when ``content_type`` is JSON, else as msgpack.

    JSON has no form for some msgpack values, so they are converted: see _json_fallback
    for values and _json_key for map keys.

    Raises:
        SerializationError: the body cannot be encoded as msgpack, or it is nested deeper
            than serializer.MAX_DEPTH (a reference cycle counts as too deep).
    """
    if is_json(content_type):
        text = json.dumps(_with_json_keys(body, 0), default=_json_fallback, ensure_ascii=False)
        # A lone surrogate (which json.loads accepts in a request) cannot be encoded as UTF-8.
        # backslashreplace writes it as a \uXXXX escape, which is valid inside a JSON string.
        return text.encode("utf-8", "backslashreplace"), JSON_CONTENT_TYPE
    return serializer.encode(body, name="reply"), MSGPACK_CONTENT_TYPE


def _with_json_keys(value: Any, depth: int) -> Any:
    """Copy ``value`` with every map key converted to a type that json.dumps accepts.

    json.dumps calls its ``default`` hook for values but raises TypeError for a key that
    is not a str, int, float, bool or None.
    """
    if depth > serializer.MAX_DEPTH:
        raise SerializationError(
            f"cannot encode reply: nesting deeper than {serializer.MAX_DEPTH} levels", "reply"
        )
    if isinstance(value, dict):
        return {
            _json_key(key, depth): _with_json_keys(item, depth + 1) for key, item in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_with_json_keys(item, depth + 1) for item in value]
    if type(value) is int:
        return json_int(value)
    return value


def _json_key(key: Any, depth: int) -> Any:
    """Convert a map key to its closest JSON form: a date as ISO text, a tuple as JSON text.

    Keys that json.dumps accepts (str, int, float, bool, None) are returned unchanged.
    """
    if type(key) is int:
        return json_int(key)
    if key is None or isinstance(key, str | int | float):
        return key
    converted = _json_fallback(key)
    if isinstance(converted, str):
        return converted
    return json.dumps(
        _with_json_keys(converted, depth + 1), default=_json_fallback, ensure_ascii=False
    )


def json_int(value: int) -> int | str:
    """Return ``value``, or its hex text when it has too many digits for a JSON number.

    json.dumps converts ints to decimal text, which raises ValueError beyond
    sys.get_int_max_str_digits() digits (4300 by default).
    """
    if value.bit_length() <= 64:
        return value
    try:
        str(value)
    except ValueError:
        return hex(value)
    return value


def _json_fallback(value: Any) -> Any:
    """Map msgpack-only values to their closest JSON form (ISO text, numbers as text...)."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray):
        return value.hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)
