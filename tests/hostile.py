"""Publishing of hostile AMQP messages, whose properties are given as raw bytes.

RabbitMQ passes on property values that aio-pika cannot publish, because it encodes
property strings from ``str``: a correlation id or a header key that is not UTF-8, for
example. pika can publish them, but its blocking channel waits for each confirm.
:class:`RawProperties` encodes properties as AMQP 0-9-1 lays them out, and takes ``bytes``
for strings as they are. :func:`publish_all` sends messages with them through aiormq, with
publisher confirms for many messages at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import aiormq
from pamqp import commands, encode

Properties = commands.Basic.Properties


@dataclasses.dataclass(frozen=True)
class RawField:
    """A header value already encoded as an AMQP field: its type octet, then its data."""

    data: bytes


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """A message to publish: ``properties`` maps property names (as in pamqp) to values."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Mapping[str, Any]


def _short_string(value: str | bytes) -> bytes:
    data = value if isinstance(value, bytes) else value.encode("utf-8")
    if len(data) > 255:
        raise ValueError(f"a short string has at most 255 bytes, not {len(data)}")
    return bytes([len(data)]) + data


def _table(value: Mapping[str | bytes, Any]) -> bytes:
    parts = []
    for key, item in value.items():
        field = item.data if isinstance(item, RawField) else encode.encode_table_value(item)
        parts.append(_short_string(key) + field)
    data = b"".join(parts)
    return struct.pack(">I", len(data)) + data


def encode_properties(properties: Mapping[str, Any]) -> bytes:
    """Encode the property flags and values; a ``None`` value leaves the property out."""
    flags = 0
    parts = []
    for name in Properties.__slots__:
        value = properties.get(name)
        if value is None:
            continue
        flags |= Properties.flags[name]
        kind = getattr(Properties, "_" + name)
        if kind == "shortstr":
            parts.append(_short_string(value))
        elif kind == "table":
            parts.append(_table(value))
        elif kind == "octet":
            parts.append(struct.pack(">B", value))
        elif kind == "timestamp":
            parts.append(struct.pack(">Q", value))
        else:
            raise ValueError(f"property {name!r} has type {kind}, which encode_properties lacks")
    return struct.pack(">H", flags) + b"".join(parts)


class RawProperties(Properties):  # type: ignore[misc]
    """Properties that marshal to the bytes of :func:`encode_properties`.

    aiormq gives a message without ``message_id`` a random one before it publishes. The
    ``message_id`` attribute set here keeps it from doing so, and is never sent.
    """

    def __init__(self, properties: Mapping[str, Any]) -> None:
        super().__init__()
        self.raw = encode_properties(properties)
        self.message_id = uuid.uuid4().hex

    def marshal(self) -> bytes:
        return self.raw


async def publish_all(url: str, messages: Iterable[Outgoing], batch: int = 500) -> int:
    """Publish ``messages`` on one channel with confirms, ``batch`` at a time; return the count.

    Raises:
        AssertionError: the broker did not acknowledge a message.
    """
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        pending: list[Any] = []
        count = 0
        for message in messages:
            pending.append(
                channel.basic_publish(
                    message.body,
                    exchange=message.exchange,
                    routing_key=message.routing_key,
                    properties=RawProperties(message.properties),
                )
            )
            if len(pending) >= batch:
                count += await _confirmed(pending)
                pending = []
        count += await _confirmed(pending)
        return count
    finally:
        await connection.close()


async def _confirmed(publishes: list[Any]) -> int:
    confirmations = await asyncio.gather(*publishes)
    for confirmation in confirmations:
        assert isinstance(confirmation, commands.Basic.Ack), confirmation
    return len(confirmations)
