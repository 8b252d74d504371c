"""Sign-out (``POST /v1/auth/logout``): every access-token request asks whether its
jti was revoked, so revocations are looked up by kind and value.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from alembic import op

from control_plane.migrations.online import create_index_online

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_index_online("ix_revocations_kind_value", "revocations", ["kind", "value"])


def downgrade() -> None:
    op.drop_index("ix_revocations_kind_value", table_name="revocations")
