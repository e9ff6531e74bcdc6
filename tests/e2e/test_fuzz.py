"""Hostile messages for a real engine and agent: generated bodies and properties by the thousand.

The fuzz test publishes over 10,000 generated messages to the engine's public entry and to
its results queue. The bodies are garbage bytes, truncated and deeply nested msgpack and
JSON, huge numbers, msgpack extension values with wrong payloads, and valid msgpack and
JSON of wrong shapes. Most are requests and task results of the documented schemas
(docs/protocol.md) with wrong types in their fields. Each body is also sent as mutants
with flipped, inserted, deleted, repeated or cut bytes. The properties are generated too,
as raw bytes, with strings that are not UTF-8 and timestamps out of range (see
tests/hostile.py). Some requests name runs that exist, and some ask for replies in queues
of the engine itself.

Then it checks that the engine and the agent still run, that every queue drains, that each
request with our reply queue got exactly one reply, which is a valid error reply, that no
message is rejected twice, and that runs started afterwards complete with the right result.

Set ZENFLOW_FUZZ_SEED to repeat a run: the test prints the seed it used.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiormq
import msgpack
import pika
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.hostile import Outgoing, RawField, publish_all
from tests.support import (
    AMQP_URL,
    Cluster,
    Process,
    cluster_of,
    queue_depth,
    result_of,
    send,
    start,
    wait_until,
    wait_until_waiting_for,
)
from zenflow import RunFailed

pytestmark = pytest.mark.e2e

# Hypothesis generates these many messages for each entry, and each is sent as generated and
# as VARIANTS - 1 byte-level mutants: 2,160 x 5 = 10,800 messages. Mutants cost little to
# make, while hypothesis takes 1 to 3 ms per message, depending on the machine's load.
GENERATED = {"request": 1440, "result": 720}
VARIANTS = 5
VICTIMS = 4  # Waiter runs that exist during the fuzz and that fuzzed messages name
JSON = "application/json"
MSGPACK = "application/x-msgpack"
ERROR_CODES = {
    "body_too_large",
    "invalid_body",
    "missing_field",
    "invalid_field",
    "unsupported_version",
    "unknown_workflow",
    "invalid_arguments",
    "run_not_found",
    "business_id_in_use",
    "run_finished",
    "invalid_state",
}
MISSING = object()  # a field that the generated body leaves out


@dataclasses.dataclass(frozen=True)
class Names:
    """The names that generated messages use: queues of the namespace and existing runs."""

    namespace: str
    reply_queue: str
    victim_run_ids: tuple[str, ...]
    victim_business_ids: tuple[str, ...]


# Values.

INTERESTING_INTEGERS = [0, -1, 1, 2, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1]
INTERESTING_INTEGERS += [10**30, -(2**200), 2**1000]
INTERESTING_TEXTS = ["", " ", "\x00", "a\x00b", "\n", "\x7f", "x" * 256, "🙂", "\u202e", ","]
INTERESTING_TEXTS += ["Go", "Go,Stop", "Pipeline", "Waiter", "start", "1", "null", "%s%n"]


def extension_values() -> st.SearchStrategy[msgpack.ExtType]:
    """msgpack extension values with the codes of zenflow's serializer and wrong payloads."""
    payloads = st.one_of(
        st.binary(max_size=24),
        st.sampled_from(
            [
                msgpack.packb(["2026-01-01T00:00:00", 0, "No/Such_Zone"]),
                msgpack.packb(["2026-01-01T00:00:00", 0, 10**12]),
                msgpack.packb(["2026-01-01T00:00:00", 5, "../../etc/passwd"]),
                msgpack.packb(["9999-12-31T23:59:59", 0, -86400]),
                msgpack.packb([10**9, 0, 0]),
                msgpack.packb([1, 2]),
                msgpack.packb(None),
                msgpack.packb([[1], [2]]),
                b"sNaN",
                b"1e999999999",
                b"-Infinity",
            ]
        ),
        st.integers(min_value=1, max_value=4000).map(lambda size: b"\xff" * size),
    )
    codes = st.integers(min_value=1, max_value=10) | st.integers(min_value=0, max_value=127)
    return st.builds(msgpack.ExtType, codes, payloads)


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from(INTERESTING_INTEGERS),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(INTERESTING_TEXTS),
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=8,
    )


def msgpack_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from(INTERESTING_INTEGERS),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(INTERESTING_TEXTS),
        st.binary(max_size=20),
        extension_values(),
    )
    keys = st.one_of(st.text(max_size=8), st.integers(), st.binary(max_size=4), st.none())
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4)
        ),
        max_leaves=8,
    )


