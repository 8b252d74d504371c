"""The ``llm:admin`` scope: admin actions need it on the principal (policy).

Keys minted before it existed with every chat scope of an owner or admin were
default keys ("all of the user's scopes"), and their holders used them for admin
work: they get ``llm:admin`` so they keep working. Keys narrowed to fewer scopes
never had admin power and do not get it. Data only; no schema change.

Revision ID: 0005a
Revises: 0004
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0005a"
down_revision = "0004"
branch_labels = None
depends_on = None

CHAT_SCOPES = {"llm:chat:send", "llm:chat:read", "llm:chat:delete"}
ADMIN_SCOPE = "llm:admin"


def upgrade() -> None:
    db = op.get_bind()
    rows = db.execute(
        sa.text(
            "SELECT api_keys.id, api_keys.scopes FROM api_keys "
            "JOIN users ON users.id = api_keys.user_id "
            "WHERE users.role IN ('owner', 'admin')"
        )
    ).all()
    for key_id, raw in rows:
        scopes = json.loads(raw)
        if CHAT_SCOPES <= set(scopes) and ADMIN_SCOPE not in scopes:
            db.execute(
                sa.text("UPDATE api_keys SET scopes = :scopes WHERE id = :id"),
                {"scopes": json.dumps([*scopes, ADMIN_SCOPE]), "id": key_id},
            )


def downgrade() -> None:
    # The code before this revision ignores scopes it does not know: nothing to undo.
    pass
