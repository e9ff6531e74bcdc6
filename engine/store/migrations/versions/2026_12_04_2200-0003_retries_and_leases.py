"""Add task run options to history, and kinds and details to timers.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 22:00:00

A task step's history row keeps its retry policy, timeout and heartbeat interval. A timer
row is now also the delay before a task's next attempt (kind ``retry``) or the lease of a
running attempt (kind ``lease``), whose detail holds the agent's last heartbeat.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("history", schema=None) as batch_op:
        batch_op.add_column(sa.Column("options", sa.Text(), nullable=True))
    with op.batch_alter_table("timers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=10), server_default="wait", nullable=False)
        )
        batch_op.add_column(sa.Column("detail", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("timers", schema=None) as batch_op:
        batch_op.drop_column("detail")
        batch_op.drop_column("kind")
    with op.batch_alter_table("history", schema=None) as batch_op:
        batch_op.drop_column("options")
