"""Add timers, events, child links, event waits and one active run per business id.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 19:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_RESULT_WHERE = "kind IN ('task_completed', 'task_failed')"
RESULT_WHERE = (
    "kind IN ('task_completed', 'task_failed', 'child_completed', 'child_failed', "
    "'timer_fired', 'event_delivered', 'event_timed_out', 'wait_cancelled')"
)
ACTIVE_WHERE = "status IN ('running', 'paused')"
IDENTIFIER = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    _check_active_business_ids()
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("parent_step", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("waiting_for", sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f("ix_runs_parent_id"), ["parent_id"], unique=False)
        batch_op.create_index(
            "uq_runs_active_business_id",
            ["business_id"],
            unique=True,
            sqlite_where=sa.text(ACTIVE_WHERE),
            postgresql_where=sa.text(ACTIVE_WHERE),
        )

    with op.batch_alter_table("history", schema=None) as batch_op:
        batch_op.add_column(sa.Column("grouping", sa.String(length=10), nullable=True))
        batch_op.add_column(sa.Column("fire_at", sa.DateTime(), nullable=True))
        batch_op.drop_index(
            "uq_history_one_result_per_step",
            sqlite_where=sa.text(OLD_RESULT_WHERE),
            postgresql_where=sa.text(OLD_RESULT_WHERE),
        )
        batch_op.create_index(
            "uq_history_one_result_per_step",
            ["run_id", "step"],
            unique=True,
            sqlite_where=sa.text(RESULT_WHERE),
            postgresql_where=sa.text(RESULT_WHERE),
        )

    op.create_table(
        "timers",
        sa.Column("id", IDENTIFIER, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("fire_at", sa.DateTime(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_timers_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_timers")),
        sa.UniqueConstraint("run_id", "step", name=op.f("uq_timers_run_id")),
    )
    op.create_index("ix_timers_status_fire_at", "timers", ["status", "fire_at"], unique=False)

    op.create_table(
        "events",
        sa.Column("id", IDENTIFIER, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("message_id", sa.String(length=255), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_events_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        sa.UniqueConstraint("run_id", "message_id", name=op.f("uq_events_run_id")),
    )
    op.create_index("ix_events_run_id_status", "events", ["run_id", "status"], unique=False)


def _check_active_business_ids() -> None:
    """Stop with a clear message if two active runs share a business id.

    Earlier versions allowed it; from this revision a business id names at most one active
    run, and the unique index below cannot be created over such rows.
    """
    rows = (
        op.get_bind()
        .execute(
            sa.text(
                f"SELECT business_id, COUNT(*) FROM runs WHERE business_id IS NOT NULL "
                f"AND {ACTIVE_WHERE} GROUP BY business_id HAVING COUNT(*) > 1"
            )
        )
        .fetchall()
    )
    if rows:
        shared = ", ".join(repr(row[0]) for row in rows[:10])
        raise RuntimeError(
            f"cannot upgrade: {len(rows)} business ids belong to several running runs ({shared}). "
            "Wait until those runs finish, or clear the business id of the older ones "
            "(UPDATE runs SET business_id = NULL WHERE id = '...'), then run "
            "`zenflow db upgrade` again"
        )


def downgrade() -> None:
    op.drop_index("ix_events_run_id_status", table_name="events")
    op.drop_table("events")
    op.drop_index("ix_timers_status_fire_at", table_name="timers")
    op.drop_table("timers")
    with op.batch_alter_table("history", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_history_one_result_per_step",
            sqlite_where=sa.text(RESULT_WHERE),
            postgresql_where=sa.text(RESULT_WHERE),
        )
        batch_op.create_index(
            "uq_history_one_result_per_step",
            ["run_id", "step"],
            unique=True,
            sqlite_where=sa.text(OLD_RESULT_WHERE),
            postgresql_where=sa.text(OLD_RESULT_WHERE),
        )
        batch_op.drop_column("fire_at")
        batch_op.drop_column("grouping")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_runs_active_business_id",
            sqlite_where=sa.text(ACTIVE_WHERE),
            postgresql_where=sa.text(ACTIVE_WHERE),
        )
        batch_op.drop_index(batch_op.f("ix_runs_parent_id"))
        batch_op.drop_column("waiting_for")
        batch_op.drop_column("parent_step")
        batch_op.drop_column("parent_id")
