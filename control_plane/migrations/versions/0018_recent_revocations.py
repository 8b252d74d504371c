"""Indexes for the revocations still in force that the control plane republishes to
the store every few seconds (`control_plane.revocation_republish`): revocations by
``created_at`` among those not lifted, API keys by ``revoked_at`` among the revoked.
Each pass reads only those of the last token life plus longest stream (~16 min).

Online: both indexes are partial and built concurrently (`create_index_online`).
Keep `control_plane/tables.py` in step.

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from control_plane.migrations.online import create_index_online

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

REVOCATIONS = "ix_revocations_in_force_created"
NOT_LIFTED = sa.text("lifted_at IS NULL")
API_KEYS = "ix_api_keys_revoked_at"
REVOKED = sa.text("revoked_at IS NOT NULL")


def upgrade() -> None:
    create_index_online(
        REVOCATIONS, "revocations", ["created_at"],
        postgresql_where=NOT_LIFTED, sqlite_where=NOT_LIFTED,
    )  # fmt: skip
    create_index_online(
        API_KEYS, "api_keys", ["revoked_at"],
        postgresql_where=REVOKED, sqlite_where=REVOKED,
    )  # fmt: skip


def downgrade() -> None:
    op.drop_index(API_KEYS, table_name="api_keys")
    op.drop_index(REVOCATIONS, table_name="revocations")
