"""Tests for zenflow.serializer: exact round trips, error paths and hostile input."""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import decimal
import enum
import math
import uuid
from typing import Any
from zoneinfo import ZoneInfo

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zenflow import serializer
from zenflow.errors import SerializationError
from zenflow.serializer import (
    EXT_BIGINT,
    EXT_DATE,
    EXT_DATETIME,
    EXT_DECIMAL,
    EXT_FROZENSET,
    EXT_SET,
    EXT_TIME,
    EXT_TIMEDELTA,
    EXT_TUPLE,
    EXT_UUID,
    MAX_DEPTH,
    decode,
    encode,
)

PROPERTY_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def round_trip(value: Any) -> Any:
    return decode(encode(value))


def find_equal(items: set[Any] | frozenset[Any], expected: Any) -> Any:
    """Return the item of ``items`` equal to ``expected``, so its exact type can be checked."""
    matches = [item for item in items if item == expected]
    assert len(matches) == 1, f"{len(matches)} items equal to {expected!r}"
    return matches[0]


def assert_same_zone(expected: dt.tzinfo | None, actual: dt.tzinfo | None, path: str) -> None:
    assert type(actual) is type(expected), f"{path}: zone type {type(actual).__name__}"
    if isinstance(expected, ZoneInfo):
        assert actual.key == expected.key, f"{path}: zone key {actual.key!r}"
    if isinstance(expected, dt.timezone):
        offset = actual.utcoffset(None)
        assert offset == expected.utcoffset(None), f"{path}: zone offset {offset}"


def assert_identical(expected: Any, actual: Any, path: str = "value") -> None:
    """Assert that ``actual`` equals ``expected`` with the same type at every level.

    ``==`` alone would accept a list for a tuple, an int for a float key, an aware datetime
    in another zone at the same instant, or Decimal('1') for Decimal('1.0').
    """
    assert type(actual) is type(expected), (
        f"{path}: {type(actual).__name__} instead of {type(expected).__name__}"
    )
    if type(expected) in (list, tuple):
        assert len(actual) == len(expected), f"{path}: length {len(actual)}"
        for index, (expected_item, actual_item) in enumerate(zip(expected, actual, strict=True)):
            assert_identical(expected_item, actual_item, f"{path}[{index}]")
    elif type(expected) is dict:
        assert len(actual) == len(expected), f"{path}: {len(actual)} keys"
        pairs = zip(expected.items(), actual.items(), strict=True)
        for (expected_key, expected_item), (actual_key, actual_item) in pairs:
            assert_identical(expected_key, actual_key, f"{path} key {expected_key!r}")
            assert_identical(expected_item, actual_item, f"{path}[{expected_key!r}]")
    elif type(expected) in (set, frozenset):
        assert len(actual) == len(expected), f"{path}: {len(actual)} items"
        for expected_item in expected:
            actual_item = find_equal(actual, expected_item)
            assert_identical(expected_item, actual_item, f"{path} item {expected_item!r}")
    elif type(expected) in (dt.datetime, dt.time):
        assert actual == expected, f"{path}: {actual!r}"
        assert actual.fold == expected.fold, f"{path}: fold {actual.fold}"
        assert_same_zone(expected.tzinfo, actual.tzinfo, path)
    elif type(expected) is decimal.Decimal:
        assert str(actual) == str(expected), f"{path}: {actual!r}"
    else:
        assert actual == expected, f"{path}: {actual!r}"


# Strategies.

