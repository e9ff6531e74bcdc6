"""msgpack encoding of the values that workflows and tasks pass around.

Plain msgpack keeps ``None``, ``bool``, ``int`` (64-bit), ``float``, ``str``, ``bytes``,
``list`` and ``dict``. Extension types carry the rest without loss:

==== ======================= ==============================================================
code type                    encoded as
==== ======================= ==============================================================
1    ``datetime.datetime``   ``[iso, fold, zone]``: naive ISO text and the zone (see below)
2    ``datetime.date``       ISO text
3    ``datetime.time``       ``[iso, fold, zone]``, like datetime
4    ``datetime.timedelta``  ``[days, seconds, microseconds]``
5    ``decimal.Decimal``     its text form
6    ``uuid.UUID``           its 16 bytes
7    ``tuple``               array of the items
8    ``set``                 array of the items
9    ``frozenset``           array of the items
10   ``int`` beyond 64 bits  signed big-endian bytes
==== ======================= ==============================================================

A zone is ``None`` (naive), an integer offset from UTC in seconds (``timezone.utc`` and other
fixed offsets), or an IANA name such as ``"Europe/Paris"`` for a ``zoneinfo.ZoneInfo``.

Values of other types, including subclasses of the types above (enums, named tuples), are
rejected with a :class:`~zenflow.errors.SerializationError` that names where the value sits,
because decoding them would require importing user code from a message.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgpack

from zenflow.errors import SerializationError

CONTENT_TYPE = "application/x-msgpack"

EXT_DATETIME = 1
EXT_DATE = 2
EXT_TIME = 3
EXT_TIMEDELTA = 4
EXT_DECIMAL = 5
EXT_UUID = 6
EXT_TUPLE = 7
EXT_SET = 8
EXT_FROZENSET = 9
EXT_BIGINT = 10

_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1

# Nested containers deeper than this are rejected instead of exhausting the stack.
MAX_DEPTH = 256


class _Unencodable(Exception):
    """Internal signal from the packer's default hook; turned into SerializationError."""


def _encode_zone(tzinfo: dt.tzinfo | None) -> Any:
    if tzinfo is None:
        return None
    if type(tzinfo) is ZoneInfo:
        return tzinfo.key
    if type(tzinfo) is dt.timezone:
        offset = tzinfo.utcoffset(None)
        seconds = offset.total_seconds()
        return int(seconds) if offset.microseconds == 0 else seconds
    raise _Unencodable(f"time zone {tzinfo!r} of type {type(tzinfo).__name__}")


def _decode_zone(zone: Any) -> dt.tzinfo | None:
    if zone is None:
        return None
    if isinstance(zone, str):
        try:
            return ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise SerializationError(f"unknown time zone {zone!r} in encoded datetime") from error
    if isinstance(zone, int | float):
        return dt.timezone(dt.timedelta(seconds=zone))
    raise SerializationError(f"invalid time zone {zone!r} in encoded datetime")


def _pack_nested(value: Any) -> bytes:
    return _packer().pack(value)


