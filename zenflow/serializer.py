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
The standard msgpack timestamp extension (code -1), which zenflow never writes but other
msgpack libraries do, decodes as a ``datetime`` in UTC.

Values of other types, including subclasses of the types above (enums, named tuples), are
rejected with a :class:`~zenflow.errors.SerializationError` that names where the value sits,
because decoding them would require importing user code from a message.
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
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

# encode rejects values nested deeper than this (the top-level value is at depth 0), and
# decode rejects extension values nested deeper than this, instead of exhausting the stack.
MAX_DEPTH = 256

_CONTAINER_TYPES = frozenset({list, tuple, set, frozenset, dict})
_HASHABLE_CONTAINER_TYPES = frozenset({tuple, frozenset})

# Each msgpack.unpackb call keeps a fixed parse stack on the C stack (about 40 KB, estimated
# from the crash below), and every extension value nested in another one calls it again from
# the ext hook. With msgpack 1.2.4 on Linux, 200 nested tuples overflowed the 8 MB main-thread
# stack and killed the process. Payloads at a deeper level are decoded by a msgpack.Unpacker
# object, which keeps its parse stack on the heap.
_C_STACK_UNPACK_LEVELS = 4


class _Unencodable(Exception):
    """Internal signal from the packer's default hook; turned into SerializationError."""


def _encode_zone(tzinfo: dt.tzinfo | None) -> Any:
    if tzinfo is None:
        return None
    if type(tzinfo) is ZoneInfo:
        if tzinfo.key is None:
            # ZoneInfo.from_file builds a zone without a key, which would decode as naive.
            raise _Unencodable(f"time zone {tzinfo!r} without an IANA key (ZoneInfo.from_file)")
        return tzinfo.key
    if type(tzinfo) is dt.timezone:
        # NOTE: only the offset is kept, so a name given to timezone() (such as "CET") is lost
        # and tzname() of the decoded value returns "UTC+01:00". Equality is unaffected.
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
        except (ZoneInfoNotFoundError, ValueError, OSError) as error:
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


def _ext_hook(code: int, data: bytes, *, level: int) -> Any:
    """Decode one extension value found by the unpacker at nesting ``level``."""
    if level > MAX_DEPTH:
        raise SerializationError(f"extension values nested deeper than {MAX_DEPTH} levels")
    if code == EXT_DATETIME:
        iso, fold, zone = _unpack_nested(data, level + 1)
        return dt.datetime.fromisoformat(iso).replace(tzinfo=_decode_zone(zone), fold=fold)
    if code == EXT_DATE:
        return dt.date.fromisoformat(data.decode())
    if code == EXT_TIME:
        iso, fold, zone = _unpack_nested(data, level + 1)
        return dt.time.fromisoformat(iso).replace(tzinfo=_decode_zone(zone), fold=fold)
    if code == EXT_TIMEDELTA:
        days, seconds, microseconds = _unpack_nested(data, level + 1)
        return dt.timedelta(days=days, seconds=seconds, microseconds=microseconds)
    if code == EXT_DECIMAL:
        return decimal.Decimal(data.decode())
    if code == EXT_UUID:
        return uuid.UUID(bytes=data)
    if code == EXT_TUPLE:
        return tuple(_unpack_nested(data, level + 1))
    if code == EXT_SET:
        return set(_unpack_nested(data, level + 1))
    if code == EXT_FROZENSET:
        return frozenset(_unpack_nested(data, level + 1))
    if code == EXT_BIGINT:
        return int.from_bytes(data, "big", signed=True)
    raise SerializationError(f"unknown msgpack extension type {code}")


def _packer() -> msgpack.Packer:
    # strict_types sends tuples and subclasses of built-in types to _default, so a tuple
    # is not silently turned into a list and an enum is not silently turned into an int.
    return msgpack.Packer(default=_default, use_bin_type=True, strict_types=True, datetime=False)


# _ext_hook rejects levels above MAX_DEPTH before unpacking a payload, so _unpack_nested
# runs at levels 0 to MAX_DEPTH + 1.
_EXT_HOOKS = tuple(functools.partial(_ext_hook, level=level) for level in range(MAX_DEPTH + 2))


