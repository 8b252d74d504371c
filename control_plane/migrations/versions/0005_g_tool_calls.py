"""Tool calls in session transcripts (DESIGN §11 "Tool calls").

* ``chat_messages.tool_calls``: an assistant message's calls, in OpenAI's shape
  (``[{"id", "type": "function", "function": {"name", "arguments"}}]``).
* ``chat_messages.tool_call_id``: which call a ``tool`` message answers.

Both nullable, so existing rows need nothing; plain ADD COLUMNs work on SQLite
without batch mode. Keep `control_plane/tables.py` in step.

Revision ID: 0005g
Revises: 0005a
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005g"
down_revision = "0005a"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("chat_messages", sa.Column("tool_calls", sa.JSON(), nullable=True))
    op.add_column("chat_messages", sa.Column("tool_call_id", sa.String(256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("chat_messages") as batch:
        batch.drop_column("tool_call_id")
        batch.drop_column("tool_calls")
