"""Schema changes that leave a live PostgreSQL serving (docs/operations.md, "Migrations").

`llm-gateway migrate` runs while the previous version keeps serving. A plain
``CREATE INDEX`` holds a SHARE lock on its table for the whole build, which blocks
every INSERT, UPDATE and DELETE on it: on reservations, the ledger or usage records
(millions of rows a year) that is every tenant's inits and settlements, for seconds
to minutes. ``CREATE INDEX CONCURRENTLY`` takes SHARE UPDATE EXCLUSIVE instead,
which no read or write waits on; PostgreSQL refuses it inside a transaction, hence
the autocommit block. `tests/test_migration_safety.py` fails a migration that builds
an index on an existing table any other way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

# A concurrent build that failed (cancelled, a duplicate for a unique index) leaves
# an INVALID index of that name behind, which IF NOT EXISTS would then keep forever.
_INVALID = sa.text(
    "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
    " WHERE c.relname = :name AND NOT i.indisvalid"
    " AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
)


def create_index_online(name: str, table: str, columns: Sequence[str], **kw: Any) -> None:
    """`op.create_index` that never blocks writes to `table` on PostgreSQL.

    Commits the migration's transaction so far (Alembic's autocommit block), drops a
    leftover invalid index of this name, then builds it concurrently; a rerun after
    a failure finds a valid index and leaves it (IF NOT EXISTS). The build waits out
    transactions already running on the table with no `lock_timeout` (its lock makes
    no query queue behind it, so waiting costs traffic nothing, while the migrate
    run's short `lock_timeout` would cut it on any request older than that). Other
    databases (SQLite, the dev database) get the plain CREATE INDEX.
    """
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        op.create_index(name, table, list(columns), **kw)
        return
    with op.get_context().autocommit_block():
        if op.get_bind().execute(_INVALID, {"name": name}).first() is not None:
            op.execute(sa.text(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"'))
        saved = op.get_bind().execute(sa.text("SHOW lock_timeout")).scalar_one()
        op.execute(sa.text("SET lock_timeout = 0"))
        try:
            op.create_index(
                name, table, list(columns), postgresql_concurrently=True, if_not_exists=True, **kw
            )
        finally:
            op.get_bind().execute(
                sa.text("SELECT set_config('lock_timeout', :value, false)"), {"value": saved}
            )
