"""Cache- and reasoning-aware prices (issue 15.3, DESIGN §11 "Prices").

* ``reservations.price_cached_input_per_mtok`` / ``price_cache_write_per_mtok``:
  the cache rates at init (exact decimal strings, NULL: the input price), so a
  settlement prices each part of the input at the rates the hold was taken with.
* ``usage_records.cached_input_tokens`` / ``cache_write_tokens`` /
  ``reasoning_tokens``: how the input and output split (0 for older rows).

Plain ``add_column`` (nullable, or with a server default), so SQLite needs no batch
mode. Keep `control_plane/tables.py` in step.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

PRICES = ("price_cached_input_per_mtok", "price_cache_write_per_mtok")
COUNTS = ("cached_input_tokens", "cache_write_tokens", "reasoning_tokens")


def upgrade() -> None:
    for name in PRICES:
        op.add_column("reservations", sa.Column(name, sa.String(40), nullable=True))
    for name in COUNTS:
        op.add_column(
            "usage_records", sa.Column(name, sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    for name in COUNTS:
        op.drop_column("usage_records", name)
    for name in PRICES:
        op.drop_column("reservations", name)
