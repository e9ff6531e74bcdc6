"""Alembic environment of the zenflow history store.

The database URL comes from the ``connection`` or ``url`` attribute that
``engine.store.migrate`` sets, else from ``ZENFLOW_DATABASE_URL``, else from ``sqlalchemy.url``
in alembic.ini. Run ``zenflow db upgrade`` rather than alembic itself, unless you are writing a
migration.
"""

import os

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from engine.store.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or os.environ.get("ZENFLOW_DATABASE_URL")
    return url or config.get_main_option("sqlalchemy.url") or "sqlite:///zenflow.db"


def run_migrations_offline() -> None:
    """Print the migration SQL instead of running it (``alembic upgrade --sql``)."""
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    connectable = create_engine(_url(), poolclass=pool.NullPool)
    with connectable.connect() as connection:
        _run(connection)


def _run(connection: Connection) -> None:
    # Batch mode lets later migrations alter SQLite tables, which lack ALTER COLUMN.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
