"""A budget's thresholds can be told again after an edit: ``budget_events.superseded_at``.

One ``budget.threshold`` event per budget x period x threshold was a unique key,
so a threshold told once could never be told again in that period: an owner who
raised a budget from 100 to 1,000 after its 80 % event heard nothing when the
spend reached 800, and a period changed to one starting at the same instant
(daily to weekly on a Monday) inherited the old one's events. An edit now marks
the events of the thresholds the spend no longer reaches as superseded
(`budgets.rearm`); the key holds among the events not superseded only. A
superseded event still pending is delivered all the same (it told the truth when
queued). ``ix_budget_events_created`` serves the retention sweep
(`budgets.prune_events`).
Keep `control_plane/tables.py` in step.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from control_plane.migrations.online import create_index_online

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

KEY = "uq_budget_events_budget_period_percent"
LIVE = sa.text("superseded_at IS NULL")
CREATED = "ix_budget_events_created"


def upgrade() -> None:
    with op.batch_alter_table("budget_events") as batch:
        batch.add_column(sa.Column("superseded_at", sa.DateTime(timezone=True), nullable=True))
        batch.drop_constraint(KEY, type_="unique")
    op.create_index(
        KEY, "budget_events", ["budget_id", "period_start", "percent"], unique=True,
        postgresql_where=LIVE, sqlite_where=LIVE,
    )  # fmt: skip
    create_index_online(CREATED, "budget_events", ["created_at"])


def downgrade() -> None:
    op.drop_index(CREATED, table_name="budget_events")
    op.drop_index(KEY, table_name="budget_events")
    op.execute("DELETE FROM budget_events WHERE superseded_at IS NOT NULL")
    with op.batch_alter_table("budget_events") as batch:
        batch.create_unique_constraint(KEY, ["budget_id", "period_start", "percent"])
        batch.drop_column("superseded_at")
