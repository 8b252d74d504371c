"""Database URLs, the engine, and running a use case's transaction off the event loop.

The app talks to the database through SQLAlchemy's sync API on a small thread pool
owned by `Database`: `await db.transaction(fn)` runs ``fn(session)`` in a worker
thread inside one transaction (commit on return, rollback on raise). Use cases are
plain functions of a `Session`, so no blocking call ever runs on the event loop and
each use case owns exactly one transaction. (SQLAlchemy 2.1's asyncio extension
needs greenlet, which is not a dependency; the thread pool also bounds how many
transactions run at once to the connection pool's size.)

Behind PgBouncer in transaction mode (``pgbouncer=True``) PostgreSQL connections never
prepare statements server-side (`PG_PREPARE_THRESHOLD`).

SQLite gets WAL, a busy timeout and foreign keys on every connection, and every
transaction starts with ``BEGIN IMMEDIATE`` so concurrent writers queue on the busy
timeout instead of failing with "database is locked" when a read transaction tries
to upgrade to a write.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, InvalidatePoolError
from sqlalchemy.orm import Session, sessionmaker

from control_plane.db_threads import DbThreads

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 15_000
POOL_SIZE = 10
# psycopg prepares a statement server-side on its 5th run on a connection (its
# default); that halves a short query's time (measured: 77 vs 162 µs for a
# primary-key SELECT), so it stays on unless the database sits behind PgBouncer in
# transaction mode (before 1.21, and most managed poolers): there each transaction
# may run on another server connection, where a statement prepared earlier is
# missing or clashes, and `LLMGW_DATABASE_PGBOUNCER=1` turns preparation off.
PG_PREPARE_THRESHOLD = 5

Sessions = sessionmaker[Session]


class Unit:
    """One transaction whose hot statements run on the psycopg connection itself
    (`driver`), with an ORM session on that same connection and transaction only
    once something asks for one (`session()`): a transaction that never needs the
    ORM skips the session and SQLAlchemy's `Connection` (~0.1 ms, issue 14.3).
    Without a driver (SQLite, or a caller's own session: `of`) it is that session."""

    def __init__(self, session: Session | None, driver: psycopg.Connection[Any] | None) -> None:
        self._session = session
        self.driver = driver

    @classmethod
    def of(cls, session: Session) -> Unit:
        """A unit in `session`'s transaction (its statements go through the session)."""
        return cls(session, None)

    @property
    def on(self) -> Session | psycopg.Connection[Any]:
        """Where a raw statement runs (`raw_pg.RawStatement.first_on`)."""
        return self.driver if self.driver is not None else self.session()

    @property
    def postgres(self) -> bool:
        return self.driver is not None or (
            self._session is not None and self._session.get_bind().dialect.name == "postgresql"
        )

    def session(self) -> Session:
        if self._session is None:
            raise RuntimeError("a unit made without a session")
        return self._session


class _PooledUnit(Unit):
    """A `Unit` on a pooled connection of `engine`; `Database._in_unit` ends it."""

    def __init__(self, engine: Engine, sessions: Sessions) -> None:
        self._pooled = engine.raw_connection()  # pinged (`_pg_ping`), as a session's would be
        driver = self._pooled.driver_connection
        assert isinstance(driver, psycopg.Connection)
        super().__init__(None, driver)
        self._engine = engine
        self._sessions = sessions
        self._connection: Connection | None = None

    def session(self) -> Session:
        if self._session is None:
            # The same pooled connection, so the same transaction: the session's
            # commit or rollback covers what ran on the driver before it.
            self._connection = Connection(self._engine, connection=self._pooled)
            self._session = self._sessions(bind=self._connection)
        return self._session

    def end(self, commit: bool) -> None:
        try:
            if self._session is not None:
                try:
                    if commit:
                        self._session.commit()
                    else:
                        self._session.rollback()
                finally:
                    self._session.close()
            elif self.driver is not None:
                if commit:
                    try:  # a broken connection raises here: no silent loss
                        self.driver.commit()
                    except psycopg.Error as exc:  # as the session's commit would raise it
                        raise DBAPIError.instance("COMMIT", None, exc, psycopg.Error) from exc
                elif not self.driver.closed:
                    self.driver.rollback()
        finally:
            if self._connection is not None:
                self._connection.close()  # gives the pooled connection back
            else:
                self._pooled.close()


def _with_driver(database_url: str) -> URL:
    url = make_url(database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        return url.set(drivername="sqlite")
    if backend == "postgresql":
        return url.set(drivername="postgresql+psycopg")
    raise ValueError(f"unsupported database URL scheme: {url.drivername!r}")


def engine_url(database_url: str) -> URL:
    """``sqlite:///…`` (pysqlite) or ``postgresql+psycopg://…`` (psycopg 3), whatever
    driver the configured URL named (``postgresql://``, ``sqlite+aiosqlite://`` …)."""
    return _with_driver(database_url)


def prepare_sqlite_path(url: URL) -> None:
    """Create the parent directory of a file database (``sqlite:///var/x.db``)."""
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Driver-level autocommit: the "begin" hook below issues BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def create_sync_engine(
    database_url: str, *, pool_size: int = POOL_SIZE, pgbouncer: bool = False
) -> Engine:
    url = engine_url(database_url)
    prepare_sqlite_path(url)
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=30)
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=30,
        connect_args={"prepare_threshold": None if pgbouncer else PG_PREPARE_THRESHOLD},
    )
    event.listen(engine, "checkout", _pg_ping)
    return engine


