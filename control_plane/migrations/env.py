"""Alembic environment, driven programmatically by `control_plane.migrate.upgrade`.

The database URL arrives in ``config.attributes["database_url"]`` (not in the ini
options, whose interpolation would mangle a ``%`` in a password). On PostgreSQL an
advisory lock serialises concurrent starts, so two control planes booting together
with ``LLMGW_AUTO_MIGRATE=1`` do not both create the tables.

The previous version keeps serving while this runs (docs/operations.md), so on
PostgreSQL the run is shaped not to stall it:

* each migration commits on its own (``transaction_per_migration``): a lock taken by
  one (an ALTER TABLE's ACCESS EXCLUSIVE) is released when it ends, not held until
  the last revision of the run is done;
* ``lock_timeout`` (`MIGRATION_LOCK_TIMEOUT`): a statement that waits for a table
  lock queues every later query on that table behind it, so it gives up after a
  few seconds (the run fails, nothing half-applied within the migration, and can be
  rerun) rather than stalling traffic behind a long transaction;
* ``statement_timeout = 0``: a role's statement timeout (docs/operations.md advises
  one for the gateway) must not cut a concurrent index build or a backfill midway.
"""

from __future__ import annotations

import time

from alembic import context
from sqlalchemy import Connection, text

from control_plane.db import create_sync_engine

MIGRATION_LOCK_ID = 0x6C6C6D67  # "llmg"
MIGRATION_LOCK_TIMEOUT = "5s"
MIGRATION_LOCK_POLL_SECONDS = 0.2


def _take_migration_lock(connection: Connection) -> None:
    """The advisory lock that serialises migrate runs, polled rather than awaited: a
    run waiting inside `pg_advisory_lock` holds a snapshot, which the holder's
    `CREATE INDEX CONCURRENTLY` must wait out, while the waiter waits for the
    holder's lock: PostgreSQL found the deadlock and failed the second of two
    control planes booting together with ``LLMGW_AUTO_MIGRATE=1``. Between tries
    this session holds no transaction, so a concurrent build never waits on it."""
    query = text("SELECT pg_try_advisory_lock(:id)")
    while not connection.execute(query, {"id": MIGRATION_LOCK_ID}).scalar_one():
        connection.commit()
        time.sleep(MIGRATION_LOCK_POLL_SECONDS)


def run_migrations_online() -> None:
    database_url = context.config.attributes.get("database_url")
    if not isinstance(database_url, str):
        raise RuntimeError("control_plane.migrate.upgrade() passes the database URL")
    engine = create_sync_engine(database_url)
    try:
        with engine.connect() as connection:
            is_postgres = connection.dialect.name == "postgresql"
            if is_postgres:
                _take_migration_lock(connection)
                # Session settings, after the advisory lock (whose wait is another
                # migrate run's, not traffic's).
                connection.execute(text("SET statement_timeout = 0"))
                connection.execute(
                    text("SELECT set_config('lock_timeout', :value, false)"),
                    {"value": MIGRATION_LOCK_TIMEOUT},
                )
                connection.commit()
            try:
                context.configure(
                    connection=connection,
                    target_metadata=None,
                    render_as_batch=connection.dialect.name == "sqlite",
                    transaction_per_migration=True,
                )
                with context.begin_transaction():
                    context.run_migrations()
            finally:
                if is_postgres:
                    connection.execute(
                        text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID}
                    )
                    connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
run_migrations_online()
