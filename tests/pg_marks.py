"""A `Database` on the test's own PostgreSQL database with one table, `marks`, and one
pooled connection, so that every call reuses it (the `Database` tests')."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text

from control_plane.db import Database


@contextmanager
def marks_database(url: str) -> Iterator[Database]:
    database = Database(url, pool_size=1)
    with database.engine.begin() as conn:
        conn.execute(text("CREATE TABLE marks (name text PRIMARY KEY)"))
    try:
        yield database
    finally:
        database.close()


def names(db: Database) -> list[str]:
    with db.engine.connect() as conn:
        return [
            str(n) for n in conn.execute(text("SELECT name FROM marks ORDER BY name")).scalars()
        ]
