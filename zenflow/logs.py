"""Logging setup for zenflow's processes: structlog for everything, stdlib loggers included.

Lines are JSON when stderr is not a terminal and readable key=value lines when it is. The
loggers of pika, aio-pika, aiormq, SQLAlchemy and alembic go through the same processors,
and every string value passes through :func:`zenflow.config.redact_url`, so a URL password
does not reach the output even when a library puts it in a message.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

from zenflow.config import redact_url
from zenflow.errors import ConfigurationError

_LIBRARY_LOGGERS = ("pika", "aio_pika", "aiormq", "sqlalchemy", "alembic", "asyncio")


def _redact(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and "://" in value:
            event[key] = redact_url(value)
    return event


def configure_logging(level: str | None = None, *, json: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger for a zenflow process.

    Parameters:
        level: a level name such as ``"info"``; defaults to ``ZENFLOW_LOG_LEVEL`` or info.
        json: force JSON (True) or console (False) output; by default JSON unless stderr is
            a terminal.
    """
    level_name = (level or os.environ.get("ZENFLOW_LOG_LEVEL") or "info").upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        raise ConfigurationError(
            f"invalid log level {level_name.lower()!r}: use debug, info, warning or error "
            "(--log-level or ZENFLOW_LOG_LEVEL)"
        )
    if json is None:
        json = not sys.stderr.isatty()

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact,
    ]
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)

    structlog.configure(
        # filter_by_level drops a line below the level before any processing happens.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Library chatter (every connection attempt, every SQL statement) only at debug.
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    # psycopg warns when it discards the rest of a pipeline after a failed statement. That is
    # how the engine detects a concurrent update, which it handles itself.
    logging.getLogger("psycopg").setLevel(max(numeric, logging.ERROR))
    logging.captureWarnings(True)
