"""A user's sign-ins can all be ended at once: ``users.sign_in_epoch``.

Every access token carries the epoch its user had when it was issued (claim
``sep``), and is refused (401 ``signed_out``) once the user's epoch has moved on.
A promotion to platform admin moves it (`policy.promotion_voids_keys`): the user's
password was chosen by whoever created it, an owner perhaps, who could otherwise
sign in as, or already held a token of, the platform admin the user became. An
integer, not a time: no host's clock decides which tokens end. 0 for every user, and
for tokens issued before the claim existed.
Keep `control_plane/tables.py` in step.

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "users", sa.Column("sign_in_epoch", sa.Integer(), nullable=False, server_default="0")
    )


def downgrade() -> None:
    # In place, as 0014's: rebuilding `users` on SQLite fails on the keys that reference it.
    op.drop_column("users", "sign_in_epoch")
