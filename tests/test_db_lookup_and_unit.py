"""`Database.lookup` and `Database.unit` (issue 14.3). `lookup`: on PostgreSQL
each statement is its own transaction on the pooled psycopg connection
(autocommit), and the connection goes back to the pool as a transaction would find
it. `unit`: one transaction on the pooled connection, with an ORM session on it
only when asked for. On SQLite both are a session's transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from control_plane.db import Database, Unit
from tests.pg_marks import marks_database, names


@pytest.fixture
def db(pg_database_url: str) -> Iterator[Database]:
    with marks_database(pg_database_url) as database:
        yield database


def select_one(on: Session | psycopg.Connection[Any]) -> None:
    assert isinstance(on, psycopg.Connection)
    on.execute("SELECT 1")


def test_each_statement_commits_on_its_own(db: Database) -> None:
    seen: list[bool] = []

    def write_then_fail(on: Session | psycopg.Connection[Any], _: None) -> None:
        assert isinstance(on, psycopg.Connection)
        seen.append(on.autocommit)
        on.execute("INSERT INTO marks VALUES ('kept')")
        raise RuntimeError("after the write")

    with pytest.raises(RuntimeError):
        asyncio.run(db.lookup(select_one, write_then_fail))
    assert seen == [True]
    assert names(db) == ["kept"]  # nothing to roll back: the INSERT was its own transaction


def test_the_connection_returns_to_transactions(db: Database) -> None:
    asyncio.run(db.lookup(select_one, lambda on, _: None))

    def write_then_fail(session: Session) -> None:
        session.execute(text("INSERT INTO marks VALUES ('rolled back')"))
        raise RuntimeError("after the write")

    # The same (only) connection, no longer in autocommit: the failure undoes the write.
    with pytest.raises(RuntimeError):
        asyncio.run(db.transaction(write_then_fail))
    assert names(db) == []


def test_a_statement_error_leaves_the_connection_usable(db: Database) -> None:
    def bad(on: Session | psycopg.Connection[Any]) -> None:
        assert isinstance(on, psycopg.Connection)
        on.execute("SELECT * FROM no_such_table")

    with pytest.raises(psycopg.errors.UndefinedTable):  # a live connection: not retried
        asyncio.run(db.lookup(bad, lambda on, _: None))
    asyncio.run(db.transaction(lambda s: s.execute(text("INSERT INTO marks VALUES ('after')"))))
    assert names(db) == ["after"]


def test_sqlite_gets_a_session_in_one_transaction(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        kinds = asyncio.run(database.lookup(lambda on: type(on).__name__, lambda on, kind: kind))
    finally:
        database.close()
    assert kinds == "Session"


def test_a_unit_is_one_transaction_with_or_without_its_session(db: Database) -> None:
    def raw(unit: Unit, name: str) -> None:
        assert unit.driver is not None
        unit.driver.execute("INSERT INTO marks VALUES (%s)", [name])

    def both_then_fail(unit: Unit) -> None:
        raw(unit, "raw")
        unit.session().execute(text("INSERT INTO marks VALUES ('orm')"))
        raise RuntimeError("after both writes")

    with pytest.raises(RuntimeError):
        asyncio.run(db.unit(both_then_fail))
    assert names(db) == []  # the session's rollback took back the driver's write too

    def raw_then_fail(unit: Unit) -> None:
        raw(unit, "raw")
        raise RuntimeError("after the write")

    with pytest.raises(RuntimeError):
        asyncio.run(db.unit(raw_then_fail))
    assert names(db) == []

    asyncio.run(db.unit(lambda unit: raw(unit, "alone")))

    def both(unit: Unit) -> None:
        raw(unit, "raw")
        unit.session().execute(text("INSERT INTO marks VALUES ('orm')"))

    asyncio.run(db.unit(both))
    assert names(db) == ["alone", "orm", "raw"]
    # The one pooled connection came back each time, out of any transaction.
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_unit_on_sqlite_is_a_session(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        kinds = asyncio.run(
            database.unit(lambda unit: (unit.driver, unit.postgres, type(unit.on).__name__))
        )
    finally:
        database.close()
    assert kinds == (None, False, "Session")


def test_a_unit_whose_connection_dies_fails_and_the_pool_recovers(
    db: Database, pg_database_url: str
) -> None:
    admin_dsn = pg_database_url.replace("postgresql+psycopg://", "postgresql://")

    def write_then_lose_the_server(unit: Unit) -> None:
        assert unit.driver is not None
        unit.driver.execute("INSERT INTO marks VALUES ('lost')")
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [unit.driver.info.backend_pid])

    with pytest.raises(DBAPIError):  # the COMMIT fails: never reported as done
        asyncio.run(db.unit(write_then_lose_the_server))
    asyncio.run(db.unit(lambda unit: unit.session().execute(text("SELECT 1"))))  # pre-ping
    assert names(db) == []


def test_a_pooled_connection_killed_while_idle_is_replaced_on_checkout(
    db: Database, pg_database_url: str
) -> None:
    """A lookup's read, then a unit's checkout ping (`db_checkout.pg_ping`, in place of
    ``pool_pre_ping``), finds the dead connection: the caller gets a fresh one, never
    the error."""
    admin_dsn = pg_database_url.replace("postgresql+psycopg://", "postgresql://")

    def backend(on: Session | psycopg.Connection[Any]) -> int:
        assert isinstance(on, psycopg.Connection)
        # A statement (the lookup's read is its ping), not libpq's local copy of the pid.
        row = on.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        return int(row[0])

    first = asyncio.run(db.lookup(backend, lambda on, pid: pid))
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [first])
    second = asyncio.run(db.lookup(backend, lambda on, pid: pid))  # the one connection, replaced
    assert second != first
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [second])

    def write(unit: Unit) -> int:
        assert unit.driver is not None
        unit.driver.execute("INSERT INTO marks VALUES ('after')")
        return unit.driver.info.backend_pid

    assert asyncio.run(db.unit(write)) not in (first, second)
    assert names(db) == ["after"]
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
