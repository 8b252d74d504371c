"""The rank a revocation was made with: ``revocations.actor_role``.

Lifting a revocation needs a rank at least its maker's (`policy.can_lift_revocation`),
and that rank was read from the maker's user row as it is at the lift: a platform
admin placed in a company, demoted to owner later, left every revocation it had made
as platform admin to the company's owners to undo. The role the maker acted with is
now recorded with the revocation; a lift needs the higher of it and the maker's role
now. NULL for revocations made before: their maker's role now, as before.
Keep `control_plane/tables.py` in step.

Revision ID: 0020
Revises: 0019
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("revocations", sa.Column("actor_role", sa.String(16), nullable=True))


def downgrade() -> None:
    op.drop_column("revocations", "actor_role")
