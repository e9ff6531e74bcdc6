"""Decoding of message properties that pamqp cannot decode (zenflow._amqp_properties)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from pamqp import exceptions, frame, header

from tests.hostile import RawProperties
from zenflow import _amqp_properties


def decoded(properties: dict[str, Any]) -> Any:
    """Encode a content header frame with these raw properties and decode it again."""
    content = header.ContentHeader(body_size=3, properties=RawProperties(properties))
    data = frame.marshal(content, 1)
    _consumed, _channel, unmarshalled = frame.unmarshal(data)
    assert isinstance(unmarshalled, header.ContentHeader)
    return unmarshalled.properties


@pytest.fixture(autouse=True)
def installed() -> None:
    _amqp_properties.install()


def test_undecodable_properties_dropped() -> None:
    properties = decoded(
        {
            "content_type": "application/json",
            "headers": {b"\xfe": 1},
            "delivery_mode": 2,
            "correlation_id": b"\xff\xfe",
            "reply_to": "replies",
            "message_id": "m-1",
            "timestamp": 2**64 - 1,
            "app_id": b"\xc3",
        }
    )

    assert properties.content_type == "application/json"
    assert properties.headers is None
    assert properties.delivery_mode == 2
    assert properties.correlation_id is None
    assert properties.reply_to == "replies"
    assert properties.message_id == "m-1"
    assert properties.timestamp is None
    assert properties.app_id is None


def test_decodable_properties_kept() -> None:
    properties = decoded(
        {
            "headers": {"attempt": 3, "note": "é"},
            "priority": 9,
            "correlation_id": "c-🙂",
            "timestamp": 1_764_863_072,
        }
    )

    assert properties.headers == {"attempt": 3, "note": "é"}
    assert properties.priority == 9
    assert properties.correlation_id == "c-🙂"
    assert properties.timestamp == dt.datetime.fromtimestamp(1_764_863_072, dt.UTC)


def test_property_without_length_still_fails() -> None:
    content = header.ContentHeader(body_size=3, properties=RawProperties({}))
    # The flags announce a correlation id, but its length octet is missing.
    content.properties.raw = b"\x04\x00"
    data = frame.marshal(content, 1)

    with pytest.raises(exceptions.UnmarshalingException):
        frame.unmarshal(data)
