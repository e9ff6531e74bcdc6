"""The outbox: messages committed with the history that caused them, until RabbitMQ has them.

The engine publishes a step's outbox rows after its transaction commits, notes the rows that
RabbitMQ confirmed, and deletes those in batches. Rows left by a crash or by a failed publish
are published again when the engine starts and by its periodic sweep.
"""

from __future__ import annotations

import json
import threading

from sqlalchemy import Engine, Table, select

from engine.store.models import OutboxMessage
from engine.writer import OutgoingMessage, Sql, delete_outbox

OUTBOX: Table = OutboxMessage.__table__  # type: ignore[assignment]


class Outbox:
    """The outbox table, with the ids that RabbitMQ confirmed and that wait for deletion."""

    def __init__(self, database: Engine, sql: Sql) -> None:
        self.database = database
        self.sql = sql
        self._confirmed: list[str] = []
        self._confirmed_lock = threading.Lock()

    def confirm(self, ids: list[str]) -> None:
        """Note rows that RabbitMQ confirmed; :meth:`flush_confirmed` deletes them."""
        with self._confirmed_lock:
            self._confirmed.extend(ids)

    def confirmed(self) -> set[str]:
        with self._confirmed_lock:
            return set(self._confirmed)

    def flush_confirmed(self) -> int:
        """Delete the rows confirmed so far; return how many."""
        with self._confirmed_lock:
            confirmed, self._confirmed = self._confirmed, []
        if not confirmed:
            return 0
        try:
            with self.database.begin() as connection:
                delete_outbox(connection, self.sql, confirmed)
        except BaseException:
            self.confirm(confirmed)
            raise
        return len(confirmed)

    def pending(self, limit: int = 1000, after_id: str = "") -> list[OutgoingMessage]:
        """Return messages not deleted yet, by id, with their creation time."""
        with self.database.connect() as connection:
            rows = connection.execute(
                select(OUTBOX).where(OUTBOX.c.id > after_id).order_by(OUTBOX.c.id).limit(limit)
            )
            return [
                OutgoingMessage(
                    id=row.id,
                    run_id=row.run_id,
                    exchange=row.exchange,
                    routing_key=row.routing_key,
                    body=row.body,
                    properties=json.loads(row.properties),
                    created_at=row.created_at,
                )
                for row in rows
            ]
