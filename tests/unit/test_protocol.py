"""Tests for zenflow.protocol: body decoding, request validation and reply encoding."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zenflow import serializer
from zenflow.errors import SerializationError
from zenflow.protocol import (
    JSON_CONTENT_TYPE,
    MAX_BUSINESS_ID_LENGTH,
    MSGPACK_CONTENT_TYPE,
    GetRunRequest,
    InvalidMessage,
    StartRequest,
    TaskMessage,
    TaskResult,
    decode_body,
    encode_body,
    is_json,
    parse_request,
)

PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def parse_error(body: Any) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as caught:
        parse_request(body)
    return caught.value


def start(**fields: Any) -> dict[str, Any]:
    return {"version": 1, "type": "start", "workflow": "billing.charge", **fields}


def get_run(**fields: Any) -> dict[str, Any]:
    return {"version": 1, "type": "get_run", **fields}


# decode_body.


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        " application/json ;charset=UTF-8",
        "Application/JSON",
    ],
)
def test_json_content_types_decode_as_json(content_type: str) -> None:
    assert decode_body(b'{"a": [1, 2]}', content_type) == {"a": [1, 2]}


@pytest.mark.parametrize(
    "content_type",
    [None, "", MSGPACK_CONTENT_TYPE, "application/x-msgpack; v=1", "Application/X-Msgpack"],
)
def test_msgpack_content_types_decode_as_msgpack(content_type: str | None) -> None:
    value = {"when": dt.datetime(2024, 5, 1, tzinfo=dt.UTC), "pair": (1, 2)}
    assert decode_body(serializer.encode(value), content_type) == value


def test_json_body_keeps_json_types() -> None:
    decoded = decode_body(b'{"n": 1.5, "t": true, "z": null, "s": "x"}', JSON_CONTENT_TYPE)
    assert decoded == {"n": 1.5, "t": True, "z": None, "s": "x"}


def test_body_too_large() -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode_body(b"x" * 11, JSON_CONTENT_TYPE, max_bytes=10)
    assert caught.value.code == "body_too_large"
    assert "11 bytes" in str(caught.value)


def test_body_at_size_limit_is_accepted() -> None:
    body = json_bytes({"k": "v"})
    assert decode_body(body, JSON_CONTENT_TYPE, max_bytes=len(body)) == {"k": "v"}


def test_size_limit_applies_to_msgpack() -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode_body(serializer.encode("x" * 100), None, max_bytes=50)
    assert caught.value.code == "body_too_large"


@pytest.mark.parametrize(
    "body",
    [b"{", b"", b"{'a': 1}", b"\xff\xfe", b"[1, 2,]", b"\xef\xbb\xbf{}", b"[" * 100_000],
    ids=["unclosed", "empty", "single quotes", "not utf-8", "trailing comma", "bom", "deep"],
)
def test_invalid_json_is_rejected(body: bytes) -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode_body(body, JSON_CONTENT_TYPE)
    assert caught.value.code == "invalid_body"


def test_deeply_nested_json_is_rejected() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InvalidMessage) as caught:
        decode_body(body, JSON_CONTENT_TYPE)
    assert caught.value.code == "invalid_body"


@pytest.mark.parametrize(
    "body", [b"", b"\xc1", b"\x92\x01", b"\x01\x02", b"\xc7\x01\x2a\x00", b"\x91" * 5000]
)
def test_invalid_msgpack_is_rejected(body: bytes) -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode_body(body, MSGPACK_CONTENT_TYPE)
    assert caught.value.code == "invalid_body"


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "json", "*/*"])
def test_unsupported_content_type_is_rejected(content_type: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode_body(b"{}", content_type)
    assert caught.value.code == "invalid_body"
    assert repr(content_type) in str(caught.value)


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("APPLICATION/JSON", True),
        ("application/jsonp", False),
        (MSGPACK_CONTENT_TYPE, False),
        ("", False),
        (None, False),
    ],
)
def test_is_json(content_type: str | None, expected: bool) -> None:
    assert is_json(content_type) is expected


# parse_request: valid requests.


def test_minimal_start_request() -> None:
    request = parse_request(start())
    assert request == StartRequest(workflow="billing.charge", args=(), kwargs={})


def test_full_start_request() -> None:
    body = start(
        args=[1, "two"], kwargs={"amount": 5}, run_id="run_01-A", business_id="order 42 / é"
    )
    request = parse_request(body)
    assert request == StartRequest(
        workflow="billing.charge",
        args=(1, "two"),
        kwargs={"amount": 5},
        run_id="run_01-A",
        business_id="order 42 / é",
    )


def test_start_args_may_be_tuple() -> None:
    request = parse_request(start(args=(1, 2)))
    assert request.args == (1, 2)


def test_start_request_round_trips_through_body() -> None:
    request = StartRequest("w", (1, [2]), {"k": {"n": 3}}, run_id="r1", business_id="b1")
    assert parse_request(request.to_body()) == request


def test_start_request_round_trips_through_msgpack() -> None:
    request = StartRequest("w", (dt.date(2024, 1, 1), (1, 2)), {"k": {3}}, run_id="r1")
    body = decode_body(serializer.encode(request.to_body()), MSGPACK_CONTENT_TYPE)
    assert parse_request(body) == request


def test_run_id_of_64_characters_is_accepted() -> None:
    run_id = "a" * 64
    assert parse_request(get_run(run_id=run_id)) == GetRunRequest(run_id=run_id)


def test_business_id_at_limit_is_accepted() -> None:
    business_id = "b" * MAX_BUSINESS_ID_LENGTH
    request = parse_request(start(business_id=business_id))
    assert request.business_id == business_id


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"run_id": "r-1"}, GetRunRequest(run_id="r-1")),
        ({"business_id": "order-7"}, GetRunRequest(business_id="order-7")),
        ({"run_id": "r", "business_id": "b"}, GetRunRequest(run_id="r", business_id="b")),
    ],
)
def test_get_run_request(fields: dict[str, Any], expected: GetRunRequest) -> None:
    assert parse_request(get_run(**fields)) == expected


def test_get_run_request_round_trips_through_body() -> None:
    request = GetRunRequest(run_id="r", business_id="b")
    assert parse_request(request.to_body()) == request


# parse_request: invalid requests.

INVALID_REQUESTS = [
    ("missing version", {"type": "start", "workflow": "w"}, "missing_field", "version"),
    ("null version", start(version=None), "missing_field", "version"),
    ("version 2", start(version=2), "unsupported_version", "version"),
    ("version 0", start(version=0), "unsupported_version", "version"),
    ("version true", start(version=True), "unsupported_version", "version"),
    ("version 1.0", start(version=1.0), "unsupported_version", "version"),
    ("version text", start(version="1"), "unsupported_version", "version"),
    ("version decimal", start(version=decimal.Decimal(1)), "unsupported_version", "version"),
    ("missing type", {"version": 1, "workflow": "w"}, "missing_field", "type"),
    ("unknown type", start(type="stop"), "invalid_field", "type"),
    ("type not text", start(type=7), "invalid_field", "type"),
    ("missing workflow", {"version": 1, "type": "start"}, "missing_field", "workflow"),
    ("workflow number", start(workflow=7), "invalid_field", "workflow"),
    ("workflow empty", start(workflow=""), "invalid_field", "workflow"),
    ("workflow list", start(workflow=["w"]), "invalid_field", "workflow"),
    ("args text", start(args="abc"), "invalid_field", "args"),
    ("args map", start(args={"a": 1}), "invalid_field", "args"),
    ("args null", start(args=None), "invalid_field", "args"),
    ("kwargs list", start(kwargs=[1]), "invalid_field", "kwargs"),
    ("kwargs text", start(kwargs="a=1"), "invalid_field", "kwargs"),
    ("kwargs int key", start(kwargs={1: "x"}), "invalid_field", "kwargs"),
    ("kwargs tuple key", start(kwargs={("a",): "x"}), "invalid_field", "kwargs"),
    ("run_id space", start(run_id="run 1"), "invalid_field", "run_id"),
    ("run_id slash", start(run_id="run/1"), "invalid_field", "run_id"),
    ("run_id dot", start(run_id="run.1"), "invalid_field", "run_id"),
    ("run_id newline", start(run_id="run1\n"), "invalid_field", "run_id"),
    ("run_id accent", start(run_id="rün"), "invalid_field", "run_id"),
    ("run_id 65 chars", start(run_id="a" * 65), "invalid_field", "run_id"),
    ("run_id empty", start(run_id=""), "invalid_field", "run_id"),
    ("run_id number", start(run_id=12), "invalid_field", "run_id"),
    (
        "business_id too long",
        start(business_id="b" * (MAX_BUSINESS_ID_LENGTH + 1)),
        "invalid_field",
        "business_id",
    ),
    ("business_id empty", start(business_id=""), "invalid_field", "business_id"),
    ("business_id number", start(business_id=5), "invalid_field", "business_id"),
    ("business_id NUL", start(business_id="order\x00-1"), "invalid_field", "business_id"),
    ("business_id newline", start(business_id="order\n1"), "invalid_field", "business_id"),
    ("get_run without ids", get_run(), "missing_field", "run_id"),
    ("get_run null ids", get_run(run_id=None, business_id=None), "missing_field", "run_id"),
    ("get_run bad run_id", get_run(run_id="a b"), "invalid_field", "run_id"),
    ("get_run empty business_id", get_run(business_id=""), "invalid_field", "business_id"),
    ("body list", [1, 2], "invalid_body", None),
    ("body text", "start", "invalid_body", None),
    ("body null", None, "invalid_body", None),
    ("body bytes", b"{}", "invalid_body", None),
]


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [case[1:] for case in INVALID_REQUESTS],
    ids=[case[0] for case in INVALID_REQUESTS],
)
def test_invalid_request_is_rejected(body: Any, code: str, field: str | None) -> None:
    error = parse_error(body)
    assert error.code == code
    assert error.field == field


def test_error_names_field_in_to_error() -> None:
    error = parse_error(start(run_id="a b"))
    assert error.to_error() == {"code": "invalid_field", "message": str(error), "field": "run_id"}


def test_error_without_field_omits_it() -> None:
    error = parse_error([1])
    assert "field" not in error.to_error()


def test_error_message_shortens_long_values() -> None:
    error = parse_error(start(type="x" * 10_000))
    assert len(str(error)) < 200


def test_deeply_nested_value_in_error_message() -> None:
    # msgpack allows 1024 nested arrays, so repr() of this type would raise RecursionError.
    body = b"\x82\xa7version\x01\xa4type" + b"\x91" * 1000 + b"\x00"
    error = parse_error(decode_body(body, MSGPACK_CONTENT_TYPE))
    assert error.code == "invalid_field"
    assert error.field == "type"


def test_huge_int_in_error_message() -> None:
    error = parse_error(start(version=10**5000))
    assert error.code == "unsupported_version"


# TaskMessage.


def task_message() -> TaskMessage:
    return TaskMessage(
        run_id="run-1",
        workflow="billing.charge",
        step=3,
        attempt=2,
        task="billing.send_invoice",
        args=(1, "two", dt.date(2024, 1, 1)),
        kwargs={"amount": decimal.Decimal("9.99")},
    )


def test_task_message_round_trip() -> None:
    message = task_message()
    assert TaskMessage.from_body(message.to_body()) == message


def test_task_message_round_trip_through_msgpack() -> None:
    message = task_message()
    body = serializer.decode(serializer.encode(message.to_body()))
    assert TaskMessage.from_body(body) == message


def test_task_message_correlation_id() -> None:
    assert task_message().correlation_id == "run-1:3:2"


@pytest.mark.parametrize(
    "field", ["run_id", "workflow", "step", "attempt", "task", "args", "kwargs"]
)
def test_task_message_missing_field(field: str) -> None:
    body = task_message().to_body()
    del body[field]
    with pytest.raises(InvalidMessage) as caught:
        TaskMessage.from_body(body)
    assert caught.value.code == "missing_field"
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("run_id", 1),
        ("workflow", None),
        ("step", True),
        ("step", "3"),
        ("step", 3.0),
        ("attempt", False),
        ("attempt", None),
        ("task", b"task"),
        ("args", "abc"),
        ("args", (1, 2)),
        ("kwargs", [1]),
        ("kwargs", {1: "x"}),
    ],
)
def test_task_message_mistyped_field(field: str, value: Any) -> None:
    body = {**task_message().to_body(), field: value}
    with pytest.raises(InvalidMessage) as caught:
        TaskMessage.from_body(body)
    assert caught.value.code == "invalid_field"
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("changes", "code", "field"),
    [
        ({"type": "task_result"}, "invalid_field", "type"),
        ({"type": None}, "invalid_field", "type"),
        ({"version": 2}, "unsupported_version", "version"),
        ({"version": None}, "missing_field", "version"),
    ],
)
def test_task_message_header_rejected(changes: dict[str, Any], code: str, field: str) -> None:
    body = {**task_message().to_body(), **changes}
    with pytest.raises(InvalidMessage) as caught:
        TaskMessage.from_body(body)
    assert caught.value.code == code
    assert caught.value.field == field


@pytest.mark.parametrize("body", [None, [], "task"])
def test_task_message_body_not_map(body: Any) -> None:
    with pytest.raises(InvalidMessage) as caught:
        TaskMessage.from_body(body)
    assert caught.value.code == "invalid_body"


# TaskResult.


def ok_result() -> TaskResult:
    return TaskResult(
        run_id="run-1",
        step=3,
        attempt=1,
        ok=True,
        value={"total": decimal.Decimal("10.50"), "at": dt.datetime(2024, 1, 1)},
        agent="agent-7",
        started_at=1700000000.25,
        finished_at=1700000001.5,
    )


def failed_result() -> TaskResult:
    error = {"type": "ValueError", "message": "bad amount", "traceback": "Traceback ..."}
    return TaskResult(run_id="run-1", step=3, attempt=2, ok=False, error=error, agent="a")


@pytest.mark.parametrize(("field", "value"), [("step", 0), ("attempt", -1), ("step", 2**31)])
def test_task_result_counter_out_of_range(field: str, value: int) -> None:
    body = {**ok_result().to_body(), field: value}
    with pytest.raises(InvalidMessage) as caught:
        TaskResult.from_body(body)
    assert caught.value.field == field
    assert str(value) in str(caught.value)


def test_task_result_agent_control_characters_replaced() -> None:
    body = {**ok_result().to_body(), "agent": "host\x1b[31m:1"}
    assert TaskResult.from_body(body).agent == "host?[31m:1"


@pytest.mark.parametrize("make_result", [ok_result, failed_result], ids=["ok", "failed"])
def test_task_result_round_trip(make_result: Any) -> None:
    result = make_result()
    assert TaskResult.from_body(result.to_body()) == result


@pytest.mark.parametrize("make_result", [ok_result, failed_result], ids=["ok", "failed"])
def test_task_result_round_trip_through_msgpack(make_result: Any) -> None:
    result = make_result()
    body = serializer.decode(serializer.encode(result.to_body()))
    assert TaskResult.from_body(body) == result


def test_failed_result_requires_error_map() -> None:
    body = {**failed_result().to_body(), "error": "boom"}
    with pytest.raises(InvalidMessage) as caught:
        TaskResult.from_body(body)
    assert caught.value.code == "invalid_field"
    assert caught.value.field == "error"


def test_failed_result_fills_error_defaults() -> None:
    body = {**failed_result().to_body(), "error": {}}
    result = TaskResult.from_body(body)
    assert result.error == {"type": "Error", "message": "", "traceback": ""}


def test_failed_result_converts_error_fields_to_text() -> None:
    body = {**failed_result().to_body(), "error": {"type": 5, "message": None, "extra": 1}}
    result = TaskResult.from_body(body)
    assert result.error == {"type": "5", "message": "None", "traceback": ""}


def test_failed_result_with_huge_int_error_field() -> None:
    body = {**failed_result().to_body(), "error": {"message": 10**5000}}
    result = TaskResult.from_body(body)
    assert isinstance(result.error["message"], str)


def test_ok_result_drops_error() -> None:
    body = {**ok_result().to_body(), "error": {"type": "X"}}
    assert TaskResult.from_body(body).error is None


@pytest.mark.parametrize("field", ["run_id", "step", "attempt", "ok"])
def test_task_result_missing_field(field: str) -> None:
    body = ok_result().to_body()
    del body[field]
    with pytest.raises(InvalidMessage) as caught:
        TaskResult.from_body(body)
    assert caught.value.code == "missing_field"
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("run_id", None),
        ("step", True),
        ("step", "3"),
        ("attempt", 1.0),
        ("attempt", False),
        ("ok", 1),
        ("ok", "true"),
        ("ok", None),
    ],
)
def test_task_result_mistyped_field(field: str, value: Any) -> None:
    body = {**ok_result().to_body(), field: value}
    with pytest.raises(InvalidMessage) as caught:
        TaskResult.from_body(body)
    assert caught.value.code == "invalid_field"
    assert caught.value.field == field


def test_task_result_wrong_type() -> None:
    body = {**ok_result().to_body(), "type": "task"}
    with pytest.raises(InvalidMessage) as caught:
        TaskResult.from_body(body)
    assert caught.value.field == "type"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(5, 5.0), (2.5, 2.5), (None, None), ("5", None), (True, None), (10**400, None)],
    ids=["int", "float", "null", "text", "bool", "huge int"],
)
def test_task_result_timestamps(value: Any, expected: float | None) -> None:
    body = {**ok_result().to_body(), "started_at": value}
    assert TaskResult.from_body(body).started_at == expected


def test_task_result_agent_defaults_to_empty() -> None:
    body = {**ok_result().to_body(), "agent": None}
    assert TaskResult.from_body(body).agent == ""


def test_task_result_fields_cover_body() -> None:
    names = {field.name for field in dataclasses.fields(TaskResult)}
    result = dataclasses.replace(ok_result(), non_retryable=True, retry_decided=True)
    body_keys = set(result.to_body()) - {"version", "type"}
    # retry_decided is encoded as the presence of retry_delay.
    assert body_keys == names - {"retry_decided"}


def test_retry_fields_of_a_result_survive_the_round_trip() -> None:
    result = dataclasses.replace(
        ok_result(), ok=False, error={"type": "E", "message": "m", "traceback": ""}
    )
    for fields in (
        {"non_retryable": True},
        {"retry_decided": True, "retry_delay": 2.5},
        {"retry_decided": True, "retry_delay": None},
        {},
    ):
        sent = dataclasses.replace(result, **fields)
        assert TaskResult.from_body(sent.to_body()) == sent


def test_a_result_without_retry_fields_leaves_the_decision_to_the_policy() -> None:
    body = ok_result().to_body()
    parsed = TaskResult.from_body(body)
    assert (parsed.non_retryable, parsed.retry_decided) == (False, False)


# Hostile bodies at the public entry.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=15,
)
field_names = st.sampled_from(
    ["version", "type", "workflow", "args", "kwargs", "run_id", "business_id"]
)
field_values = json_values | st.sampled_from(
    [1, 2, True, "start", "get_run", "w", "run-1", "", "a" * 300, [], {}]
)
request_like = st.dictionaries(field_names, field_values, max_size=7)


def parse_or_reject(body: bytes, content_type: str | None) -> None:
    """Decode and parse ``body``; InvalidMessage is fine, any other exception fails the test."""
    try:
        request = parse_request(decode_body(body, content_type, max_bytes=4096))
    except InvalidMessage as error:
        assert error.code in {
            "body_too_large",
            "invalid_body",
            "missing_field",
            "invalid_field",
            "unsupported_version",
        }
        return
    assert isinstance(request, StartRequest | GetRunRequest)


@PROPERTY_SETTINGS
@given(json_values | request_like)
def test_json_values_raise_only_invalid_message(value: Any) -> None:
    parse_or_reject(json_bytes(value), JSON_CONTENT_TYPE)


@PROPERTY_SETTINGS
@given(json_values | request_like)
def test_msgpack_values_raise_only_invalid_message(value: Any) -> None:
    parse_or_reject(serializer.encode(value), MSGPACK_CONTENT_TYPE)


@PROPERTY_SETTINGS
@given(st.binary(max_size=300), st.sampled_from([None, JSON_CONTENT_TYPE, "text/plain"]))
def test_random_bytes_raise_only_invalid_message(body: bytes, content_type: str | None) -> None:
    parse_or_reject(body, content_type)


@PROPERTY_SETTINGS
@given(request_like)
def test_accepted_start_request_is_well_formed(value: dict[str, Any]) -> None:
    try:
        request = parse_request({**value, "version": 1, "type": "start"})
    except InvalidMessage:
        return
    assert isinstance(request.workflow, str)
    assert isinstance(request.args, tuple)
    assert all(isinstance(key, str) for key in request.kwargs)


# encode_body.


def json_reply(body: Any) -> Any:
    data, content_type = encode_body(body, JSON_CONTENT_TYPE)
    assert content_type == JSON_CONTENT_TYPE
    return json.loads(data.decode("utf-8"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC), "2024-05-01T12:30:00+00:00"),
        (dt.date(2024, 5, 1), "2024-05-01"),
        (dt.time(8, 15), "08:15:00"),
        (dt.timedelta(minutes=2), 120.0),
        (decimal.Decimal("10.50"), "10.50"),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        (b"\x01\xff", "01ff"),
        ((1, "a"), [1, "a"]),
        ({3}, [3]),
        (frozenset({4}), [4]),
        (2**70, 2**70),
    ],
)
def test_json_reply_converts_msgpack_values(value: Any, expected: Any) -> None:
    assert json_reply({"v": value}) == {"v": expected}


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (1, "1"),
        (True, "true"),
        (None, "null"),
        ((1, 2), "[1, 2]"),
        ((1, (2, "x")), '[1, [2, "x"]]'),
        (frozenset({5}), "[5]"),
        (dt.date(2024, 5, 1), "2024-05-01"),
        (decimal.Decimal("1.5"), "1.5"),
        (uuid.UUID(int=2), "00000000-0000-0000-0000-000000000002"),
        (b"\x0a", "0a"),
        ((dt.date(2024, 5, 1), b"\x01"), '["2024-05-01", "01"]'),
    ],
    ids=[
        "int",
        "bool",
        "null",
        "tuple",
        "nested tuple",
        "frozenset",
        "date",
        "decimal",
        "uuid",
        "bytes",
        "tuple of date and bytes",
    ],
)
def test_json_reply_converts_keys_to_text(key: Any, expected: str) -> None:
    assert json_reply({key: "v"}) == {expected: "v"}


def test_json_reply_converts_nested_keys() -> None:
    body = {"result": [{(1, 2): {3: (4, {5})}}]}
    assert json_reply(body) == {"result": [{"[1, 2]": {"3": [4, [5]]}}]}


def test_json_reply_writes_lone_surrogate_as_escape() -> None:
    assert json_reply({"name": "bad \ud800"}) == {"name": "bad \ud800"}


def test_json_reply_writes_huge_int_as_hex() -> None:
    assert json_reply({"n": 10**5000}) == {"n": hex(10**5000)}


def test_json_reply_rejects_cycle() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(SerializationError):
        encode_body({"v": cycle}, JSON_CONTENT_TYPE)


def test_msgpack_reply_is_default() -> None:
    body = {"when": dt.date(2024, 1, 1), (1, 2): "tuple key"}
    data, content_type = encode_body(body, None)
    assert content_type == MSGPACK_CONTENT_TYPE
    assert serializer.decode(data) == body


def test_msgpack_reply_rejects_unencodable() -> None:
    with pytest.raises(SerializationError) as caught:
        encode_body({"v": object()}, MSGPACK_CONTENT_TYPE)
    assert caught.value.path == "reply['v']"


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.binary()
    | st.decimals()
    | st.uuids()
    | st.dates()
    | st.times()
    | st.timedeltas()
    | st.datetimes(timezones=st.none() | st.timezones()),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text() | st.integers() | st.tuples(st.integers(), st.text()), children)
        | st.frozensets(st.integers() | st.text(), max_size=4)
    ),
    max_leaves=15,
)


@PROPERTY_SETTINGS
@given(msgpack_values)
def test_json_reply_accepts_msgpack_values(value: Any) -> None:
    data, _ = encode_body({"value": value}, JSON_CONTENT_TYPE)
    assert isinstance(json.loads(data.decode("utf-8")), dict)
