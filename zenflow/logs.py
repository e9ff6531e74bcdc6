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


class _HandledConnectionErrors(logging.Filter):
    """Log connection failures that aio-pika's robust connection handles as warnings.

    Engines and agents reconnect by themselves and log ``amqp_connection_lost`` and
    ``amqp_reconnected``. Meanwhile aiormq 7 logs the lost connection and every failed
    reconnection attempt at error level. aio-pika 10's robust channel also tries to reopen
    itself on the connection that just closed, which fails with ``RuntimeError:
    <Connection ...> closed`` or ``ChannelInvalidStateError: No active transport in
    channel`` and is logged at error level. The connection then restores the channel. These
    records stay in the log, at warning level.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and self._handled(record):
            record.levelno = logging.WARNING
            record.levelname = "WARNING"
        return True

    @staticmethod
    def _handled(record: logging.LogRecord) -> bool:
        if record.name == "aiormq.connection":
            return str(record.msg).startswith(
                ("error when creating transport", "Unexpected connection close from remote")
            )
        args = record.args if isinstance(record.args, tuple) else ()
        return (
            record.name == "aio_pika.tools"
            and len(args) == 3
            and "RobustChannel._on_close" in repr(args[0])
            and args[1] in ("RuntimeError", "ChannelInvalidStateError")
        )


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
    for name in ("aiormq.connection", "aio_pika.tools"):
        library = logging.getLogger(name)
        if not any(isinstance(item, _HandledConnectionErrors) for item in library.filters):
            library.addFilter(_HandledConnectionErrors())
    # psycopg warns when it discards the rest of a pipeline after a failed statement. That is
    # how the engine detects a concurrent update, which it handles itself.
    logging.getLogger("psycopg").setLevel(max(numeric, logging.ERROR))
    logging.captureWarnings(True)
