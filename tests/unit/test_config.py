"""Tests for settings helpers: password redaction, log levels, business id checks."""

from __future__ import annotations

import pytest

from zenflow._client_common import build_start
from zenflow.config import redact_url
from zenflow.errors import ConfigurationError, DefinitionError
from zenflow.logs import configure_logging


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("amqp://guest:secret@host:5672/", "amqp://guest:***@host:5672/"),
        ("postgresql+psycopg://u:p%40ss@db/x", "postgresql+psycopg://u:***@db/x"),
        ("no url here", "no url here"),
        ("amqp://host/ without user", "amqp://host/ without user"),
    ],
)
def test_redact_url(text: str, expected: str) -> None:
    assert redact_url(text) == expected


def test_redact_url_is_linear_on_hostile_text() -> None:
    # With an unbounded scheme, the pattern backtracked quadratically over a long run of
    # letters. This text would then take hours, far beyond the suite's per-test timeout.
    text = "a" * 2_000_000 + ":"
    assert redact_url(text) == text


def test_invalid_log_level_rejected() -> None:
    with pytest.raises(ConfigurationError, match="invalid log level 'loud'"):
        configure_logging("loud")


@pytest.mark.parametrize("business_id", ["a\x00b", "line\nbreak", "", "x" * 256])
def test_client_rejects_unusable_business_id(business_id: str) -> None:
    with pytest.raises(DefinitionError, match="invalid business id"):
        build_start("Order", (), {}, business_id=business_id)
