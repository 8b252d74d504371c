"""Audit log of money movements, and one ledger row per (reservation, kind).

* ``audit_events``: who moved money and why, written in the same transaction as
  the ledger entry it describes.
* ``uq_ledger_entries_reservation_kind``: a reservation has at most one hold, one
  charge and one release, enforced by the database as well as by the conditional
  UPDATE on the reservation's status. (Entries without a reservation have a NULL
  there; NULLs are distinct in a unique index on SQLite and PostgreSQL alike.)

Both are plain CREATEs, so no SQLite batch mode is needed. Keep
`control_plane/tables.py` in step.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from control_plane.migrations.online import create_index_online

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("company_id", sa.String(32), sa.ForeignKey("companies.id"), nullable=True),
        sa.Column("amount_micro", sa.BigInteger(), nullable=True),
        sa.Column("reservation_id", sa.String(32), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_audit_events_company_created", "audit_events", ["company_id", "created_at"])
    op.create_index("ix_audit_events_created", "audit_events", ["created_at"])
    # An existing table: built concurrently (control_plane/migrations/online.py).
    create_index_online(
        "uq_ledger_entries_reservation_kind",
        "ledger_entries",
        ["reservation_id", "kind"],
        unique=True,
    )


def downgrade() -> None:
    op.drop_index("uq_ledger_entries_reservation_kind", table_name="ledger_entries")
    op.drop_table("audit_events")
