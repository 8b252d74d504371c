"""Expired sign-outs are deleted by the sweeper (`logout.purge_expired`), found by
reason and expiry rather than by a scan of every revocation.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from alembic import op

from control_plane.migrations.online import create_index_online

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_index_online("ix_revocations_reason_expires", "revocations", ["reason", "expires_at"])


def downgrade() -> None:
    op.drop_index("ix_revocations_reason_expires", table_name="revocations")
