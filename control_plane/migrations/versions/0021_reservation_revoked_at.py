"""``reservations.revoked_at``: the stream tokens revoked at the edges with no
``revocations`` row (a deleted chat session's, a silent stream's the sweeper
settled), so the republishing pass (`control_plane.revocation_republish`) can put
their keys back after the store lost them; ``ix_reservations_revoked_at``, partial
on the few rows that have it, for that pass's read of the last ~16 minutes.

Online: a nullable column without a default is a catalog change; the index is built
concurrently (`create_index_online`). Keep `control_plane/tables.py` in step.

Revision ID: 0021
Revises: 0020
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from control_plane.migrations.online import create_index_online

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

INDEX = "ix_reservations_revoked_at"
REVOKED = sa.text("revoked_at IS NOT NULL")


def upgrade() -> None:
    op.add_column(
        "reservations", sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True)
    )
    create_index_online(
        INDEX, "reservations", ["revoked_at"],
        postgresql_where=REVOKED, sqlite_where=REVOKED,
    )  # fmt: skip


def downgrade() -> None:
    op.drop_index(INDEX, table_name="reservations")
    op.drop_column("reservations", "revoked_at")