def _default(value: Any) -> msgpack.ExtType:
    kind = type(value)
    if kind is dt.datetime:
        zone = _encode_zone(value.tzinfo)
        return msgpack.ExtType(
            EXT_DATETIME,
            _pack_nested([value.replace(tzinfo=None).isoformat(), value.fold, zone]),
        )
    if kind is dt.date:
        return msgpack.ExtType(EXT_DATE, value.isoformat().encode())
    if kind is dt.time:
        zone = _encode_zone(value.tzinfo)
        return msgpack.ExtType(
            EXT_TIME, _pack_nested([value.replace(tzinfo=None).isoformat(), value.fold, zone])
        )
    if kind is dt.timedelta:
        return msgpack.ExtType(
            EXT_TIMEDELTA, _pack_nested([value.days, value.seconds, value.microseconds])
        )
    if kind is decimal.Decimal:
        return msgpack.ExtType(EXT_DECIMAL, str(value).encode())
    if kind is uuid.UUID:
        return msgpack.ExtType(EXT_UUID, value.bytes)
    if kind is tuple:
        return msgpack.ExtType(EXT_TUPLE, _pack_nested(list(value)))
    if kind is set:
        return msgpack.ExtType(EXT_SET, _pack_nested(list(value)))
    if kind is frozenset:
        return msgpack.ExtType(EXT_FROZENSET, _pack_nested(list(value)))
    if kind is int:
        length = (value.bit_length() + 8) // 8
        return msgpack.ExtType(EXT_BIGINT, value.to_bytes(length, "big", signed=True))
    raise _Unencodable(f"value of type {kind.__module__}.{kind.__qualname__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_DATETIME:
        iso, fold, zone = _unpack_nested(data)
        return dt.datetime.fromisoformat(iso).replace(tzinfo=_decode_zone(zone), fold=fold)
    if code == EXT_DATE:
        return dt.date.fromisoformat(data.decode())
    if code == EXT_TIME:
        iso, fold, zone = _unpack_nested(data)
        return dt.time.fromisoformat(iso).replace(tzinfo=_decode_zone(zone), fold=fold)
    if code == EXT_TIMEDELTA:
        days, seconds, microseconds = _unpack_nested(data)
        return dt.timedelta(days=days, seconds=seconds, microseconds=microseconds)
    if code == EXT_DECIMAL:
        return decimal.Decimal(data.decode())
    if code == EXT_UUID:
        return uuid.UUID(bytes=data)
    if code == EXT_TUPLE:
        return tuple(_unpack_nested(data))
    if code == EXT_SET:
        return set(_unpack_nested(data))
    if code == EXT_FROZENSET:
        return frozenset(_unpack_nested(data))
    if code == EXT_BIGINT:
        return int.from_bytes(data, "big", signed=True)
    raise SerializationError(f"unknown msgpack extension type {code}")


def _packer() -> msgpack.Packer:
    # strict_types sends tuples and subclasses of built-in types to _default, so a tuple
    # is not silently turned into a list and an enum is not silently turned into an int.
    return msgpack.Packer(default=_default, use_bin_type=True, strict_types=True, datetime=False)


def _unpack_nested(data: bytes) -> Any:
    return msgpack.unpackb(
        data, ext_hook=_ext_hook, raw=False, strict_map_key=False, use_list=True
    )


def encode(value: Any, *, name: str = "value") -> bytes:
    """Encode ``value`` to msgpack bytes.

    Raises:
        SerializationError: a value inside cannot be encoded. The message names its path,
            starting with ``name`` (for example ``args[0]['when']``), and its type.
    """
    try:
        return _packer().pack(value)
    except (_Unencodable, TypeError, ValueError, OverflowError) as error:
        path, culprit = find_unencodable(value, name)
        if culprit is None:
            raise SerializationError(f"cannot encode {name}: {error}", name) from None
        raise SerializationError(
            f"cannot encode {path}: {culprit}. Pass only None, bool, int, float, str, bytes, "
            "list, tuple, dict, set, frozenset, datetime, date, time, timedelta, Decimal or "
            "UUID values",
            path,
        ) from None


def decode(data: bytes) -> Any:
    """Decode msgpack bytes produced by :func:`encode`.

    Raises:
        SerializationError: the bytes are not valid msgpack or contain an unknown or
            malformed extension value.
    """
    try:
        return _unpack_nested(data)
    except SerializationError:
        raise
    except Exception as error:  # msgpack raises several unrelated types for bad input
        raise SerializationError(f"invalid msgpack body: {error}") from None


def find_unencodable(value: Any, path: str) -> tuple[str, str | None]:
    """Walk ``value`` and return the path and description of the first unencodable part.

    Returns ``(path, None)`` when every part is encodable on its own.
    """
    return _walk(value, path, 0, set())


_SCALARS: tuple[type, ...] = (
    type(None),
    bool,
    float,
    str,
    bytes,
    bytearray,
    dt.date,
    dt.timedelta,
    decimal.Decimal,
    uuid.UUID,
)


def _walk(value: Any, path: str, depth: int, seen: set[int]) -> tuple[str, str | None]:
    kind = type(value)
    if depth > MAX_DEPTH:
        return path, f"nesting deeper than {MAX_DEPTH} levels"
    if kind is int:
        return path, None
    if kind in (dt.datetime, dt.time):
        try:
            _encode_zone(value.tzinfo)
        except _Unencodable as error:
            return path, str(error)
        return path, None
    if kind in _SCALARS:
        return path, None
    if kind in (list, tuple, set, frozenset, dict):
        if id(value) in seen:
            return path, "a reference cycle (the container contains itself)"
        seen = seen | {id(value)}
        if kind is dict:
            for key, item in value.items():
                found = _walk(key, f"{path} key {key!r}", depth + 1, seen)
                if found[1] is not None:
                    return found
                found = _walk(item, f"{path}[{key!r}]", depth + 1, seen)
                if found[1] is not None:
                    return found
            return path, None
        items = value if kind in (list, tuple) else sorted(value, key=repr)
        for index, item in enumerate(items):
            found = _walk(item, f"{path}[{index}]", depth + 1, seen)
            if found[1] is not None:
                return found
        return path, None
    return path, f"value {_short_repr(value)} of type {kind.__module__}.{kind.__qualname__}"


def _short_repr(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."