def _pg_ping(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """What ``pool_pre_ping`` does on each checkout, cheaper: SQLAlchemy's psycopg
    ping switches autocommit on and off and runs ``SELECT 1`` through a cursor; an
    empty query on the libpq connection is the same round trip (measured, one
    checkout and return: 26.3 µs of CPU with ``pool_pre_ping``, 15 µs with this; two
    checkouts an init). A dead connection fails as the pre-ping's does: SQLAlchemy
    drops every pooled connection older than now and checks out a fresh one (at
    most twice, then the checkout fails)."""
    pgconn = dbapi_connection.pgconn
    try:
        status = pgconn.exec_(b"").status
    except psycopg.Error as exc:  # the libpq connection is already closed
        raise InvalidatePoolError(str(exc)) from exc
    if status == psycopg.pq.ExecStatus.EMPTY_QUERY:
        return
    if pgconn.status == psycopg.pq.ConnStatus.BAD:  # the server or the network went away
        raise InvalidatePoolError("the pooled connection failed its ping")
    # Alive but not idle (never expected: a connection is reset when returned): this
    # one only is replaced.
    raise DisconnectionError("the pooled connection is not idle")


class Database:
    """The engine, the session factory and the worker threads that use them."""

    def __init__(
        self, database_url: str, *, pool_size: int = POOL_SIZE, pgbouncer: bool = False
    ) -> None:
        self.engine = create_sync_engine(database_url, pool_size=pool_size, pgbouncer=pgbouncer)
        self.sessions: Sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._threads = DbThreads(pool_size, "db")

    def _in_transaction(self, fn: Callable[[Session], T]) -> T:
        with self.sessions.begin() as session:
            return fn(session)

    def _in_unit(self, fn: Callable[[Unit], T]) -> T:
        if not self.postgres:
            return self._in_transaction(lambda session: fn(Unit.of(session)))
        unit = _PooledUnit(self.engine, self.sessions)
        try:
            result = fn(unit)
        except BaseException:
            unit.end(commit=False)
            raise
        unit.end(commit=True)
        return result

    async def unit(self, fn: Callable[[Unit], T]) -> T:
        """Run ``fn(unit)`` in a worker thread, in one transaction, as `transaction`
        but with the session made only if ``fn`` asks for it (`Unit`)."""
        return await self._threads.run(functools.partial(self._in_unit, fn))

    async def transaction(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` in a worker thread, in one transaction."""
        return await self._threads.run(functools.partial(self._in_transaction, fn))

    @property
    def postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def _standalone(self, fn: Callable[[Session | psycopg.Connection[Any]], T]) -> T:
        if not self.postgres:
            return self._in_transaction(fn)
        pooled = self.engine.raw_connection()  # pinged (`_pg_ping`), as a session's would be
        try:
            driver = pooled.driver_connection
            assert isinstance(driver, psycopg.Connection)
            driver.autocommit = True
            try:
                return fn(driver)
            finally:
                if not driver.closed:
                    driver.autocommit = False
        finally:
            pooled.close()

    async def standalone(self, fn: Callable[[Session | psycopg.Connection[Any]], T]) -> T:
        """Run ``fn`` whose every statement stands alone (a lookup, an idempotent
        conditional write) in a worker thread. On PostgreSQL ``fn`` gets the pooled
        psycopg connection itself in autocommit: no BEGIN or COMMIT round trip and no
        ORM session, ~0.1 ms less CPU than `transaction` (issue 14.3). Elsewhere
        (SQLite) it gets a session in one transaction, as `transaction`."""
        return await self._threads.run(functools.partial(self._standalone, fn))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking function that manages its own sessions on the DB threads."""
        return await self._threads.run(functools.partial(fn, *args))

    async def ping(self) -> bool:
        def check(session: Session) -> bool:
            return session.execute(text("SELECT 1")).scalar() == 1

        try:
            return await asyncio.wait_for(self.transaction(check), timeout=5)
        except Exception:
            return False

    def close(self) -> None:
        self._threads.close()
        self.engine.dispose()