def _unpack_nested(data: bytes, level: int) -> Any:
    """Unpack the one msgpack value in ``data``. ``level`` counts the enclosing extensions."""
    if level <= _C_STACK_UNPACK_LEVELS:
        return msgpack.unpackb(
            data,
            ext_hook=_EXT_HOOKS[level],
            raw=False,
            strict_map_key=False,
            use_list=True,
            timestamp=3,
        )
    unpacker = msgpack.Unpacker(
        ext_hook=_EXT_HOOKS[level],
        raw=False,
        strict_map_key=False,
        use_list=True,
        timestamp=3,
        max_buffer_size=max(len(data), 1),
    )
    unpacker.feed(data)
    value = unpacker.unpack()
    if unpacker.tell() != len(data):
        raise SerializationError(
            f"{len(data) - unpacker.tell()} extra bytes after an encoded extension value"
        )
    return value


def encode(value: Any, *, name: str = "value") -> bytes:
    """Encode ``value`` to msgpack bytes.

    Raises:
        SerializationError: a value inside cannot be encoded. The message names its path,
            starting with ``name`` (for example ``args[0]['when']``), and its type.
    """
    try:
        # The msgpack packer recurses in C through up to 1024 levels of lists and dicts for
        # each level of tuples and sets, so a deep value could overflow the C stack. Deep
        # values are therefore rejected before packing.
        if type(value) in _CONTAINER_TYPES and _exceeds_max_depth(value, 0):
            raise _Unencodable(f"nesting deeper than {MAX_DEPTH} levels")
        return _packer().pack(value)
    except (_Unencodable, TypeError, ValueError, OverflowError, RecursionError) as error:
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
        return _unpack_nested(data, 0)
    except SerializationError:
        raise
    except Exception as error:  # msgpack raises several unrelated types for bad input
        # Some msgpack errors have no text, so the type names the problem then.
        reason = str(error) or type(error).__name__
        raise SerializationError(f"invalid msgpack body: {reason}") from None


def _exceeds_max_depth(container: Any, depth: int) -> bool:
    """Return whether some item of ``container``, which sits at ``depth``, is deeper than
    MAX_DEPTH, with the same depth rule as :func:`_walk`.

    Items that are not containers are screened with ``map(type, ...)`` in C, so flat lists
    cost little. A reference cycle counts as too deep.
    """
    if depth >= MAX_DEPTH:
        return len(container) > 0
    if type(container) is dict:
        if not _HASHABLE_CONTAINER_TYPES.isdisjoint(map(type, container)):
            for key in container:
                if type(key) in _HASHABLE_CONTAINER_TYPES and _exceeds_max_depth(key, depth + 1):
                    return True
        container = container.values()
    if _CONTAINER_TYPES.isdisjoint(map(type, container)):
        return False
    for item in container:
        if type(item) in _CONTAINER_TYPES and _exceeds_max_depth(item, depth + 1):
            return True
    return False


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
    if kind is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path, f"string {_short_repr(value)} that is not valid UTF-8 (a lone surrogate)"
        return path, None
    if kind in _SCALARS:
        return path, None
    if kind in (list, tuple, set, frozenset, dict):
        if id(value) in seen:
            return path, "a reference cycle (the container contains itself)"
        seen = seen | {id(value)}
        if kind is dict:
            for key, item in value.items():
                key_text = _safe_repr(key)
                found = _walk(key, f"{path} key {key_text}", depth + 1, seen)
                if found[1] is not None:
                    return found
                found = _walk(item, f"{path}[{key_text}]", depth + 1, seen)
                if found[1] is not None:
                    return found
            return path, None
        # Set items are numbered in the order of their repr, so the path is reproducible.
        items = value if kind in (list, tuple) else sorted(value, key=_safe_repr)
        for index, item in enumerate(items):
            found = _walk(item, f"{path}[{index}]", depth + 1, seen)
            if found[1] is not None:
                return found
        return path, None
    return path, f"value {_short_repr(value)} of type {kind.__module__}.{kind.__qualname__}"


def _safe_repr(value: Any) -> str:
    """Return ``repr(value)``, or the type name when the value's ``__repr__`` raises."""
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


def _short_repr(value: Any, limit: int = 80) -> str:
    text = _safe_repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