def as_msgpack_value(value: Any) -> Any:
    """Replace the integers that msgpack cannot pack with zenflow's big integer extension."""
    if isinstance(value, bool) or not isinstance(value, int | list | dict):
        return value
    if isinstance(value, int):
        if -(2**63) <= value < 2**64:
            return value
        length = (value.bit_length() + 8) // 8
        return msgpack.ExtType(10, value.to_bytes(length, "big", signed=True))
    if isinstance(value, list):
        return [as_msgpack_value(item) for item in value]
    return {as_msgpack_value(key): as_msgpack_value(item) for key, item in value.items()}


def encode_msgpack(value: Any) -> bytes:
    return bytes(msgpack.packb(as_msgpack_value(value), use_bin_type=True))


def encode_json(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")


# Bodies of the documented schemas, with each field valid, wrong or missing.


def field(valid: st.SearchStrategy[Any], wrong: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A required field: valid three times in five, else of any value or missing."""
    return st.one_of(valid, valid, valid, wrong, st.just(MISSING))


def optional(
    valid: st.SearchStrategy[Any], wrong: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """An optional field: missing half of the time, else valid or of any value."""
    return st.one_of(st.just(MISSING), st.just(MISSING), valid, wrong)


def without_missing(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if value is not MISSING}


def run_ids(names: Names) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(names.victim_run_ids),
        st.uuids().map(str),
        st.text(alphabet="abcXYZ019_-", min_size=1, max_size=64),
    )


def business_ids(names: Names) -> st.SearchStrategy[str]:
    return st.sampled_from(names.victim_business_ids) | st.text(max_size=30)


def request_bodies(names: Names, values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Requests of every type of the public entry (docs/protocol.md), most of them invalid."""
    version = field(st.just(1), values)
    targets = {
        "run_id": optional(run_ids(names), values),
        "business_id": optional(business_ids(names), values),
        "run": optional(run_ids(names) | business_ids(names), values),
    }
    start_request = st.fixed_dictionaries(
        {
            "version": version,
            "type": field(st.just("start"), values),
            "workflow": field(st.sampled_from(["Pipeline", "Waiter", "NoSuchFlow"]), values),
            "args": field(st.lists(values, max_size=3), values),
            "kwargs": optional(st.dictionaries(st.sampled_from(["value", "key"]), values), values),
            "run_id": optional(run_ids(names), values),
            "business_id": optional(business_ids(names), values),
            "if_running": optional(st.sampled_from(["reject", "return_existing"]), values),
            "parent_run_id": optional(run_ids(names), values),
            "parent_step": optional(st.integers(min_value=1, max_value=3), values),
        }
    )
    get_run = st.fixed_dictionaries(
        {
            "version": version,
            "type": field(st.just("get_run"), values),
            "run_id": targets["run_id"],
            "business_id": targets["business_id"],
        }
    )
    event = st.fixed_dictionaries(
        {
            "version": version,
            "type": field(st.just("event"), values),
            **targets,
            "name": field(st.sampled_from(["Go", "Other"]), values),
            "data": optional(values, values),
        }
    )
    control = st.fixed_dictionaries(
        {
            "version": version,
            "type": field(st.sampled_from(["kill", "pause", "resume"]), values),
            **targets,
            "by": optional(st.text(max_size=20), values),
            "reason": optional(st.text(max_size=20), values),
        }
    )
    return st.one_of(start_request, get_run, event, control).map(without_missing)


def result_bodies(names: Names, values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Task results and task messages (docs/protocol.md), most of them invalid."""
    counters = st.integers(min_value=1, max_value=3)
    error = st.fixed_dictionaries(
        {
            "type": optional(st.text(max_size=10), values),
            "message": optional(st.text(max_size=10), values),
            "traceback": optional(st.text(max_size=10), values),
        }
    ).map(without_missing)
    task_result = st.fixed_dictionaries(
        {
            "version": field(st.just(1), values),
            "type": field(st.just("task_result"), values),
            "run_id": field(run_ids(names), values),
            "workflow": optional(st.sampled_from(["Waiter", "Pipeline"]), values),
            "step": field(counters, values),
            "attempt": field(counters, values),
            "ok": field(st.booleans(), values),
            "value": optional(values, values),
            "error": optional(error, values),
            "agent": optional(st.text(max_size=10), values),
            "started_at": optional(st.floats(), values),
            "finished_at": optional(st.floats(), values),
        }
    )
    task_message = st.fixed_dictionaries(
        {
            "version": field(st.just(1), values),
            "type": field(st.just("task"), values),
            "run_id": field(run_ids(names), values),
            "step": field(counters, values),
            "attempt": field(counters, values),
            "task": field(st.sampled_from(["double", "echo"]), values),
            "args": field(st.lists(values, max_size=2), values),
            "kwargs": field(st.just({}), values),
        }
    )
    return st.one_of(task_result, task_result, task_message).map(without_missing)


def schema_bodies(names: Names, kind: str) -> st.SearchStrategy[tuple[bytes, str]]:
    """Encoded bodies of one schema, as JSON or msgpack, with the content type to match."""
    bodies = request_bodies if kind == "request" else result_bodies
    as_json = bodies(names, json_values()).map(lambda body: (encode_json(body), JSON))
    as_msgpack = bodies(names, msgpack_values()).map(lambda body: (encode_msgpack(body), MSGPACK))
    return as_json | as_msgpack


def nested(depth: int, kind: str) -> tuple[bytes, str]:
    """A body nested ``depth`` levels deep, as JSON arrays, msgpack maps or msgpack tuples."""
    if kind == "json":
        return b"[" * depth + b"]" * depth, JSON
    if kind == "json-open":
        return b'{"version": 1, "args": ' + b"[" * depth, JSON
    if kind == "msgpack":
        return b"\x81\xa1k" * depth + b"\xc0", MSGPACK
    payload = msgpack.packb(None)
    for _level in range(min(depth, 400)):
        payload = msgpack.packb(msgpack.ExtType(7, b"\x91" + payload))
    return payload, MSGPACK


def huge_numbers() -> st.SearchStrategy[tuple[bytes, str]]:
    """Numbers beyond what JSON parsers, msgpack and datetime accept, in start requests."""
    start_with = b'{"version": 1, "type": "start", "workflow": "Pipeline", "args": ['
    texts = st.one_of(
        st.integers(min_value=4000, max_value=20_000).map(lambda digits: b"9" * digits),
        st.integers(min_value=4000, max_value=20_000).map(lambda digits: b"-" + b"1" * digits),
        st.sampled_from([b"1e999999", b"-1e-999999", b"NaN", b"-Infinity", b"1" + b"0" * 400]),
    )
    as_json = texts.map(lambda number: (start_with + number + b"]}", JSON))
    big_integer = st.integers(min_value=1, max_value=20_000).map(
        lambda size: msgpack.ExtType(10, b"\x7f" + b"\xff" * size)
    )
    as_msgpack = big_integer.map(
        lambda number: (
            encode_msgpack(
                {"version": 1, "type": "start", "workflow": "Pipeline", "args": [number]}
            ),
            MSGPACK,
        )
    )
    # The msgpack timestamp extension (code -1) with 32 and 96 bits of seconds.
    timestamps = st.sampled_from(
        [
            b"\xd6\xff" + b"\xff" * 4,
            b"\xc7\x0c\xff" + b"\x7f" + b"\xff" * 11,
            b"\xd7\xff" + b"\xff" * 8,
        ]
    ).map(lambda stamp: (b"\x82\xa7version\x01\xa4args\x91" + stamp, MSGPACK))
    return as_json | as_msgpack | timestamps


def garbage_bodies(names: Names, kind: str) -> st.SearchStrategy[tuple[bytes, str | None]]:
    """Bodies that do not decode, decode to wrong shapes, or strain the decoders."""
    content_types = st.sampled_from([None, JSON, MSGPACK])
    truncated = st.tuples(schema_bodies(names, kind), st.floats(0, 1)).map(
        lambda pair: (pair[0][0][: int(len(pair[0][0]) * pair[1])], pair[0][1])
    )
    shapes = st.one_of(
        json_values().map(lambda value: (encode_json(value), JSON)),
        msgpack_values().map(lambda value: (encode_msgpack(value), MSGPACK)),
    )
    deep = st.builds(
        nested,
        st.integers(min_value=1, max_value=20_000),
        st.sampled_from(["json", "json-open", "msgpack", "ext"]),
    )
    return st.one_of(
        st.tuples(st.binary(max_size=300), content_types),
        truncated,
        shapes,
        deep,
        huge_numbers(),
    )


# Properties.


SHORT_TEXTS = [text for text in INTERESTING_TEXTS if len(text.encode()) <= 255] + ["x" * 255]


def short_strings() -> st.SearchStrategy[str | bytes]:
    """Short string values: any text, a few chosen ones, and bytes that are not UTF-8."""
    return st.one_of(
        st.text(max_size=30),
        st.sampled_from(SHORT_TEXTS),
        st.binary(min_size=1, max_size=30).filter(lambda data: not _is_utf8(data)),
    )


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def content_types(strings: st.SearchStrategy[str | bytes]) -> st.SearchStrategy[str | bytes | None]:
    chosen = [
        JSON,
        MSGPACK,
        "APPLICATION/JSON ; charset=latin-1",
        "application/json;",
        "application/x-msgpack; v=2",
        "text/plain",
        "application/jsonx",
        "",
        ";",
    ]
    return st.one_of(st.none(), st.sampled_from(chosen), strings)


def headers() -> st.SearchStrategy[dict[Any, Any]]:
    values = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.text(max_size=10),
        st.builds(bytearray, st.binary(max_size=10)),
        st.just(RawField(b"T" + (2**64 - 1).to_bytes(8, "big"))),
        st.just(RawField(b"S\x00\x00\x00\x02\xff\xfe")),
    )
    keys = st.text(min_size=1, max_size=10) | st.binary(min_size=1, max_size=4)
    return st.dictionaries(keys, values, max_size=3)


def reply_targets(
    names: Names, strings: st.SearchStrategy[str | bytes]
) -> st.SearchStrategy[str | bytes | None]:
    """reply_to values: our queue most often, else none, junk, or queues of the engine."""
    namespace = names.namespace
    own_queues = [
        f"{namespace}.engine.requests",
        f"{namespace}.engine.results",
        f"{namespace}.tasks.default",
        "amq.rabbitmq.reply-to.g2dkAA",
    ]
    return st.one_of(
        st.just(names.reply_queue),
        st.just(names.reply_queue),
        st.none(),
        st.sampled_from(own_queues),
        strings,
    )


def properties(names: Names) -> st.SearchStrategy[dict[str, Any]]:
    """Message properties. In about one message in five, strings may be bytes that are not
    UTF-8. The engine drops those properties, so they are kept rare: a message whose
    reply_to or correlation_id is dropped gets no reply that the test can match."""
    return st.one_of(
        _properties(names, st.text(max_size=30) | st.sampled_from(SHORT_TEXTS)),
        _properties(names, st.text(max_size=30) | st.sampled_from(SHORT_TEXTS)),
        _properties(names, st.text(max_size=30) | st.sampled_from(SHORT_TEXTS)),
        _properties(names, st.text(max_size=30) | st.sampled_from(SHORT_TEXTS)),
        _properties(names, short_strings()),
    )


def _properties(
    names: Names, strings: st.SearchStrategy[str | bytes]
) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "content_type": content_types(strings),
            "content_encoding": st.none() | st.sampled_from(["gzip", "utf-8"]) | strings,
            "headers": st.none() | headers(),
            "delivery_mode": st.sampled_from([None, 1, 2]),
            "priority": st.none() | st.integers(min_value=0, max_value=255),
            "correlation_id": st.none() | strings,
            "reply_to": reply_targets(names, strings),
            "message_id": st.none() | st.sampled_from(["dup-1", "dup-2"]) | strings,
            "timestamp": st.none() | st.sampled_from([0, 2**32, 2**63, 2**64 - 1]),
            "message_type": st.none() | st.sampled_from(["run_finished", "task_result"]),
            "app_id": st.none() | strings,
        }
    )


def messages(names: Names, kind: str) -> st.SearchStrategy[tuple[bytes, dict[str, Any]]]:
    """A body for one entry ("request" or "result") and its properties.

    The content type matches the body three times in four, and is generated otherwise.
    """
    bodies = schema_bodies(names, kind) | garbage_bodies(names, kind)
    matched = st.tuples(bodies, properties(names)).map(
        lambda pair: (pair[0][0], {**pair[1], "content_type": pair[0][1]})
    )
    generated = st.tuples(bodies, properties(names)).map(lambda pair: (pair[0][0], pair[1]))
    return st.one_of(matched, matched, matched, generated)


def generate(strategy: st.SearchStrategy[Any], count: int, fuzz_seed: int) -> list[Any]:
    """Draw ``count`` examples of ``strategy`` with hypothesis, repeatable by ``fuzz_seed``."""
    found: list[Any] = []

    @seed(fuzz_seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Any) -> None:
        found.append(example)

    collect()
    return found


def mutate(body: bytes, rng: random.Random) -> bytes:
    """Return ``body`` with one to four byte-level changes: a flipped bit, inserted random
    bytes, deleted bytes, a span repeated up to 50 times, or the end cut off."""
    data = bytearray(body)
    for _change in range(rng.randint(1, 4)):
        operation = rng.randrange(5)
        position = rng.randint(0, len(data))
        if operation == 0 and data:
            data[min(position, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif operation == 1:
            data[position:position] = rng.randbytes(rng.randint(1, 8))
        elif operation == 2:
            del data[position : position + rng.randint(1, 8)]
        elif operation == 3:
            span = data[position : position + rng.randint(1, 16)]
            data[position:position] = span * rng.randint(2, 50)
        else:
            del data[position:]
    return bytes(data)


def with_mutants(examples: list[Any], rng: random.Random) -> list[Any]:
    """Return each (body, properties) example, then VARIANTS - 1 mutants of its body, which
    take the properties of the examples that follow it."""
    messages = []
    for index, (body, props) in enumerate(examples):
        messages.append((body, props))
        for offset in range(1, VARIANTS):
            other = examples[(index + offset) % len(examples)][1]
            messages.append((mutate(body, rng), other))
    return messages


# Publishing and replies.


@dataclasses.dataclass
class Batch:
    """The messages of one fuzz run and what the test expects of them."""

    outgoing: list[Outgoing] = dataclasses.field(default_factory=list)
    expected_replies: set[str] = dataclasses.field(default_factory=set)
    bounced: int = 0  # replies that the engine sends to its own queues
    undecodable: int = 0  # messages with a short string property that is not UTF-8
    properties: int = 0  # properties set, over all messages


def build_batch(names: Names, requests: list[Any], results: list[Any]) -> Batch:
    """Turn generated messages into publishable ones, and tag those that want our replies.

    A message whose reply_to is our queue gets the correlation id ``fuzz-<index>|...``, so
    that each reply can be matched to its request.
    """
    batch = Batch()
    engine_queues = {f"{names.namespace}.engine.requests", f"{names.namespace}.engine.results"}
    entries = [("request", body, props) for body, props in requests]
    entries += [("result", body, props) for body, props in results]
    for index, (kind, body, props) in enumerate(entries):
        props = dict(props)
        if kind == "request" and props["reply_to"] == names.reply_queue:
            suffix = props["correlation_id"] if isinstance(props["correlation_id"], str) else ""
            tag = f"fuzz-{index}|"
            props["correlation_id"] = (tag + suffix).encode()[:255].decode("utf-8", "ignore")
            batch.expected_replies.add(props["correlation_id"])
        elif kind == "request" and props["reply_to"] in engine_queues:
            batch.bounced += 1
        batch.undecodable += any(
            isinstance(value, bytes) and not _is_utf8(value) for value in props.values()
        )
        batch.properties += sum(value is not None for value in props.values())
        if kind == "request":
            batch.outgoing.append(Outgoing(f"{names.namespace}.engine", "requests", body, props))
        else:
            queue = f"{names.namespace}.engine.results"
            batch.outgoing.append(Outgoing("", queue, body, props))
    return batch


@dataclasses.dataclass(frozen=True)
class Reply:
    correlation_id: str | None
    content_type: str | None
    body: bytes


class ReplyQueue:
    """An exclusive queue that collects the engine's replies, on a connection of its own."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.replies: list[Reply] = []

    async def open(self) -> None:
        self.connection = await aiormq.connect(AMQP_URL)
        channel = await self.connection.channel()
        await channel.queue_declare(self.name, exclusive=True)
        await channel.basic_consume(self.name, self._on_message, no_ack=True)

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        header = message.header.properties
        self.replies.append(Reply(header.correlation_id, header.content_type, message.body))

    async def close(self) -> None:
        await self.connection.close()


def check_reply(reply: Reply) -> dict[str, Any]:
    """Decode a reply and check that it follows the schema; return the body."""
    if reply.content_type == JSON:
        body = json.loads(reply.body)
    else:
        assert reply.content_type == MSGPACK, reply
        body = msgpack.unpackb(reply.body, raw=False, strict_map_key=False)
    assert isinstance(body, dict), reply
    assert body.get("version") == 1, body
    assert body.get("type") == "reply", body
    assert isinstance(body.get("ok"), bool), body
    if not body["ok"]:
        error = body["error"]
        assert error["code"] in ERROR_CODES, body
        assert isinstance(error["message"], str), body
        assert error["message"], body
    return dict(body)


# Logs.


def log_events(process: Process) -> Counter[str]:
    """Count the JSON log lines of ``process`` by event, and error lines as ``level:error``."""
    counts: Counter[str] = Counter()
    for line in process.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            counts["unparsed_line"] += 1
            continue
        counts[str(record.get("event"))] += 1
        if record.get("level") in ("error", "critical"):
            counts["level:error"] += 1
    return counts


def error_lines(process: Process) -> list[str]:
    return [
        line[:2000]
        for line in process.log_text().splitlines()
        if '"level": "error"' in line or '"level": "critical"' in line
    ]


# The test.


@pytest.fixture(scope="module")
def fuzz_cluster(tmp_path_factory: pytest.TempPathFactory, rabbitmq: str) -> Iterator[Cluster]:
    folder: Path = tmp_path_factory.mktemp("fuzz")
    with cluster_of(folder, "sqlite", "fuzz") as cluster:
        cluster.start_engine()
        cluster.start_agent()
        yield cluster


def process_of(cluster: Cluster, kind: str) -> Process:
    return next(process for process in cluster.processes if process.args[0] == kind)


def queues_drained(namespace: str) -> bool:
    """Return whether the engine's queues and the task queue hold no ready message."""
    queues = ("engine.requests", "engine.results", "tasks.default")
    return all(queue_depth(namespace, queue) == 0 for queue in queues)


def messages_held(namespace: str) -> int | None:
    """Return how many messages the namespace's queues hold, ready or delivered and not yet
    acknowledged, or None when rabbitmqctl is not available (it needs root)."""
    try:
        output = subprocess.run(
            ["rabbitmqctl", "list_queues", "name", "messages", "--quiet", "--no-table-headers"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.split() for line in output.splitlines() if line.startswith(namespace + ".")]
    return sum(int(row[1]) for row in rows if len(row) == 2)


def wait_until_drained(namespace: str) -> None:
    """Wait until no message is ready, then, where rabbitmqctl runs, until none is held
    either: requests that name an unknown run go back to the queue for 2 seconds."""
    wait_until(lambda: queues_drained(namespace), 30, message="the queues to drain")
    if messages_held(namespace) is not None:
        wait_until(
            lambda: messages_held(namespace) == 0,
            30,
            interval=0.2,
            message="no unacknowledged messages",
        )


def start_victims(cluster: Cluster) -> tuple[list[str], list[str]]:
    keys = [f"victim-{index}" for index in range(VICTIMS)]
    run_ids = [start(cluster, "Waiter", key) for key in keys]
    for run_id in run_ids:
        wait_until_waiting_for(cluster, run_id, ["Go"])
    return run_ids, [f"waiter-{key}" for key in keys]


def finish_victim(cluster: Cluster, run_id: str) -> str:
    """Resume or wake a victim as needed, wait until it ends, and return its status.

    Fuzzed events, results and control requests may have killed, paused, woken or failed
    it; whatever they did, it must still be able to finish.
    """
    with cluster.client() as client:
        status = client.get_run(run_id)["status"]
        if status == "paused":
            client.resume(run_id)
            status = client.get_run(run_id)["status"]
        if status == "running" and cluster.database.scalar(
            "SELECT waiting_for FROM runs WHERE id = :id", id=run_id
        ):
            send(cluster, run_id, "Go", 21)
        with contextlib.suppress(RunFailed):
            client.wait(run_id, timeout=20)
        return str(client.get_run(run_id)["status"])


def test_engine_survives_fuzzed_messages(fuzz_cluster: Cluster) -> None:
    cluster = fuzz_cluster
    engine = process_of(cluster, "engine")
    agent = process_of(cluster, "agent")
    fuzz_seed = int(os.environ.get("ZENFLOW_FUZZ_SEED") or random.randrange(2**32))
    print(f"fuzz seed {fuzz_seed} (set ZENFLOW_FUZZ_SEED={fuzz_seed} to repeat this run)")
    victim_run_ids, victim_business_ids = start_victims(cluster)
    names = Names(
        cluster.namespace,
        f"{cluster.namespace}.fuzz-replies",
        tuple(victim_run_ids),
        tuple(victim_business_ids),
    )

    began = time.monotonic()
    rng = random.Random(fuzz_seed)
    requests = with_mutants(
        generate(messages(names, "request"), GENERATED["request"], fuzz_seed), rng
    )
    results = with_mutants(
        generate(messages(names, "result"), GENERATED["result"], fuzz_seed + 1), rng
    )
    batch = build_batch(names, requests, results)
    generated = time.monotonic()
    replies = ReplyQueue(names.reply_queue)

    async def fuzz() -> int:
        await replies.open()
        try:
            sent = await publish_all(AMQP_URL, batch.outgoing)
            deadline = time.monotonic() + 40
            while len(replies.replies) < len(batch.expected_replies):
                assert time.monotonic() < deadline, (
                    f"{len(replies.replies)} of {len(batch.expected_replies)} replies arrived "
                    f"within 40 s; the engine log ends with:\n{engine.log_text()[-3000:]}"
                )
                await asyncio.sleep(0.05)
            return sent
        finally:
            await replies.close()

    sent = asyncio.run(fuzz())
    published = time.monotonic()
    wait_until_drained(cluster.namespace)
    drained = time.monotonic()

    assert engine.popen.poll() is None, engine.log_text()[-3000:]
    assert agent.popen.poll() is None, agent.log_text()[-3000:]
    correlation_ids = Counter(reply.correlation_id for reply in replies.replies)
    repeated = [key for key, count in correlation_ids.items() if count > 1]
    assert repeated == [], f"requests answered more than once: {repeated[:5]}"
    assert set(correlation_ids) == batch.expected_replies
    bodies = [check_reply(reply) for reply in replies.replies]
    accepted = sum(body["ok"] for body in bodies)
    codes = Counter(body["error"]["code"] for body in bodies if not body["ok"])
    events = log_events(engine)
    rejected = events["request_rejected"] + events["result_rejected"]
    # Each message is rejected at most once; the replies the engine sends to its own queues
    # come back as messages of their own.
    assert rejected <= sent + batch.bounced
    assert events["message_property_dropped"] >= batch.undecodable
    assert events["message_property_dropped"] <= batch.properties
    assert error_lines(engine) == []
    assert error_lines(agent) == []
    print(
        f"sent {sent} messages ({len(requests)} requests, {len(results)} results), "
        f"{len(replies.replies)} replies ({accepted} accepted, errors {dict(codes)}), "
        f"{events['request_rejected']} requests and {events['result_rejected']} results "
        f"rejected in the engine log, {events['message_property_dropped']} properties dropped, "
        f"{batch.undecodable} messages with non-UTF-8 properties; generated in "
        f"{generated - began:.1f} s, published and answered in {published - generated:.1f} s, "
        f"drained in {drained - published:.1f} s"
    )

    values = [7, -3, 2**70, 0]
    run_ids = [start(cluster, "Pipeline", value) for value in values]
    for value, run_id in zip(values, run_ids, strict=True):
        assert result_of(cluster, run_id) == [2 * value, 2 * value]
    statuses = [finish_victim(cluster, run_id) for run_id in victim_run_ids]
    assert set(statuses) <= {"completed", "failed", "killed"}, statuses
    print(f"victims ended as {statuses}")

    wait_until_drained(cluster.namespace)
    later = log_events(engine)
    assert later["request_rejected"] == events["request_rejected"]
    assert later["result_rejected"] == events["result_rejected"]
    assert error_lines(engine) == []
    assert error_lines(agent) == []


# Regressions for what the fuzz test found.

# Properties that pamqp 4.0 cannot decode: a correlation id that is not UTF-8, a timestamp
# beyond the year 9999, and a header key that is not UTF-8.
UNDECODABLE = {"correlation_id": b"\xff\xfe", "timestamp": 2**64 - 1, "headers": {b"\xfe": 1}}


def test_undecodable_properties_dropped(fuzz_cluster: Cluster) -> None:
    """One message with such properties used to close the consumer's connection at each of
    its deliveries, which stopped the engine or the agent that consumed it for good."""
    cluster = fuzz_cluster
    namespace = cluster.namespace
    engine = process_of(cluster, "engine")
    agent = process_of(cluster, "agent")
    engine_before = log_events(engine)
    agent_before = log_events(agent)
    errors_before = len(error_lines(engine)) + len(error_lines(agent))
    run_id = f"undecodable-{uuid.uuid4().hex}"
    body = {"version": 1, "type": "start", "workflow": "Pipeline", "args": [5], "run_id": run_id}
    outgoing = [
        Outgoing("", f"{namespace}.engine.results", b"\x80", UNDECODABLE),
        Outgoing("", f"{namespace}.tasks.default", b"\x80", UNDECODABLE),
        Outgoing(
            f"{namespace}.engine",
            "requests",
            encode_json(body),
            {**UNDECODABLE, "content_type": JSON},
        ),
    ]

    asyncio.run(publish_all(AMQP_URL, outgoing))

    # The run's task messages queue up behind the undecodable one in tasks.default.
    assert result_of(cluster, run_id) == [10, 10]
    wait_until_drained(namespace)
    engine_after = log_events(engine)
    agent_after = log_events(agent)
    dropped = "message_property_dropped"
    assert engine_after[dropped] - engine_before[dropped] == 6
    assert engine_after["result_rejected"] - engine_before["result_rejected"] == 1
    assert agent_after[dropped] - agent_before[dropped] == 3
    assert agent_after["task_message_rejected"] - agent_before["task_message_rejected"] == 1
    assert len(error_lines(engine)) + len(error_lines(agent)) == errors_before


class JsonEntry:
    """A pika connection that sends JSON requests to the engine and reads the replies."""

    def __init__(self, namespace: str) -> None:
        self.exchange = f"{namespace}.engine"
        self.connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.reply_queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.replies: dict[str, dict[str, Any]] = {}

    def publish(self, body: dict[str, Any], correlation_id: str | None = None) -> None:
        """Publish a request with a message id; with a reply queue if ``correlation_id``."""
        properties = pika.BasicProperties(
            content_type=JSON,
            message_id=f"m-{uuid.uuid4()}",
            reply_to=self.reply_queue if correlation_id else None,
            correlation_id=correlation_id,
        )
        self.channel.basic_publish(self.exchange, "requests", encode_json(body), properties)

    def wait_for_replies(self, correlation_ids: list[str]) -> None:
        def arrived() -> bool:
            while True:
                method, properties, body = self.channel.basic_get(self.reply_queue, auto_ack=True)
                if method is None:
                    return all(key in self.replies for key in correlation_ids)
                self.replies[properties.correlation_id] = json.loads(body)

        wait_until(arrived, 30, message=f"replies to {len(correlation_ids)} requests")

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def json_entry(fuzz_cluster: Cluster) -> Iterator[JsonEntry]:
    entry = JsonEntry(fuzz_cluster.namespace)
    try:
        yield entry
    finally:
        entry.close()


def test_event_before_start_delivered_after_100(json_entry: JsonEntry) -> None:
    """An event that overtakes the start of its run is requeued until the run exists. The
    engine used to keep a record of each such event after its delivery, and once it held
    100 of them it replied run_not_found to every later one."""
    tag = uuid.uuid4().hex[:8]

    def race(keys: list[str]) -> None:
        for key in keys:
            event = {"version": 1, "type": "event", "business_id": f"waiter-{key}"}
            json_entry.publish({**event, "name": "Go", "data": 1}, correlation_id=key)
        for key in keys:
            json_entry.publish({"version": 1, "type": "start", "workflow": "Waiter", "args": [key]})
        json_entry.wait_for_replies(keys)

    race([f"race-{tag}-{index}" for index in range(100)])
    race([f"race-{tag}-last"])

    refused = {key: reply for key, reply in json_entry.replies.items() if not reply["ok"]}
    assert refused == {}
    assert json_entry.replies[f"race-{tag}-last"]["delivered"] is True


# JSON text with a lone surrogate in one field, which json.loads accepts.
SURROGATE_REQUESTS = {
    "business_id": '{"version": 1, "type": "start", "workflow": "Waiter", "args": ["k"], '
    '"business_id": "a\\ud800"}',
    "run": '{"version": 1, "type": "event", "run": "\\udc00", "name": "Go"}',
    "by": '{"version": 1, "type": "kill", "run": "waiter-victim-0", "by": "\\udfff"}',
    "reason": '{"version": 1, "type": "pause", "run_id": "r-1", "reason": "why \\ud83d"}',
}


@pytest.mark.parametrize("field", SURROGATE_REQUESTS)
def test_lone_surrogate_rejected(field: str, json_entry: JsonEntry) -> None:
    """Such a text used to reach the database, which failed it: an internal_error reply."""
    correlation_id = f"surrogate-{uuid.uuid4().hex}"
    properties = pika.BasicProperties(
        content_type=JSON, reply_to=json_entry.reply_queue, correlation_id=correlation_id
    )
    body = SURROGATE_REQUESTS[field].encode()
    json_entry.channel.basic_publish(json_entry.exchange, "requests", body, properties)

    json_entry.wait_for_replies([correlation_id])

    reply = json_entry.replies[correlation_id]
    assert reply["ok"] is False
    assert reply["error"]["code"] == "invalid_field"
    assert reply["error"]["field"] == field
    assert "lone surrogates" in reply["error"]["message"]
