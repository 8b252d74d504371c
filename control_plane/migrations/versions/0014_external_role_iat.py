"""An external user's role is ordered by its tokens' ``iat``: ``users.external_role_iat``.

The role of a user provisioned from a trusted external JWT followed whichever token
came last, so a demoted owner replaying a token issued before its demotion (and not
expired yet) was an owner again in our rows, its API keys too, for good
(`external_auth.provision`). The column holds the ``iat`` of the token that last set
the role; an older token's role is not taken. NULL for local users, and for external
users until a token with an ``iat`` sets their role.
Keep `control_plane/tables.py` in step.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("external_role_iat", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # Not a batch: rebuilding `users` on SQLite fails on the keys that reference it;
    # SQLite (3.35+) drops a plain column in place.
    op.drop_column("users", "external_role_iat")
