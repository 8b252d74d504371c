"""Alembic environment, driven programmatically by `control_plane.migrate.upgrade`.

The database URL arrives in ``config.attributes["database_url"]`` (not in the ini
options, whose interpolation would mangle a ``%`` in a password). On PostgreSQL an
advisory lock serialises concurrent starts, so two control planes booting together
with ``LLMGW_AUTO_MIGRATE=1`` do not both create the tables.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from control_plane.db import create_sync_engine

MIGRATION_LOCK_ID = 0x6C6C6D67  # "llmg"


def run_migrations_online() -> None:
    database_url = context.config.attributes.get("database_url")
    if not isinstance(database_url, str):
        raise RuntimeError("control_plane.migrate.upgrade() passes the database URL")
    engine = create_sync_engine(database_url)
    try:
        with engine.connect() as connection:
            is_postgres = connection.dialect.name == "postgresql"
            if is_postgres:
                connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
                connection.commit()
            try:
                context.configure(
                    connection=connection,
                    target_metadata=None,
                    render_as_batch=connection.dialect.name == "sqlite",
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
