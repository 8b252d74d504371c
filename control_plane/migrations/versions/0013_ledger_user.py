"""A member's ledger as index ranges: ``ledger_entries.user_id``.

A member's ``GET /v1/credits`` lists the company's own entries (grants,
adjustments) and its own streams' holds, charges and releases. Whose stream an
entry was for lived only on its reservation, so a member's page was picked out of
the company's whole ledger, one reservation lookup per entry (a member with no
streams read all 900,000 entries of a company of 300,000 streams: 0.5 s a page).

* ``user_id``: the reservation's user, copied onto each of its rows (the existing
  ones from their reservations here); NULL exactly when ``reservation_id`` is
  (``ck_ledger_entries_user``), so no write path can leave a stream's row out of
  its member's view unnoticed.
* ``ix_ledger_entries_company_user_created``: a member's page is then two ranges of
  it, the company's own entries (``user_id IS NULL``) and its own, newest first.
* ``uq_ledger_entries_company_idempotency_key`` becomes partial (``WHERE
  idempotency_key IS NOT NULL``): the same rule (NULLs never collided), but the
  stream rows, which never carry a key, no longer take an entry in it. So a stream's
  ledger rows still cost one entry in each of four indexes, as before.

The backfill rewrites every stream row once and the indexes and check are built
under a write lock: 25 to 45 s for 900,000 entries on PostgreSQL (a shared, noisy
machine), writes to the ledger blocked meanwhile.
Keep `control_plane/tables.py` in step.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from control_plane.migrations.online import create_index_online

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

INDEX = "ix_ledger_entries_company_user_created"
CHECK = "ck_ledger_entries_user"
KEYS = "uq_ledger_entries_company_idempotency_key"
HAS_KEY = sa.text("idempotency_key IS NOT NULL")


def upgrade() -> None:
    op.add_column("ledger_entries", sa.Column("user_id", sa.String(32), nullable=True))
    # Reservations are never deleted, so every stream row finds its user.
    op.execute(
        "UPDATE ledger_entries SET user_id = (SELECT reservations.user_id FROM reservations"
        " WHERE reservations.id = ledger_entries.reservation_id)"
        " WHERE reservation_id IS NOT NULL"
    )
    with op.batch_alter_table("ledger_entries") as batch:
        batch.create_check_constraint(CHECK, "(user_id IS NULL) = (reservation_id IS NULL)")
        batch.drop_constraint(KEYS, type_="unique")
    op.create_index(
        KEYS, "ledger_entries", ["company_id", "idempotency_key"], unique=True,
        postgresql_where=HAS_KEY, sqlite_where=HAS_KEY,
    )  # fmt: skip
    # The member index is new, not a swap: built concurrently once the rest committed.
    create_index_online(INDEX, "ledger_entries", ["company_id", "user_id", "created_at"])


def downgrade() -> None:
    op.drop_index(INDEX, table_name="ledger_entries")
    op.drop_index(KEYS, table_name="ledger_entries")
    with op.batch_alter_table("ledger_entries") as batch:
        batch.create_unique_constraint(KEYS, ["company_id", "idempotency_key"])
        batch.drop_constraint(CHECK, type_="check")
        batch.drop_column("user_id")