fixed_offsets = st.builds(
    dt.timezone,
    st.timedeltas(
        min_value=dt.timedelta(hours=-24) + dt.timedelta(microseconds=1),
        max_value=dt.timedelta(hours=24) - dt.timedelta(microseconds=1),
    ),
)
named_zones = st.sampled_from(
    ["Europe/Paris", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe", "UTC"]
).map(ZoneInfo)
fixed_zones = st.none() | st.just(dt.UTC) | fixed_offsets
any_zones = fixed_zones | named_zones | st.timezones()
folds = st.integers(min_value=0, max_value=1)


@st.composite
def datetimes(draw: st.DrawFn, zones: st.SearchStrategy[dt.tzinfo | None]) -> dt.datetime:
    value = draw(st.datetimes(timezones=zones))
    return value.replace(fold=draw(folds))


@st.composite
def times(draw: st.DrawFn, zones: st.SearchStrategy[dt.tzinfo | None]) -> dt.time:
    value = draw(st.times(timezones=zones))
    return value.replace(fold=draw(folds))


big_integers = st.integers(min_value=2**64) | st.integers(max_value=-(2**63) - 1)
integers = st.integers() | big_integers | st.sampled_from([2**63, 2**64 - 1, -(2**63)])

# Hashable values whose == is a plain value comparison. ZoneInfo datetimes are left out
# because an inter-zone == of ambiguous times is False even for the same instant, which
# would break find_equal. They appear in lists, tuples and dict values instead.
hashable_scalars = st.one_of(
    st.none(),
    st.booleans(),
    integers,
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.uuids(),
    st.dates(),
    times(fixed_zones),
    st.timedeltas(),
    datetimes(fixed_zones),
)
scalars = hashable_scalars | datetimes(named_zones | st.timezones())

hashables = st.recursive(
    hashable_scalars,
    lambda children: (
        st.lists(children, max_size=4).map(tuple) | st.frozensets(children, max_size=4)
    ),
    max_leaves=8,
)
dict_keys = st.text() | integers | st.lists(hashables, max_size=3).map(tuple)


def extend_values(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=5),
        st.lists(children, max_size=5).map(tuple),
        st.dictionaries(dict_keys, children, max_size=5),
        st.sets(hashables, max_size=5),
        st.frozensets(hashables, max_size=5),
    )


values = st.recursive(scalars, extend_values, max_leaves=25)


def nest(depth: int, wrap: Any, innermost: Any = 0) -> Any:
    value = innermost
    for _ in range(depth):
        value = wrap(value)
    return value


def ext(code: int, payload: bytes) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, payload))


# Round trips.


@PROPERTY_SETTINGS
@given(values)
def test_values_round_trip(value: Any) -> None:
    decoded = round_trip(value)
    assert decoded == value
    assert_identical(value, decoded)


@PROPERTY_SETTINGS
@given(integers)
def test_integers_round_trip(value: int) -> None:
    decoded = round_trip(value)
    assert type(decoded) is int
    assert decoded == value


@pytest.mark.parametrize(
    "value", [2**64, 2**64 - 1, -(2**63), -(2**63) - 1, -(2**64), 2**1000, -(2**1000)]
)
def test_int64_limits_round_trip(value: int) -> None:
    assert round_trip(value) == value


@PROPERTY_SETTINGS
@given(st.text(), st.binary())
def test_text_and_bytes_keep_their_type(text: str, data: bytes) -> None:
    decoded = round_trip([text, data])
    assert type(decoded[0]) is str
    assert type(decoded[1]) is bytes
    assert decoded == [text, data]


@PROPERTY_SETTINGS
@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_finite_decimals_round_trip(value: decimal.Decimal) -> None:
    decoded = round_trip(value)
    assert type(decoded) is decimal.Decimal
    assert str(decoded) == str(value)


@pytest.mark.parametrize("text", ["NaN", "-NaN", "sNaN", "-sNaN12", "Infinity", "-Infinity", "-0"])
def test_special_decimals_round_trip(text: str) -> None:
    decoded = round_trip(decimal.Decimal(text))
    assert type(decoded) is decimal.Decimal
    assert str(decoded) == str(decimal.Decimal(text))


def test_float_nan_round_trip() -> None:
    decoded = round_trip(float("nan"))
    assert type(decoded) is float
    assert math.isnan(decoded)


@PROPERTY_SETTINGS
@given(st.uuids(), st.dates(), st.timedeltas())
def test_uuid_date_timedelta_round_trip(
    identifier: uuid.UUID, day: dt.date, delta: dt.timedelta
) -> None:
    decoded = round_trip([identifier, day, delta])
    assert_identical([identifier, day, delta], decoded)


def test_negative_timedelta_round_trip() -> None:
    delta = -dt.timedelta(days=3, seconds=5, microseconds=7)
    decoded = round_trip(delta)
    assert decoded == delta
    assert decoded.days == -4


@PROPERTY_SETTINGS
@given(times(fixed_zones))
def test_times_round_trip(value: dt.time) -> None:
    decoded = round_trip(value)
    assert decoded == value
    assert_identical(value, decoded)


