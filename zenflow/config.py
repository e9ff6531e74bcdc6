"""Settings shared by clients, the engine, the agent and the CLI.

Each setting comes from an explicit argument (a CLI flag), else from its ``ZENFLOW_*``
environment variable, else from a default that works on a developer's machine with a local
RabbitMQ.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from zenflow import _tls
from zenflow.errors import ConfigurationError

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_DATABASE_URL = "sqlite:///zenflow.db"
DEFAULT_NAMESPACE = "zenflow"

_NAMESPACE = re.compile(r"^[A-Za-z0-9_\-]{1,50}$")
_URL_PASSWORD = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]{0,30}://[^:/@\s]*:)(?P<secret>[^@\s]*)@"
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Connection settings.

    ``namespace`` prefixes every exchange and queue name, so that several independent
    zenflow installations (or test runs) can share one RabbitMQ virtual host.
    """

    amqp_url: str = DEFAULT_AMQP_URL
    database_url: str = DEFAULT_DATABASE_URL
    namespace: str = DEFAULT_NAMESPACE

    def __repr__(self) -> str:
        # The URLs may carry passwords, and reprs end up in logs and tracebacks.
        return (
            f"Settings(amqp_url={redact_url(self.amqp_url)!r}, "
            f"database_url={redact_url(self.database_url)!r}, namespace={self.namespace!r})"
        )

    def __post_init__(self) -> None:
        if not _NAMESPACE.match(self.namespace):
            raise ConfigurationError(
                f"invalid namespace {self.namespace!r}: use 1 to 50 letters, digits, '_' or '-'"
            )
        problem = _amqp_url_problem(self.amqp_url)
        if problem is not None:
            raise ConfigurationError(
                f"invalid AMQP URL {redact_url(self.amqp_url)!r}: {problem}. Examples: "
                "amqp://localhost:5672/, amqp://user@rabbitmq.internal:5672/vhost, "
                "amqps://user@rabbitmq.internal:5671/?cafile=/etc/ssl/rabbitmq-ca.pem"
            )

    @classmethod
    def load(
        cls,
        *,
        amqp_url: str | None = None,
        database_url: str | None = None,
        namespace: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Build settings from the given values, then ``ZENFLOW_*`` variables, then defaults."""
        env = os.environ if environ is None else environ
        return cls(
            amqp_url=_first(amqp_url, env.get("ZENFLOW_AMQP_URL"), DEFAULT_AMQP_URL),
            database_url=_first(
                database_url, env.get("ZENFLOW_DATABASE_URL"), DEFAULT_DATABASE_URL
            ),
            namespace=_first(namespace, env.get("ZENFLOW_NAMESPACE"), DEFAULT_NAMESPACE),
        )


def _amqp_url_problem(url: str) -> str | None:
    if not url.startswith(("amqp://", "amqps://")):
        return "it must start with amqp:// or amqps://"
    try:
        urlsplit(url).port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return "the port must be a number"
    try:
        _tls.parse(url)
    except ConfigurationError as error:
        return str(error)
    return None


def _first(*values: str | None) -> Any:
    for value in values:
        if value:
            return value
    return None


def redact_url(text: str) -> str:
    """Replace the password of every URL in ``text`` with ``***``."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


def app_modules_from_env(values: list[str] | None) -> list[str]:
    """Return the application modules from flags, else from ``ZENFLOW_APP`` (comma-separated)."""
    if values:
        return values
    raw = os.environ.get("ZENFLOW_APP", "")
    return [name.strip() for name in raw.split(",") if name.strip()]
