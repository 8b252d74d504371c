"""Abuse limits (issue 12.6): what a chat session holds, counted on its row, and an
index for an owner's session listing.

* ``chat_sessions.message_count`` / ``content_bytes``: the number of messages and
  the UTF-8 bytes of their content, kept by `chat_sessions.append_messages` in the
  same conditional UPDATE that enforces ``LLMGW_MAX_SESSION_MESSAGES`` /
  ``LLMGW_MAX_SESSION_BYTES``; backfilled here from the existing messages.
* ``ix_chat_sessions_company_updated`` (company_id, updated_at, id): an owner lists
  its company's sessions newest first; without it PostgreSQL read every company's
  sessions (one company's million sessions slowed every other owner's listing 10x).

Plain ``add_column`` with a server default, so SQLite needs no batch mode.
Keep `control_plane/tables.py` in step.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from control_plane.migrations.online import create_index_online

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for name in ("message_count", "content_bytes"):
        op.add_column(
            "chat_sessions",
            sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"),
        )
    octets = (
        "octet_length(m.content)"
        if op.get_bind().dialect.name == "postgresql"
        else "length(CAST(m.content AS BLOB))"
    )
    # The backfill commits on its own, so the ADD COLUMNs' ACCESS EXCLUSIVE lock is
    # released before it rather than held for all of it (it still locks every
    # session's row while it runs: an accepted exception in test_migration_safety).
    with op.get_context().autocommit_block():
        op.execute(
            "UPDATE chat_sessions SET "
            "message_count = (SELECT count(*) FROM chat_messages m"
            " WHERE m.session_id = chat_sessions.id), "
            f"content_bytes = (SELECT coalesce(sum({octets}), 0) FROM chat_messages m"
            " WHERE m.session_id = chat_sessions.id)"
        )
    create_index_online(
        "ix_chat_sessions_company_updated", "chat_sessions", ["company_id", "updated_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_chat_sessions_company_updated", table_name="chat_sessions")
    op.drop_column("chat_sessions", "content_bytes")
    op.drop_column("chat_sessions", "message_count")
