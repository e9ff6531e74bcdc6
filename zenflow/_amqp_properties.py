"""Tolerant decoding of the properties of AMQP messages received through aio-pika.

pamqp 4.0.1, the frame codec under aio-pika, raises on a content header with a property
that it cannot decode. Such properties are a short string (``correlation_id``,
``reply_to``, ``message_id``...) that is not UTF-8, a ``headers`` key that is not UTF-8,
and a ``timestamp`` beyond the year 9999. aiormq then closes the connection, the robust
connection reconnects, RabbitMQ delivers the same message again, and the consumer never
gets past it. RabbitMQ (3.10 here) passes these bytes on unchecked, so any client allowed
to publish to a queue could stop every engine or agent that consumes it with one message.

:func:`install` replaces the decoder of message properties with one that decodes each
property on its own. When one fails, it is dropped (set to ``None``) with a logged
warning, and the message is handled without it. A property whose length prefix is missing
still fails the frame, because the properties after it cannot be found.
"""

from __future__ import annotations

import struct
from typing import Any

import structlog
from pamqp import commands, decode

log = structlog.get_logger("zenflow.amqp")

# Encoded sizes, in bytes, of the fixed-size AMQP types that message properties use.
_FIXED_SIZES = {"octet": 1, "short": 2, "long": 4, "longlong": 8, "timestamp": 8}

# Errors that pamqp's decoders raise for undecodable values. UnicodeDecodeError is a
# ValueError, and datetime.fromtimestamp raises ValueError, OverflowError or OSError for an
# instant out of range.
_DECODE_ERRORS = (ValueError, OverflowError, OSError, struct.error)


def _encoded_size(data_type: str, data: bytes) -> int:
    """Return how many bytes the property of ``data_type`` at the start of ``data`` takes.

    Raises:
        ValueError: the property's length prefix is truncated or the type is unknown.
    """
    try:
        if data_type == "shortstr":
            return 1 + data[0]
        if data_type in ("longstr", "table"):
            return 4 + int(struct.unpack_from(">I", data)[0])
        return _FIXED_SIZES[data_type]
    except (IndexError, KeyError, struct.error) as error:
        raise ValueError(f"cannot skip undecodable {data_type} property: {error!r}") from None


def _unmarshal(self: Any, flags: int, data: bytes) -> None:
    """Decode the properties present in ``flags``; drop each one that does not decode."""
    for name in self.__slots__:
        if not flags & self.flags[name]:
            continue
        data_type = getattr(self.__class__, "_" + name)
        try:
            consumed, value = decode.by_type(data, data_type)
        except _DECODE_ERRORS as error:
            consumed, value = _encoded_size(data_type, data), None
            log.warning(
                "message_property_dropped",
                property=name,
                error=f"{type(error).__name__}: {error}",
            )
        setattr(self, name, value)
        data = data[consumed:]


def install() -> None:
    """Make aio-pika connections of this process drop undecodable message properties.

    Idempotent. It changes pamqp's ``Basic.Properties`` class for the whole process.
    """
    commands.Basic.Properties.unmarshal = _unmarshal  # type: ignore[method-assign]
