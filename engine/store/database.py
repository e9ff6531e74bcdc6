"""Connections to the history database and its migrations.

SQLite is the default (``sqlite:///zenflow.db`` in the working folder), opened in WAL mode
with a busy timeout so that the CLI can read while the engine writes. PostgreSQL is used
through psycopg 3; a plain ``postgresql://`` URL selects it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from zenflow.config import redact_url
from zenflow.errors import ConfigurationError, StoreError

# Milliseconds that a SQLite connection waits for a lock held by another connection.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def parse_database_url(url: str) -> URL:
    """Parse a SQLAlchemy URL, choosing psycopg 3 for ``postgresql://``.

    Raises:
        ConfigurationError: the URL is invalid or names an unsupported database.
    """
    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 - parsing the port raises ValueError for "host:x"
    except (ArgumentError, ValueError):
        raise ConfigurationError(
            f"invalid database URL {redact_url(url)!r}: use sqlite:///path/to/zenflow.db or "
            "postgresql://user@host:5432/dbname"
        ) from None
    if parsed.get_backend_name() == "sqlite" and (parsed.host or parsed.port):
        raise ConfigurationError(
            f"invalid SQLite URL {redact_url(url)!r}: use three slashes for a relative path "
            "(sqlite:///zenflow.db) or four for an absolute one (sqlite:////var/lib/zenflow.db)"
        )
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigurationError(
            f"unsupported database {parsed.get_backend_name()!r} in {redact_url(url)!r}: "
            "zenflow supports SQLite and PostgreSQL"
        )
    return parsed


def create_database_engine(
    url: str, *, immediate_transactions: bool = False, must_exist: bool = False
) -> Engine:
    """Create a SQLAlchemy engine for the history database.

    ``immediate_transactions`` makes every SQLite transaction take the write lock at BEGIN.
    The engine needs it because it reads and then writes in one transaction, and a deferred
    transaction that later needs the lock can fail at once with "database is locked",
    whatever the busy timeout. ``must_exist`` rejects a SQLite file that does not
    exist instead of creating an empty one, for commands that only read.
    """
    parsed = parse_database_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            folder = Path(database).expanduser().resolve().parent
            if not folder.is_dir():
                raise ConfigurationError(
                    f"cannot open SQLite database {database!r}: folder {folder} does not exist"
                )
            if must_exist and not Path(database).expanduser().exists():
                raise StoreError(
                    f"SQLite database {database!r} does not exist; run `zenflow db upgrade` "
                    "to create it, or check --database-url"
                )
        engine = create_engine(
            parsed,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )
        _configure_sqlite(engine, immediate_transactions)
        return engine
    # No pool_pre_ping: it costs a round trip per transaction. A connection that died is
    # invalidated when its statement fails, and the engine retries the message.
    return create_engine(parsed, pool_size=8, max_overflow=4, pool_recycle=3600)


def _configure_sqlite(engine: Engine, immediate: bool) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event, not the sqlite3 module, start transactions.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # NORMAL in WAL mode keeps every commit across a process crash; only a power loss
        # or OS crash can lose the last commits.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str | None = None, connection: Any = None) -> Config:
    """Return an alembic Config for the packaged migrations, without needing alembic.ini."""
    config = Config()
    location = resources.files("engine.store") / "migrations"
    config.set_main_option("script_location", str(location))
    if url is not None:
        config.attributes["url"] = url
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(url: str) -> tuple[str | None, str]:
    """Migrate the database at ``url`` to the latest schema; return (before, after) revisions.

    Raises:
        StoreError: the database is unreachable or a migration failed.
    """
    engine = create_database_engine(url)
    try:
        with translate_errors(url):
            before = current_revision(engine)
            with engine.begin() as connection:
                command.upgrade(alembic_config(connection=connection), "head")
            return before, head_revision()
    finally:
        engine.dispose()


def check_schema(engine: Engine, url: str) -> None:
    """Raise StoreError unless the database is migrated to the latest schema."""
    with translate_errors(url):
        current = current_revision(engine)
    head = head_revision()
    if current != head:
        shown = "an empty database" if current is None else f"revision {current}"
        raise StoreError(
            f"database {redact_url(url)} is not migrated (found {shown}, expected revision "
            f"{head}); run `zenflow db upgrade` with the same database URL first"
        )


@contextlib.contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """Turn SQLAlchemy and driver errors into StoreError, without the URL's password."""
    try:
        yield
    except DBAPIError as error:
        original = str(error.orig).strip().splitlines()
        detail = original[0] if original else type(error.orig).__name__
        raise StoreError(f"database {redact_url(url)} failed: {redact_url(detail)}") from error
    except SQLAlchemyError as error:
        raise StoreError(f"database {redact_url(url)} failed: {redact_url(str(error))}") from error
