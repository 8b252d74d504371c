"""The console (issue 17): what its aggregates and the admin audit need.

* ``reservations.api_key_id`` / ``usage_records.api_key_id``: the API key a stream
  was opened with (NULL for access tokens and external JWTs), so spend can be
  ranked per key ("top API keys").
* ``usage_records.ttft_ms``: time to first token from the usage webhook
  (``first_token_at - started_at``), NULL when no token came or the sender did not
  say; the console's p50/p95 per model are computed from it in SQL.
* ``audit_events.target``: what an admin action acted on (``api_key:<id>``,
  ``user:<id>``, ``provider:<name>`` …), filterable in ``GET /v1/admin/audit``.
* ``ix_usage_records_company_model_created``: the per-model aggregates.

Nullable columns only: plain ``add_column``, no batch mode on SQLite, and rows
written before this revision simply have no key, TTFT or target.
Keep `control_plane/tables.py` in step.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from control_plane.migrations.online import create_index_online

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("reservations", sa.Column("api_key_id", sa.String(32), nullable=True))
    op.add_column("usage_records", sa.Column("api_key_id", sa.String(32), nullable=True))
    op.add_column("usage_records", sa.Column("ttft_ms", sa.Integer(), nullable=True))
    op.add_column("audit_events", sa.Column("target", sa.String(200), nullable=True))
    create_index_online(
        "ix_usage_records_company_model_created",
        "usage_records",
        ["company_id", "model", "created_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_usage_records_company_model_created", table_name="usage_records")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("target")
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("ttft_ms")
        batch.drop_column("api_key_id")
    with op.batch_alter_table("reservations") as batch:
        batch.drop_column("api_key_id")
