"""``ix_budget_periods_start``: the retention sweep's index (`budgets.prune_periods`).

A budget's counters row per period was kept forever (a daily budget wrote 365 a
year); the sweeper now deletes the rows of periods long ended, found by their
start without reading the whole table each sweep.
Keep `control_plane/tables.py` in step.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

from alembic import op

from control_plane.migrations.online import create_index_online

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

START = "ix_budget_periods_start"


def upgrade() -> None:
    create_index_online(START, "budget_periods", ["period_start"])


def downgrade() -> None:
    op.drop_index(START, table_name="budget_periods")
