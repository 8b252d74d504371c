"""Apply the Alembic migrations programmatically (no alembic.ini needed).

`upgrade` is synchronous; from async code run it in a thread:
``await asyncio.to_thread(upgrade, url)``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database at `database_url` (``sqlite:///…`` or ``postgresql…``)
    up to `revision`. Idempotent; creates a SQLite file's parent directory."""
    command.upgrade(alembic_config(database_url), revision)


def migrated_line(database_url: str, revision: str) -> str:
    """What `llm-gateway migrate` says it did, the password hidden: a migrate run
    against the wrong database (a misspelled LLMGW_DATABASE_URL fell back to a SQLite
    file in the job's container) said nothing and exited 0."""
    from sqlalchemy.engine import make_url

    return f"migrated {make_url(database_url).render_as_string(hide_password=True)} to {revision}"


def head() -> str:
    """The newest revision this code knows."""
    from alembic.script import ScriptDirectory

    revision = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert revision is not None
    return revision


def current(database_url: str) -> str | None:
    """The database's current revision, or None before the first migration."""
    from sqlalchemy import inspect, text

    from control_plane.db import create_sync_engine

    engine = create_sync_engine(database_url)
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table("alembic_version"):
                return None
            row = connection.execute(text("SELECT version_num FROM alembic_version")).first()
            return None if row is None else str(row[0])
    finally:
        engine.dispose()