def test_time_with_named_zone_round_trip() -> None:
    value = dt.time(8, 30, tzinfo=ZoneInfo("Europe/Paris"))
    decoded = round_trip(value)
    assert decoded == value
    assert decoded.tzinfo.key == "Europe/Paris"


@PROPERTY_SETTINGS
@given(datetimes(any_zones))
def test_datetimes_round_trip(value: dt.datetime) -> None:
    decoded = round_trip(value)
    assert decoded == value
    assert_identical(value, decoded)


@pytest.mark.parametrize(
    ("key", "naive"),
    [
        ("Europe/Paris", dt.datetime(2023, 10, 29, 2, 30)),
        ("America/New_York", dt.datetime(2023, 11, 5, 1, 30)),
    ],
)
def test_ambiguous_fold_round_trip(key: str, naive: dt.datetime) -> None:
    first = naive.replace(tzinfo=ZoneInfo(key))
    second = first.replace(fold=1)
    decoded_first, decoded_second = round_trip([first, second])
    assert decoded_second.tzinfo.key == key
    assert decoded_second.fold == 1
    assert decoded_second.utcoffset() == second.utcoffset()
    assert decoded_first.utcoffset() == first.utcoffset()
    assert decoded_first.utcoffset() != decoded_second.utcoffset()


