"""Identity and tenancy: external identities, revocations, per-company providers
and models.

* ``companies.external_id`` / ``users.external_id``: who a trusted external JWT's
  ``company_id`` / ``sub`` is; ``disabled_at`` marks a revoked company or user.
* ``company_providers``: a company's own provider key, Fernet-encrypted.
* ``company_models``: a company's added or overridden models (partial specs).
* ``revocations``: the record of every revocation (the edge reads the store's copy).

The new columns are nullable and their uniqueness is a unique index, so the upgrade
needs no SQLite batch mode (which would recreate tables that others reference).
Keep `control_plane/tables.py` in step.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from control_plane.migrations.online import create_index_online

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _time(name: str, *, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    for table in ("companies", "users"):
        op.add_column(table, sa.Column("external_id", sa.String(200), nullable=True))
        op.add_column(table, _time("disabled_at", nullable=True))
        create_index_online(f"uq_{table}_external_id", table, ["external_id"], unique=True)
    op.create_table(
        "company_providers",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("company_id", sa.String(32), sa.ForeignKey("companies.id"), nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("api_key_encrypted", sa.Text(), nullable=True),
        _time("created_at"),
        _time("updated_at"),
        sa.UniqueConstraint("company_id", "provider", name="uq_company_providers_company_provider"),
    )
    op.create_table(
        "company_models",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("company_id", sa.String(32), sa.ForeignKey("companies.id"), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        _time("updated_at"),
        sa.UniqueConstraint("company_id", "model_id", name="uq_company_models_company_model"),
    )
    op.create_table(
        "revocations",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.String(200), nullable=False),
        sa.Column("company_id", sa.String(32), nullable=True),
        sa.Column("reason", sa.String(500), nullable=True),
        sa.Column("actor", sa.String(100), nullable=False),
        _time("created_at"),
        _time("expires_at"),
        _time("lifted_at", nullable=True),
        sa.CheckConstraint("kind IN ('user', 'company', 'jti')", name="ck_revocations_kind"),
    )
    op.create_index("ix_revocations_company_created", "revocations", ["company_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_revocations_company_created", table_name="revocations")
    op.drop_table("revocations")
    op.drop_table("company_models")
    op.drop_table("company_providers")
    for table in ("users", "companies"):
        op.drop_index(f"uq_{table}_external_id", table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("disabled_at")
            batch.drop_column("external_id")
