"""Key pools and fallback chains (issue 16.1, 16.2): a company provider's further
keys, and the fallback chain (with its prices) a reservation may be settled at.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("company_providers") as batch:
        batch.add_column(sa.Column("extra_keys_encrypted", sa.Text(), nullable=True))
    with op.batch_alter_table("reservations") as batch:
        batch.add_column(sa.Column("fallbacks", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reservations") as batch:
        batch.drop_column("fallbacks")
    with op.batch_alter_table("company_providers") as batch:
        batch.drop_column("extra_keys_encrypted")