def test_utc_decodes_as_utc_singleton() -> None:
    decoded = round_trip(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    assert decoded.tzinfo is dt.UTC


def test_sub_second_offset_round_trip() -> None:
    zone = dt.timezone(-dt.timedelta(hours=3, seconds=1, microseconds=7))
    value = dt.datetime(2024, 1, 1, tzinfo=zone)
    assert round_trip(value).utcoffset() == zone.utcoffset(None)


def test_zone_without_key_is_rejected() -> None:
    with open("/usr/share/zoneinfo/Europe/Paris", "rb") as file:
        zone = ZoneInfo.from_file(file)
    with pytest.raises(SerializationError) as caught:
        encode({"when": dt.datetime(2024, 1, 1, tzinfo=zone)}, name="kwargs")
    assert caught.value.path == "kwargs['when']"
    assert "without an IANA key" in str(caught.value)


def test_tuple_keys_round_trip() -> None:
    value = {(1, "a"): [1], (2, (3, frozenset({4}))): {"x": (5,)}, 7: "int", "s": {8}}
    decoded = round_trip(value)
    assert decoded == value
    assert_identical(value, decoded)


def test_containers_keep_their_type() -> None:
    value = [(1, 2), {3}, frozenset({4}), [5], {"k": (6, {7})}]
    decoded = round_trip(value)
    assert_identical(value, decoded)


def test_empty_containers_keep_their_type() -> None:
    value = [(), set(), frozenset(), [], {}]
    assert_identical(value, round_trip(value))


def test_max_depth_round_trips() -> None:
    lists = nest(MAX_DEPTH, lambda inner: [inner])
    tuples = nest(MAX_DEPTH, lambda inner: (inner,))
    assert round_trip(lists) == lists
    assert round_trip(tuples) == tuples


def test_msgpack_timestamp_decodes_as_utc_datetime() -> None:
    data = msgpack.packb(msgpack.Timestamp(seconds=86400, nanoseconds=5000))
    decoded = decode(data)
    assert decoded == dt.datetime(1970, 1, 2, 0, 0, 0, 5, tzinfo=dt.UTC)


# Values that cannot be encoded.


class Opaque:
    def __repr__(self) -> str:
        return "Opaque()"


class UnprintableOpaque:
    def __repr__(self) -> str:
        raise RuntimeError("repr failed")


class Color(enum.Enum):
    RED = 1


class Size(enum.IntEnum):
    SMALL = 1


Point = collections.namedtuple("Point", "x y")


class FixedZone(dt.tzinfo):
    def utcoffset(self, value: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(hours=1)

    def dst(self, value: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)

    def tzname(self, value: dt.datetime | None) -> str:
        return "FIXED"


def qualified_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


@pytest.mark.parametrize(
    ("value", "path", "type_name"),
    [
        ([1, {"items": [Opaque()]}], "args[1]['items'][0]", qualified_name(Opaque)),
        ([1, object()], "args[1]", "builtins.object"),
        ([Color.RED], "args[0]", qualified_name(Color)),
        ({"size": Size.SMALL}, "args['size']", qualified_name(Size)),
        ([Point(1, 2)], "args[0]", qualified_name(Point)),
        ((1, Opaque()), "args[1]", qualified_name(Opaque)),
        ({"a": [(0, 1, Opaque())]}, "args['a'][0][2]", qualified_name(Opaque)),
        ({(1, Opaque()): 2}, "args key (1, Opaque())[1]", qualified_name(Opaque)),
        ({5: {Opaque(): 1}}, "args[5] key Opaque()", qualified_name(Opaque)),
        ([{Opaque()}], "args[0][0]", qualified_name(Opaque)),
        ([frozenset({Opaque()})], "args[0][0]", qualified_name(Opaque)),
        ({"s": {(1, Opaque())}}, "args['s'][0][1]", qualified_name(Opaque)),
        ([1.5, bytearray(b"x"), Opaque()], "args[2]", qualified_name(Opaque)),
        ({"when": dt.datetime(2024, 1, 1, tzinfo=FixedZone())}, "args['when']", "FixedZone"),
        ([dt.time(1, tzinfo=FixedZone())], "args[0]", "FixedZone"),
    ],
)
def test_unencodable_value_names_path_and_type(value: Any, path: str, type_name: str) -> None:
    with pytest.raises(SerializationError) as caught:
        encode(value, name="args")
    assert caught.value.path == path
    assert f"cannot encode {path}:" in str(caught.value)
    assert type_name in str(caught.value)


def test_unencodable_top_level_uses_name() -> None:
    with pytest.raises(SerializationError) as caught:
        encode(Opaque(), name="result")
    assert caught.value.path == "result"


def test_default_name_is_value() -> None:
    with pytest.raises(SerializationError) as caught:
        encode([Opaque()])
    assert caught.value.path == "value[0]"


def test_subclass_of_builtin_is_rejected() -> None:
    class Text(str):
        pass

    with pytest.raises(SerializationError) as caught:
        encode({"k": Text("v")}, name="args")
    assert caught.value.path == "args['k']"
    assert "Text" in str(caught.value)


def test_failing_repr_inside_set_is_reported() -> None:
    with pytest.raises(SerializationError) as caught:
        encode([{UnprintableOpaque(), 1}], name="args")
    assert caught.value.path.startswith("args[0][")
    assert "UnprintableOpaque" in str(caught.value)


def test_lone_surrogate_names_path() -> None:
    with pytest.raises(SerializationError) as caught:
        encode({"name": "bad \ud800"}, name="kwargs")
    assert caught.value.path == "kwargs['name']"
    assert "UTF-8" in str(caught.value)


def test_list_cycle_is_rejected() -> None:
    cycle: list[Any] = [1]
    cycle.append(cycle)
    with pytest.raises(SerializationError) as caught:
        encode({"items": cycle}, name="args")
    assert caught.value.path == "args['items'][1]"
    assert "cycle" in str(caught.value)


def test_cycle_through_tuple_is_rejected() -> None:
    inner: list[Any] = []
    outer = (inner,)
    inner.append(outer)
    with pytest.raises(SerializationError) as caught:
        encode(outer, name="args")
    assert caught.value.path == "args[0][0]"
    assert "cycle" in str(caught.value)


def test_dict_cycle_is_rejected() -> None:
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    with pytest.raises(SerializationError) as caught:
        encode([cycle], name="args")
    assert caught.value.path == "args[0]['self']"


@pytest.mark.parametrize(
    "wrap",
    [
        lambda inner: [inner],
        lambda inner: (inner,),
        lambda inner: {"k": inner},
        lambda inner: frozenset({inner}),
    ],
    ids=["list", "tuple", "dict", "frozenset"],
)
def test_nesting_deeper_than_max_depth_is_rejected(wrap: Any) -> None:
    with pytest.raises(SerializationError) as caught:
        encode(nest(MAX_DEPTH + 1, wrap), name="args")
    assert f"deeper than {MAX_DEPTH}" in str(caught.value)
    assert caught.value.path.startswith("args[")


def test_deep_nesting_path_has_one_step_per_level() -> None:
    with pytest.raises(SerializationError) as caught:
        encode(nest(MAX_DEPTH + 1, lambda inner: [inner]), name="args")
    assert caught.value.path == "args" + "[0]" * (MAX_DEPTH + 1)


def test_very_deep_tuples_are_rejected() -> None:
    with pytest.raises(SerializationError):
        encode(nest(5000, lambda inner: (inner,)), name="args")


def test_deep_lists_inside_tuples_are_rejected() -> None:
    # Each tuple level starts a new msgpack packer, which allows 1024 levels of lists.
    value = nest(60, lambda inner: (nest(1000, lambda deeper: [deeper], inner),))
    with pytest.raises(SerializationError):
        encode(value, name="args")


def test_empty_list_at_max_depth_accepted() -> None:
    value = nest(MAX_DEPTH, lambda inner: [inner], innermost=[])
    assert round_trip(value) == value


# Decoding hostile input.


def decode_or_reject(data: bytes) -> None:
    """Decode ``data``. A SerializationError is fine, and any other exception fails the test."""
    with contextlib.suppress(SerializationError):
        decode(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_decode_safely(data: bytes) -> None:
    decode_or_reject(data)


@PROPERTY_SETTINGS
@given(values, st.data())
def test_truncated_encoding_is_rejected(value: Any, data: st.DataObject) -> None:
    encoded = encode(value)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(SerializationError):
        decode(encoded[:cut])


@PROPERTY_SETTINGS
@given(values, st.data())
def test_corrupted_encoding_decodes_safely(value: Any, data: st.DataObject) -> None:
    encoded = bytearray(encode(value))
    position = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[position] = data.draw(st.integers(min_value=0, max_value=255))
    decode_or_reject(bytes(encoded))


@PROPERTY_SETTINGS
@given(st.integers(min_value=1, max_value=10), st.binary(max_size=40))
def test_random_extension_payload_decodes_safely(code: int, payload: bytes) -> None:
    decode_or_reject(ext(code, payload))


payload_items = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(["2024-01-01T00:00:00", "12:30:00", "Europe/Paris", "../etc/passwd"]),
    st.binary(max_size=10),
)
payload_values = st.recursive(
    payload_items,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children),
    max_leaves=6,
)


@PROPERTY_SETTINGS
@given(st.integers(min_value=1, max_value=10), payload_values)
def test_misshapen_extension_payload_decodes_safely(code: int, payload: Any) -> None:
    decode_or_reject(ext(code, msgpack.packb(payload)))


@pytest.mark.parametrize("code", [0, 11, 42, 127, -2, -128])
def test_unknown_extension_code_is_rejected(code: int) -> None:
    # fixext 1 (0xd4) written by hand, because msgpack.ExtType rejects negative codes.
    data = b"\xd4" + code.to_bytes(1, "big", signed=True) + b"\x00"
    with pytest.raises(SerializationError) as caught:
        decode(data)
    assert "unknown msgpack extension type" in str(caught.value)


def packed(value: Any) -> bytes:
    return msgpack.packb(value)


@pytest.mark.parametrize(
    ("code", "payload"),
    [
        (EXT_DATETIME, b""),
        (EXT_DATETIME, packed("2024-01-01T00:00:00")),
        (EXT_DATETIME, packed(["2024-01-01T00:00:00", 0])),
        (EXT_DATETIME, packed(["2024-01-01T00:00:00", 0, None, 1])),
        (EXT_DATETIME, packed(["not a date", 0, None])),
        (EXT_DATETIME, packed([20240101, 0, None])),
        (EXT_DATETIME, packed(["2024-01-01T00:00:00", 2, None])),
        (EXT_DATETIME, packed(["2024-01-01T00:00:00", "x", None])),
        (EXT_DATETIME, packed(["2024-01-01T00:00:00", 0, "Mars/Olympus_Mons"])),
        (EXT_DATETIME, packed(["2024-01-01T00:00:00", 0, "../../../etc/passwd"])),
        (EXT_DATETIME, packed(["2024-01-01T00:00:00", 0, "/etc/localtime"])),
        (EXT_DATETIME, packed(["2024-01-01T00:00:00", 0, "Europe"])),
        (EXT_DATETIME, packed(["2024-01-01T00:00:00", 0, ""])),
        (EXT_DATETIME, packed(["2024-01-01T00:00:00", 0, 86400])),
        (EXT_DATETIME, packed(["2024-01-01T00:00:00", 0, float("nan")])),
        (EXT_DATETIME, packed(["2024-01-01T00:00:00", 0, [3600]])),
        (EXT_DATETIME, packed(["2024-01-01T00:00:00", 0, None]) + b"\x00"),
        (EXT_DATETIME, b"\xc1"),
        (EXT_DATE, b"\xff\xfe"),
        (EXT_DATE, b"2024-13-01"),
        (EXT_DATE, b""),
        (EXT_TIME, packed(["25:00:00", 0, None])),
        (EXT_TIME, packed(["12:00:00", 0])),
        (EXT_TIME, packed(["12:00:00", 0, "Nowhere/City"])),
        (EXT_TIMEDELTA, packed([1, 2])),
        (EXT_TIMEDELTA, packed(["a", 0, 0])),
        (EXT_TIMEDELTA, packed([10**10, 0, 0])),
        (EXT_TIMEDELTA, packed({"days": 1})),
        (EXT_DECIMAL, b"one"),
        (EXT_DECIMAL, b"\xff"),
        (EXT_DECIMAL, b"1e9999999999999999999999"),
        (EXT_UUID, b"\x00" * 15),
        (EXT_UUID, b"\x00" * 17),
        (EXT_TUPLE, b""),
        (EXT_TUPLE, b"\x92\x01"),
        (EXT_TUPLE, packed(7)),
        (EXT_SET, packed([[1]])),
        (EXT_SET, packed(None)),
        (EXT_FROZENSET, packed([{}])),
        (EXT_TUPLE, packed([1]) + b"\x01"),
    ],
)
def test_malformed_extension_payload_is_rejected(code: int, payload: bytes) -> None:
    with pytest.raises(SerializationError):
        decode(ext(code, payload))


def test_unknown_zone_is_named_in_error() -> None:
    data = ext(EXT_DATETIME, packed(["2024-01-01T00:00:00", 0, "Mars/Olympus_Mons"]))
    with pytest.raises(SerializationError) as caught:
        decode(data)
    assert "Mars/Olympus_Mons" in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x92\x01",
        b"\x01\x02",
        b"\x81\x91\x01\x02",
        b"\xd5\xff\x00\x00",
        b"\xdb\xff\xff\xff\xff",
        b"\xa3\xff\xfe\xfd",
        b"\x91" * 5000 + b"\x00",
    ],
    ids=[
        "empty",
        "reserved byte",
        "short array",
        "extra data",
        "list as map key",
        "bad msgpack timestamp",
        "huge string length",
        "invalid utf-8",
        "deep arrays",
    ],
)
def test_invalid_msgpack_is_rejected(data: bytes) -> None:
    with pytest.raises(SerializationError):
        decode(data)


