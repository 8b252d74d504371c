"""``budget_events.backoff_until``: which undelivered events are backing off, as
against leased by a delivery pass.

An event's ``next_attempt_at`` is either its lease (a pass is posting it) or the end
of its backoff after a failed attempt, and nothing told the two apart. A post that
passes now makes its company's events that are backing off due at once
(`company_webhooks.expedite`), and must never touch one that is leased: another
process posting it would post it twice. A failed attempt writes the same instant to
both columns; an event is backing off while they are equal (a claim moves
``next_attempt_at`` to its lease, and clears this; a process of the previous version
moves the one and not the other, so its claims are never taken for a backoff).
``ix_budget_events_backing_off`` finds a company's, oldest first, among those only.

Online: a nullable column with no default is a catalogue change (no rewrite), and
the partial index is built concurrently (`create_index_online`).
Keep `control_plane/tables.py` in step.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from control_plane.migrations.online import create_index_online

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

BACKING_OFF = "ix_budget_events_backing_off"
WHERE = sa.text("backoff_until IS NOT NULL")


def upgrade() -> None:
    op.add_column(
        "budget_events", sa.Column("backoff_until", sa.DateTime(timezone=True), nullable=True)
    )
    create_index_online(
        BACKING_OFF, "budget_events", ["company_id", "created_at"],
        postgresql_where=WHERE, sqlite_where=WHERE,
    )  # fmt: skip


def downgrade() -> None:
    op.drop_index(BACKING_OFF, table_name="budget_events")
    with op.batch_alter_table("budget_events") as batch:
        batch.drop_column("backoff_until")
