"""Fewer round trips per transaction (issue 14): a transaction's BEGIN is its
checkout's ping (`db_checkout.pg_ping`), and a unit begun lazily (`Database.unit(fn,
begin=False)`, init's) runs its reads and a last lone statement without BEGIN or
COMMIT, and is one transaction again as soon as a statement needs one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from control_plane.db import Database, Unit
from tests.pg_marks import marks_database, names

INTRANS = psycopg.pq.TransactionStatus.INTRANS
IDLE = psycopg.pq.TransactionStatus.IDLE


@pytest.fixture
def db(pg_database_url: str) -> Iterator[Database]:
    with marks_database(pg_database_url) as database:
        yield database


@pytest.fixture
def admin_dsn(pg_database_url: str) -> str:
    return pg_database_url.replace("postgresql+psycopg://", "postgresql://")


def kill(admin_dsn: str, pid: int) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])


def insert(on: Session | psycopg.Connection[object], name: str) -> None:
    assert isinstance(on, psycopg.Connection)
    on.execute("INSERT INTO marks VALUES (%s)", [name])


def test_a_transaction_is_begun_by_its_checkout(db: Database) -> None:
    def status(unit: Unit) -> psycopg.pq.TransactionStatus:
        assert unit.driver is not None
        return unit.driver.info.transaction_status

    assert asyncio.run(db.unit(status)) == INTRANS  # before any statement of its own

    def session_status(session: Session) -> psycopg.pq.TransactionStatus:
        driver = session.connection().connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        return driver.info.transaction_status

    assert asyncio.run(db.transaction(session_status)) == INTRANS


def test_a_plain_checkout_is_not_begun(db: Database) -> None:
    with db.engine.connect() as conn:
        driver = conn.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        assert driver.info.transaction_status == IDLE
        # So it can still be switched to autocommit (migrations, admin tools).
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("SELECT 1"))


def test_a_killed_connection_is_replaced_by_a_transactions_checkout(
    db: Database, admin_dsn: str
) -> None:
    def backend(session: Session) -> int:
        return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())

    first = asyncio.run(db.transaction(backend))
    kill(admin_dsn, first)

    def write(session: Session) -> int:
        session.execute(text("INSERT INTO marks VALUES ('after')"))
        return backend(session)

    second = asyncio.run(db.transaction(write))  # BEGIN found it dead: a fresh one
    assert second != first
    kill(admin_dsn, second)

    def unit_write(unit: Unit) -> int:
        assert unit.driver is not None
        insert(unit.driver, "unit")
        return unit.driver.info.backend_pid

    assert asyncio.run(db.unit(unit_write)) not in (first, second)
    assert names(db) == ["after", "unit"]
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_failed_statement_in_a_begun_transaction_changes_nothing(db: Database) -> None:
    def write_then_fail(unit: Unit) -> None:
        assert unit.driver is not None
        insert(unit.driver, "first")
        insert(unit.driver, "first")  # the primary key refuses it

    with pytest.raises(psycopg.errors.UniqueViolation):
        asyncio.run(db.unit(write_then_fail))
    with pytest.raises(DBAPIError):
        asyncio.run(
            db.transaction(
                lambda s: [s.execute(text("INSERT INTO marks VALUES ('x')")) for _ in range(2)]
            )
        )
    assert names(db) == []
    asyncio.run(db.unit(lambda unit: insert(unit.on, "after")))
    assert names(db) == ["after"]


def test_a_lazy_unit_reads_and_writes_its_last_statement_alone(db: Database) -> None:
    seen: list[tuple[bool, psycopg.pq.TransactionStatus]] = []

    def read_then_last(unit: Unit) -> None:
        read = unit.read_on
        assert isinstance(read, psycopg.Connection)
        read.execute("SELECT count(*) FROM marks")
        seen.append((read.autocommit, read.info.transaction_status))
        last = unit.last_on
        insert(last, "alone")
        assert isinstance(last, psycopg.Connection)
        seen.append((last.autocommit, last.info.transaction_status))

    asyncio.run(db.unit(read_then_last, begin=False))
    assert seen == [(True, IDLE), (True, IDLE)]  # no BEGIN, no COMMIT
    assert names(db) == ["alone"]

    def then_more(unit: Unit) -> None:
        insert(unit.last_on, "last")
        insert(unit.on, "after the last")  # a programming error, refused

    with pytest.raises(RuntimeError, match="after the unit's last"):
        asyncio.run(db.unit(then_more, begin=False))
    assert names(db) == ["alone", "last"]

    # The one pooled connection went back out of autocommit: a failing transaction
    # on it rolls back.
    def write_then_fail(session: Session) -> None:
        session.execute(text("INSERT INTO marks VALUES ('rolled back')"))
        raise RuntimeError("after the write")

    with pytest.raises(RuntimeError):
        asyncio.run(db.transaction(write_then_fail))
    assert names(db) == ["alone", "last"]


def test_a_failed_last_statement_changes_nothing(db: Database) -> None:
    def duplicate(unit: Unit) -> None:
        unit.read_on.execute("SELECT 1")  # type: ignore[union-attr]
        unit.last_on.execute(  # type: ignore[union-attr]
            "INSERT INTO marks VALUES ('a'), ('b'), ('a')"  # one statement, refused whole
        )

    with pytest.raises(psycopg.errors.UniqueViolation):
        asyncio.run(db.unit(duplicate, begin=False))
    assert names(db) == []
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_lazy_unit_begins_at_its_first_transactional_statement(db: Database) -> None:
    def read_then_write_then_fail(unit: Unit) -> None:
        unit.read_on.execute("SELECT 1")  # type: ignore[union-attr]
        insert(unit.on, "raw")  # begins the transaction
        unit.session().execute(text("INSERT INTO marks VALUES ('orm')"))
        insert(unit.last_on, "last")  # in the transaction now: `on`
        raise RuntimeError("after the writes")

    with pytest.raises(RuntimeError):
        asyncio.run(db.unit(read_then_write_then_fail, begin=False))
    assert names(db) == []  # all of it rolled back together

    def driver_then_fail(unit: Unit) -> None:
        assert unit.driver is not None  # asking for the driver begins it too
        insert(unit.driver, "raw")
        raise RuntimeError("after the write")

    with pytest.raises(RuntimeError):
        asyncio.run(db.unit(driver_then_fail, begin=False))
    assert names(db) == []

    def both(unit: Unit) -> None:
        insert(unit.on, "raw")
        insert(unit.last_on, "last")

    asyncio.run(db.unit(both, begin=False))
    assert names(db) == ["last", "raw"]


def test_a_lazy_unit_on_a_killed_connection_gets_a_fresh_one(db: Database, admin_dsn: str) -> None:
    def backend(unit: Unit) -> int:
        read = unit.read_on
        assert isinstance(read, psycopg.Connection)
        return read.info.backend_pid

    first = asyncio.run(db.unit(backend, begin=False))
    kill(admin_dsn, first)

    def write(unit: Unit) -> int:
        pid = backend(unit)
        insert(unit.last_on, "after")
        return pid

    assert asyncio.run(db.unit(write, begin=False)) != first  # the checkout's ping found it
    assert names(db) == ["after"]


# --- a read as the checkout's ping (`Database.lookup`, a lazy unit's `read`) ------------


def _pid(on: Session | psycopg.Connection[object]) -> int:
    assert isinstance(on, psycopg.Connection)
    row = on.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def test_a_lookup_on_a_killed_connection_reads_again_and_writes_once(
    db: Database, admin_dsn: str
) -> None:
    reads: list[int] = []  # each read sent
    done: list[int] = []  # each read answered

    def read(on: Session | psycopg.Connection[object]) -> int:
        reads.append(1)
        done.append(_pid(on))
        return done[-1]

    def then(on: Session | psycopg.Connection[object], pid: int) -> int:
        assert isinstance(on, psycopg.Connection) and on.autocommit
        insert(on, f"w{len(done)}")
        return pid

    first = asyncio.run(db.lookup(read, then))
    kill(admin_dsn, first)
    second = asyncio.run(db.lookup(read, then))  # its read found the dead one: sent again
    assert second != first and len(reads) == 3 and len(done) == 2
    assert names(db) == ["w1", "w2"]  # `then` ran once per lookup
    # The connection went back out of autocommit: a failing transaction rolls back.
    with pytest.raises(RuntimeError), db.engine.begin() as conn:
        conn.execute(text("INSERT INTO marks VALUES ('rolled back')"))
        raise RuntimeError
    assert names(db) == ["w1", "w2"]


def test_a_lookup_whose_read_fails_on_a_live_connection_is_not_retried(db: Database) -> None:
    reads: list[int] = []

    def bad(on: Session | psycopg.Connection[object]) -> None:
        reads.append(1)
        assert isinstance(on, psycopg.Connection)
        try:
            on.execute("SELECT * FROM no_such_table")
        except psycopg.Error as exc:
            raise DBAPIError.instance("", None, exc, psycopg.Error) from exc

    with pytest.raises(DBAPIError):
        asyncio.run(db.lookup(bad, lambda _on, found: found))
    assert reads == [1]
    assert asyncio.run(db.lookup(_pid, lambda _on, pid: pid)) > 0  # the connection is usable


def test_a_lazy_units_first_read_on_a_killed_connection_is_sent_again(
    db: Database, admin_dsn: str
) -> None:
    first = asyncio.run(db.unit(lambda unit: unit.read(_pid), begin=False))
    kill(admin_dsn, first)

    def read_then_write(unit: Unit) -> int:
        pid = unit.read(_pid)
        insert(unit.last_on, "after")
        return pid

    assert asyncio.run(db.unit(read_then_write, begin=False)) != first
    assert names(db) == ["after"]
    # A unit whose first statement is not a read pings first, and is replaced too.
    third = asyncio.run(db.unit(lambda unit: unit.read(_pid), begin=False))
    kill(admin_dsn, third)
    asyncio.run(db.unit(lambda unit: insert(unit.last_on, "unpinged"), begin=False))
    assert names(db) == ["after", "unpinged"]