def test_non_bytes_input_is_rejected() -> None:
    with pytest.raises(SerializationError):
        decode("not bytes")  # type: ignore[arg-type]


def nested_extension_chain(levels: int, code: int = EXT_TUPLE, lists_per_level: int = 0) -> bytes:
    """Build ``levels`` extension values nested inside each other, bypassing encode."""
    data = packed(0)
    for _ in range(levels):
        data = ext(code, b"\x91" * (lists_per_level + 1) + data)
    return data


@pytest.mark.parametrize("code", [EXT_TUPLE, EXT_SET, EXT_FROZENSET, EXT_DATETIME, EXT_TIMEDELTA])
def test_deep_extension_chain_is_rejected(code: int) -> None:
    with pytest.raises(SerializationError) as caught:
        decode(nested_extension_chain(MAX_DEPTH + 50, code))
    assert f"deeper than {MAX_DEPTH}" in str(caught.value)


def test_very_deep_extension_chain_is_rejected() -> None:
    with pytest.raises(SerializationError):
        decode(nested_extension_chain(20_000))


def test_extension_chain_at_max_depth_decodes() -> None:
    decoded = decode(nested_extension_chain(MAX_DEPTH))
    assert type(decoded) is tuple


def test_deep_decoded_lists_fail_reencode() -> None:
    decoded = decode(nested_extension_chain(60, lists_per_level=1000))
    with pytest.raises(SerializationError):
        encode(decoded, name="args")


def test_big_integer_extension_decodes() -> None:
    data = ext(EXT_BIGINT, (2**80).to_bytes(11, "big", signed=True))
    assert decode(data) == 2**80


def test_find_unencodable_accepts_valid_value() -> None:
    path, culprit = serializer.find_unencodable({"a": [1, (2, {3})]}, "args")
    assert path == "args"
    assert culprit is None
