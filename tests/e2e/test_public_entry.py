"""The engine's public AMQP entry, used with pika and JSON or msgpack instead of zenflow's client.

Requests go to the direct exchange ``<namespace>.engine`` with routing key ``requests``.
The engine acknowledges an invalid request and logs it as ``request_rejected``. When the
request has a ``reply_to``, the engine replies with
``{"ok": false, "error": {"code", "message", "field"}}``. The request is never requeued, and
the engine goes on serving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pika
import pika.exceptions
import pytest

from tests.support import AMQP_URL, Cluster, Process, queue_depth, wait_until

pytestmark = pytest.mark.e2e

FOREIGN_START_RUN = Path(__file__).resolve().parent.parent / "foreign" / "start_run.py"
JSON = "application/json"
MSGPACK = "application/x-msgpack"
MAX_REQUEST_BYTES = 1024 * 1024  # the engine's default --max-request-bytes
REMOVE = object()  # marks a field that start_body leaves out


@dataclasses.dataclass(frozen=True)
class Sent:
    message_id: str
    correlation_id: str


class Entry:
    """A pika connection to the engine's public entry, with an exclusive reply queue."""

    def __init__(self, namespace: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        declared = self.channel.queue_declare("", exclusive=True)
        self.reply_queue = declared.method.queue
        self.exchange = f"{namespace}.engine"
        self._replies: dict[str | None, tuple[pika.BasicProperties, bytes]] = {}

    def publish(
        self,
        body: bytes,
        content_type: str | None = None,
        *,
        reply: bool = True,
        message_id: str | None = None,
    ) -> Sent:
        sent = Sent(message_id or f"m-{uuid.uuid4()}", f"c-{uuid.uuid4()}")
        properties = pika.BasicProperties(
            content_type=content_type,
            reply_to=self.reply_queue if reply else None,
            correlation_id=sent.correlation_id,
            message_id=sent.message_id,
            delivery_mode=2,
        )
        self.channel.basic_publish(self.exchange, "requests", body, properties, mandatory=True)
        return sent

    def reply(self, sent: Sent, timeout: float = 15.0) -> tuple[pika.BasicProperties, Any]:
        """Wait for the reply to ``sent`` and return its properties and decoded body."""

        def arrived() -> tuple[pika.BasicProperties, bytes] | None:
            self._drain()
            return self._replies.pop(sent.correlation_id, None)

        properties, body = wait_until(arrived, timeout, message=f"a reply to {sent}")
        if properties.content_type == JSON:
            return properties, json.loads(body)
        assert properties.content_type == MSGPACK
        return properties, msgpack.unpackb(body, raw=False, strict_map_key=False)

    def received(self, sent: Sent) -> bool:
        self._drain()
        return sent.correlation_id in self._replies

    def _drain(self) -> None:
        while True:
            method, properties, body = self.channel.basic_get(self.reply_queue, auto_ack=True)
            if method is None:
                return
            self._replies[properties.correlation_id] = (properties, body)

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send a JSON request and return the JSON reply."""
        properties, reply = self.reply(self.publish(json.dumps(body).encode(), JSON))
        assert properties.content_type == JSON
        return dict(reply)

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError):
            self.connection.close()


@pytest.fixture
def entry(flows_cluster: Cluster) -> Iterator[Entry]:
    connection = Entry(flows_cluster.namespace)
    try:
        yield connection
    finally:
        connection.close()


def start_body(**changes: Any) -> dict[str, Any]:
    """Return a valid start request for Sequential, with ``changes`` applied."""
    body: dict[str, Any] = {
        "version": 1,
        "type": "start",
        "workflow": "Sequential",
        "args": [1],
        "kwargs": {},
    }
    for key, value in changes.items():
        if value is REMOVE:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def as_json(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def engine_of(cluster: Cluster) -> Process:
    return next(process for process in cluster.processes if process.args[0] == "engine")


def log_records(process: Process, event: str, **fields: Any) -> list[dict[str, Any]]:
    """Return the JSON log lines of ``process`` with this event and these field values."""
    records = []
    for line in process.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or record.get("event") != event:
            continue
        if all(record.get(key) == value for key, value in fields.items()):
            records.append(record)
    return records


def run_of(entry: Entry, run_id: str) -> dict[str, Any] | None:
    """Return the run from a get_run request, or None if the engine has no such run yet."""
    reply = entry.request({"version": 1, "type": "get_run", "run_id": run_id})
    if not reply["ok"] and reply["error"]["code"] == "run_not_found":
        return None
    assert reply["ok"] is True, reply
    return dict(reply["run"])


def wait_for_result(entry: Entry, run_id: str) -> Any:
    def finished() -> dict[str, Any] | None:
        run = run_of(entry, run_id)
        if run is None or run["status"] not in ("completed", "failed"):
            return None
        return run

    run = wait_until(finished, 30, message=f"run {run_id} to finish")
    assert run["status"] == "completed", run
    return run["result"]


def assert_engine_serves(entry: Entry) -> None:
    """Start Sequential through the entry and check that it completes."""
    start = int(uuid.uuid4().int % 1000)
    reply = entry.request(start_body(args=[start]))
    assert reply["ok"] is True, reply
    assert wait_for_result(entry, reply["run_id"]) == [2 * start, 2 * start + 1, 2 * start + 1]


def wait_for_empty_requests_queue(cluster: Cluster) -> None:
    wait_until(
        lambda: queue_depth(cluster.namespace, "engine.requests") == 0,
        15,
        message="the engine.requests queue to be empty",
    )


def run_foreign(cluster: Cluster, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, str(FOREIGN_START_RUN), *args],
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=90,
        cwd=cluster.folder,
    )


# A program without zenflow.


def test_foreign_script_starts_sequential(flows_cluster: Cluster) -> None:
    business_id = f"order-{uuid.uuid4().hex[:8]}"
    finished = run_foreign(
        flows_cluster,
        "--amqp-url",
        AMQP_URL,
        "--namespace",
        flows_cluster.namespace,
        "--workflow",
        "Sequential",
        "--args",
        "[5]",
        "--business-id",
        business_id,
    )

    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert len(lines) == 2
    run_id, result = lines[0], json.loads(lines[1])
    assert result == [10, 11, 11]
    database = flows_cluster.database
    stored_business_id = database.scalar("SELECT business_id FROM runs WHERE id = :id", id=run_id)
    assert stored_business_id == business_id
    assert database.run_status(run_id) == "completed"


def test_foreign_script_reads_env(flows_cluster: Cluster) -> None:
    env = dict(os.environ)
    env.update(
        {
            "ZENFLOW_AMQP_URL": AMQP_URL,
            "ZENFLOW_NAMESPACE": flows_cluster.namespace,
            "START_RUN_WORKFLOW": "Sequential",
            "START_RUN_KWARGS": '{"start": 3}',
        }
    )

    finished = run_foreign(flows_cluster, env=env)

    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout.splitlines()[1]) == [6, 7, 7]


def test_foreign_script_reports_rejection(flows_cluster: Cluster) -> None:
    finished = run_foreign(
        flows_cluster,
        "--amqp-url",
        AMQP_URL,
        "--namespace",
        flows_cluster.namespace,
        "--workflow",
        "NoSuchFlow",
    )

    assert finished.returncode == 1
    assert finished.stdout == ""
    assert "unknown_workflow" in finished.stderr
    assert "'NoSuchFlow'" in finished.stderr


# Invalid requests.


@dataclasses.dataclass(frozen=True)
class Invalid:
    """An invalid request and the error that the engine must reply with."""

    body: bytes
    content_type: str | None
    code: str
    field: str | None
    fragments: tuple[str, ...]  # text that the error message must contain


TOO_LARGE = as_json(start_body(args=["x" * (MAX_REQUEST_BYTES + MAX_REQUEST_BYTES // 10)]))

INVALID = {
    "bad-json": Invalid(
        b'{"version": 1, "type": "start", "workflow": ',
        JSON,
        "invalid_body",
        None,
        ("not valid JSON",),
    ),
    "garbage-msgpack": Invalid(
        b"\xc1\xc1 not msgpack", None, "invalid_body", None, ("invalid msgpack body",)
    ),
    "truncated-msgpack": Invalid(
        b"\x93\x01", MSGPACK, "invalid_body", None, ("invalid msgpack body",)
    ),
    "unsupported-content-type": Invalid(
        b"hello", "text/plain", "invalid_body", None, ("'text/plain'", JSON)
    ),
    "not-a-map": Invalid(b"[1, 2]", JSON, "invalid_body", None, ("must be a map", "list")),
    "unknown-workflow": Invalid(
        as_json(start_body(workflow="NoSuchFlow")),
        JSON,
        "unknown_workflow",
        "workflow",
        ("'NoSuchFlow'", "Sequential"),
    ),
    "missing-argument": Invalid(
        as_json(start_body(args=[])),
        JSON,
        "invalid_arguments",
        "args",
        ("Sequential", "'start'"),
    ),
    "extra-argument": Invalid(
        as_json(start_body(args=[1, 2])),
        JSON,
        "invalid_arguments",
        "args",
        ("Sequential", "positional"),
    ),
    "unknown-keyword": Invalid(
        as_json(start_body(args=[1], kwargs={"begin": 1})),
        JSON,
        "invalid_arguments",
        "args",
        ("Sequential", "'begin'"),
    ),
    "args-not-array": Invalid(
        as_json(start_body(args="5")), JSON, "invalid_field", "args", ("'args'", "str")
    ),
    "missing-workflow": Invalid(
        as_json(start_body(workflow=REMOVE)),
        JSON,
        "missing_field",
        "workflow",
        ("'workflow'",),
    ),
    "missing-version": Invalid(
        as_json(start_body(version=REMOVE)), JSON, "missing_field", "version", ("'version'",)
    ),
    "missing-type": Invalid(
        as_json(start_body(type=REMOVE)), JSON, "missing_field", "type", ("'type'",)
    ),
    "wrong-version": Invalid(
        as_json(start_body(version=2)),
        JSON,
        "unsupported_version",
        "version",
        ("version 2", "version 1"),
    ),
    "body-too-large": Invalid(
        TOO_LARGE,
        JSON,
        "body_too_large",
        None,
        (f"{len(TOO_LARGE)} bytes", f"{MAX_REQUEST_BYTES} bytes"),
    ),
    "unknown-type": Invalid(
        as_json(start_body(type="cancel")),
        JSON,
        "invalid_field",
        "type",
        ("'cancel'", "start", "get_run"),
    ),
    "invalid-run-id": Invalid(
        as_json(start_body(run_id="not valid!")),
        JSON,
        "invalid_field",
        "run_id",
        ("'not valid!'",),
    ),
    "get-run-without-id": Invalid(
        as_json({"version": 1, "type": "get_run"}),
        JSON,
        "missing_field",
        "run_id",
        ("'run_id'", "'business_id'"),
    ),
}


@pytest.mark.parametrize("case", INVALID.values(), ids=INVALID.keys())
def test_invalid_request_gets_error_reply(
    flows_cluster: Cluster, entry: Entry, case: Invalid
) -> None:
    engine = engine_of(flows_cluster)
    sent = entry.publish(case.body, case.content_type)

    properties, reply = entry.reply(sent)

    assert properties.correlation_id == sent.correlation_id
    assert properties.content_type == (JSON if case.content_type == JSON else MSGPACK)
    assert reply["version"] == 1
    assert reply["type"] == "reply"
    assert reply["ok"] is False
    error = reply["error"]
    assert error["code"] == case.code
    assert error.get("field") == case.field
    for fragment in case.fragments:
        assert fragment in error["message"], error["message"]

    wait_until(
        lambda: log_records(engine, "request_rejected", message_id=sent.message_id),
        15,
        message="request_rejected in the engine log",
    )
    records = log_records(engine, "request_rejected", message_id=sent.message_id)
    assert len(records) == 1
    record = records[0]
    assert record["code"] == case.code
    assert record["reason"] == error["message"]
    assert record["field"] == case.field
    assert record["reply_to"] == entry.reply_queue

    wait_for_empty_requests_queue(flows_cluster)
    assert_engine_serves(entry)
    # A requeued message would be rejected again and again by now.
    assert len(log_records(engine, "request_rejected", message_id=sent.message_id)) == 1


@pytest.mark.parametrize("case", INVALID.values(), ids=INVALID.keys())
def test_invalid_request_without_reply_dropped(
    flows_cluster: Cluster, entry: Entry, case: Invalid
) -> None:
    engine = engine_of(flows_cluster)
    sent = entry.publish(case.body, case.content_type, reply=False)

    wait_until(
        lambda: log_records(engine, "request_rejected", message_id=sent.message_id),
        15,
        message="request_rejected in the engine log",
    )
    records = log_records(engine, "request_rejected", message_id=sent.message_id)
    assert len(records) == 1
    record = records[0]
    assert record["code"] == case.code
    assert record["reply_to"] is None

    wait_for_empty_requests_queue(flows_cluster)
    assert_engine_serves(entry)
    assert len(log_records(engine, "request_rejected", message_id=sent.message_id)) == 1
    assert not entry.received(sent)


def test_get_run_unknown_id_not_found(flows_cluster: Cluster, entry: Entry) -> None:
    """An unknown run id is a valid query with a negative answer, not a rejected message."""
    engine = engine_of(flows_cluster)
    body = as_json({"version": 1, "type": "get_run", "run_id": "no-such-run"})
    sent = entry.publish(body, JSON)

    properties, reply = entry.reply(sent)

    assert properties.correlation_id == sent.correlation_id
    assert reply["ok"] is False
    assert reply["error"]["code"] == "run_not_found"
    assert reply["error"]["field"] == "run_id"
    assert "'no-such-run'" in reply["error"]["message"]
    wait_for_empty_requests_queue(flows_cluster)
    assert log_records(engine, "request_rejected", message_id=sent.message_id) == []


def test_garbage_msgpack_error_says_why(entry: Entry) -> None:
    sent = entry.publish(b"\xc1\xc1 not msgpack", MSGPACK)

    _properties, reply = entry.reply(sent)

    message = reply["error"]["message"]
    assert message.startswith("invalid msgpack body")
    # The text after the prefix must describe what is wrong with the bytes.
    assert message.split(":", 1)[1].strip() != ""


def test_too_deep_arguments_rejected(flows_cluster: Cluster, entry: Entry) -> None:
    engine = engine_of(flows_cluster)
    nested: list[Any] = [1]
    for _level in range(300):
        nested = [nested]
    sent = entry.publish(as_json(start_body(args=[nested])), JSON)

    _properties, reply = entry.reply(sent)

    assert reply["ok"] is False
    # Arguments that cannot be stored are the sender's error, not the engine's.
    assert reply["error"]["code"] != "internal_error"
    assert reply["error"].get("field") == "args"
    assert log_records(engine, "request_failed", message_id=sent.message_id) == []
    wait_for_empty_requests_queue(flows_cluster)
    assert_engine_serves(entry)


def test_json_with_charset_parameter(entry: Entry) -> None:
    sent = entry.publish(as_json(start_body(args=[9])), "application/json; charset=utf-8")

    properties, reply = entry.reply(sent)

    assert properties.content_type == JSON
    assert reply["ok"] is True
    assert wait_for_result(entry, reply["run_id"]) == [18, 19, 19]


# Valid requests without zenflow's client.


def test_msgpack_start_without_content_type(entry: Entry) -> None:
    body = msgpack.packb(start_body(args=[4]), use_bin_type=True)
    sent = entry.publish(body, None)

    properties, reply = entry.reply(sent)

    assert properties.content_type == MSGPACK
    assert reply["ok"] is True
    assert reply["duplicate"] is False
    assert wait_for_result(entry, reply["run_id"]) == [8, 9, 9]


def test_msgpack_get_run_reply(entry: Entry) -> None:
    started = entry.request(start_body(args=[2]))
    wait_for_result(entry, started["run_id"])
    query = {"version": 1, "type": "get_run", "run_id": started["run_id"]}

    properties, reply = entry.reply(entry.publish(msgpack.packb(query), MSGPACK))

    assert properties.content_type == MSGPACK
    assert reply["ok"] is True
    assert reply["run"]["status"] == "completed"
    assert reply["run"]["result"] == [4, 5, 5]


def test_repeated_run_id_starts_one_run(flows_cluster: Cluster, entry: Entry) -> None:
    run_id = f"dup-{uuid.uuid4().hex}"
    business_id = f"order-{run_id}"
    body = start_body(args=[6], run_id=run_id, business_id=business_id)

    first = entry.request(body)
    second = entry.request(body)

    assert first["ok"] is True
    assert first["run_id"] == run_id
    assert first["duplicate"] is False
    assert second["ok"] is True
    assert second["run_id"] == run_id
    assert second["duplicate"] is True
    assert wait_for_result(entry, run_id) == [12, 13, 13]
    database = flows_cluster.database
    runs = database.scalar("SELECT COUNT(*) FROM runs WHERE business_id = :id", id=business_id)
    assert runs == 1
    starts = database.scalar(
        "SELECT COUNT(*) FROM history WHERE run_id = :id AND kind = 'run_started'", id=run_id
    )
    assert starts == 1
    assert database.results_per_step(run_id) == {1: 1, 2: 1, 3: 1}


def test_repeated_message_id_starts_one_run(entry: Entry) -> None:
    message_id = f"m-{uuid.uuid4()}"
    body = as_json(start_body(args=[7]))

    _properties, first = entry.reply(entry.publish(body, JSON, message_id=message_id))
    _properties, second = entry.reply(entry.publish(body, JSON, message_id=message_id))

    assert first["ok"] is True
    assert first["duplicate"] is False
    assert second["run_id"] == first["run_id"]
    assert second["duplicate"] is True
    assert wait_for_result(entry, first["run_id"]) == [14, 15, 15]


def test_start_without_reply_to_runs(entry: Entry) -> None:
    run_id = f"silent-{uuid.uuid4().hex}"
    sent = entry.publish(as_json(start_body(args=[8], run_id=run_id)), JSON, reply=False)

    assert wait_for_result(entry, run_id) == [16, 17, 17]
    assert not entry.received(sent)
