"""Database URLs, the engine, and running a use case's transaction off the event loop.

The app talks to the database through SQLAlchemy's sync API on a small thread pool
owned by `Database`: `await db.transaction(fn)` runs ``fn(session)`` in a worker
thread inside one transaction (commit on return, rollback on raise). Use cases are
plain functions of a `Session`, so no blocking call ever runs on the event loop and
each use case owns its transaction (the hot paths may do less: `lookup` and a unit
begun lazily run one-statement reads and a lone last write in autocommit, issue 14).
(SQLAlchemy 2.1's asyncio extension needs greenlet, which is not a dependency; the
thread pool also bounds how many transactions run at once to the connection pool's
size.)

Every call is bounded (`DB_TIMEOUT_SECONDS`, ``LLMGW_DATABASE_TIMEOUT_SECONDS``):
a database that goes silent answers 503 ``database_unavailable`` past it rather
than holding each request, and each later one queued behind it, for as long as it
lasts (`db_threads`). The sockets carry client-side bounds of their own
(`PG_CLIENT_TIMEOUTS`: libpq's ``connect_timeout``, keepalives and
``tcp_user_timeout``), which free a thread from a dead network; a server that is
alive but stuck (a lock) is PostgreSQL's own ``statement_timeout``, set on the
role or database (docs/operations.md), not per transaction: a ``SET`` costs a
round trip on the hot path, and a startup ``options=-c …`` is refused by PgBouncer.

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
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from control_plane import db_shares
from control_plane.db_checkout import (
    autocommit_checkout,
    checked_out_backend,
    checkout_begins,
    checkout_unpinged,
    empty_query,
    give_back,
    in_autocommit,
    pg_ping,
    thrown_away_if_dead,
)
from control_plane.db_shares import DbShares
from control_plane.db_threads import DatabaseTimeout, DbThreads
from control_plane.settings import DB_TIMEOUT_SECONDS

__all__ = ["Database", "DatabaseTimeout", "Unit"]

T = TypeVar("T")
R = TypeVar("R")

SQLITE_BUSY_TIMEOUT_MS = 15_000
POOL_SIZE = 10
# At most this many of the threads hold one company's calls at once (`db_shares`):
# one company's calls queued on its own row lock leave the rest to everyone else.
# A company gets no faster with more (its holds serialise on its row; 5 to 40
# threads measured the same).
SHARE_PER_COMPANY = 5
# psycopg prepares a statement server-side on its 5th run on a connection (its
# default); that halves a short query's time (measured: 77 vs 162 µs for a
# primary-key SELECT), so it stays on unless the database sits behind PgBouncer in
# transaction mode (before 1.21, and most managed poolers): there each transaction
# may run on another server connection, where a statement prepared earlier is
# missing or clashes, and `LLMGW_DATABASE_PGBOUNCER=1` turns preparation off.
PG_PREPARE_THRESHOLD = 5
# libpq's own socket bounds, client-side (none is a startup parameter, so PgBouncer
# takes them): a connect to a server that accepts the TCP connection but never
# answers (a stopped postmaster) fails after `connect_timeout` (libpq counts whole
# seconds, at least 2); keepalives find a peer gone without a word (a partition, a
# failed-over host) after about idle + interval * count = 25 s, and `tcp_user_timeout`
# drops a connection whose sent data stays unacknowledged for 30 s. A live but slow
# server answers keepalives, so a long statement is never cut by them.
PG_CLIENT_TIMEOUTS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}

Sessions = sessionmaker[Session]


class Unit:
    """One transaction whose hot statements run on the psycopg connection itself
    (`driver`), with an ORM session on that same connection and transaction only
    once something asks for one (`session()`): a transaction that never needs the
    ORM skips the session and SQLAlchemy's `Connection` (~0.1 ms, issue 14.3).
    Without a driver (SQLite, or a caller's own session: `of`) it is that session.

    `read_on` and `last_on` say what a statement is, so that a unit begun lazily
    (`Database.unit(fn, begin=False)`) can spare its BEGIN and COMMIT round trips
    (issue 14); in any other unit they are `on`."""

    def __init__(self, session: Session | None, driver: psycopg.Connection[Any] | None) -> None:
        self._session = session
        self._driver = driver

    @classmethod
    def of(cls, session: Session) -> Unit:
        """A unit in `session`'s transaction (its statements go through the session)."""
        return cls(session, None)

    @property
    def driver(self) -> psycopg.Connection[Any] | None:
        """The psycopg connection, in the unit's transaction; None without one."""
        return self._driver

    @property
    def on(self) -> Session | psycopg.Connection[Any]:
        """Where a raw statement runs (`raw_pg.RawStatement.first_on`), in the unit's
        transaction."""
        driver = self.driver
        return driver if driver is not None else self.session()

    @property
    def read_on(self) -> Session | psycopg.Connection[Any]:
        """Where a read (no effects, no lock taken) runs: `on`; in a unit begun
        lazily and not yet begun, alone, before or after its last statement."""
        return self.on

    @property
    def last_on(self) -> Session | psycopg.Connection[Any]:
        """Where the unit's last statement runs (nothing may follow it): `on`."""
        return self.on

    def read(self, fn: Callable[[Session | psycopg.Connection[Any]], R]) -> R:
        """``fn(read_on)`` for a read: ``fn`` must send ONE statement without effects
        (a plain SELECT, no FOR UPDATE), since a pooled unit may send it twice."""
        return fn(self.read_on)

    @property
    def postgres(self) -> bool:
        return self._driver is not None or (
            self._session is not None and self._session.get_bind().dialect.name == "postgresql"
        )

    def session(self) -> Session:
        if self._session is None:
            raise RuntimeError("a unit made without a session")
        return self._session


class _PooledUnit(Unit):
    """A `Unit` on a pooled connection of `engine`; `Database._in_unit` ends it.

    `begin`: the transaction starts at checkout (its BEGIN is the checkout's ping,
    `pg_ping`). Otherwise the connection comes in autocommit and the
    transaction begins only when a statement needs it (`driver`, `on`,
    `session()`): the reads before it (`read_on`) and a last statement with nothing
    begun (`last_on`) each stand alone, atomic by themselves, with no BEGIN or
    COMMIT round trip. Under READ COMMITTED (PostgreSQL's default, ours) each
    statement reads its own snapshot, in a transaction or not, so a plain read
    outside the transaction sees what it would have seen inside it."""

    def __init__(self, engine: Engine, sessions: Sessions, *, begin: bool = True) -> None:
        if begin:
            with checkout_begins():
                self._pooled: Any = engine.raw_connection()  # BEGIN is its ping
        else:
            # Not pinged: the first statement is (`read`) or sends the ping (`_pinged`).
            with checkout_unpinged():
                self._pooled = in_autocommit(engine.raw_connection())
        self._unpinged = not begin
        driver = self._pooled.driver_connection
        assert isinstance(driver, psycopg.Connection)
        super().__init__(None, driver)
        # Read while the connection is up: libpq forgets it once the connection
        # is lost, and a lost answer needs it (`lost_backend`).
        self._backend = backend_of(driver)
        self._engine = engine
        self._sessions = sessions
        self._connection: Connection | None = None
        self._lazy = not begin
        self._finished = False  # a last statement ran outside any transaction

    def read(self, fn: Callable[[Session | psycopg.Connection[Any]], R]) -> R:
        """As `Unit.read`; as a lazy unit's first statement it is the checkout's ping
        (issue 14: one round trip less): a connection it finds dead is replaced and
        ``fn`` sent again (`thrown_away_if_dead`), nothing having run on it."""
        if not self._unpinged:
            return fn(self.read_on)
        self._unpinged = False
        assert self._driver is not None
        try:
            return fn(self._driver)
        except (DBAPIError, psycopg.Error):
            if not thrown_away_if_dead(self._pooled):
                raise
        self._pooled = None  # `end` has nothing to give back if the checkout fails
        pooled = self._pooled = autocommit_checkout(self._engine, ping=True)
        driver = self._driver = pooled.driver_connection
        self._backend = backend_of(driver)
        return fn(driver)

    def _pinged(self) -> None:
        """Before any statement other than a first `read`: the ping it skipped."""
        if self._unpinged:
            self.read(empty_query)

    def _began(self) -> psycopg.Connection[Any]:
        self._pinged()
        driver = self._driver
        assert driver is not None
        if self._finished:
            raise RuntimeError("a statement after the unit's last one")
        if self._lazy:
            # Out of autocommit: psycopg sends BEGIN with the next statement.
            driver.autocommit = False
            self._lazy = False
        return driver

    @property
    def driver(self) -> psycopg.Connection[Any]:
        return self._began()

    @property
    def read_on(self) -> Session | psycopg.Connection[Any]:
        self._pinged()
        # After the last statement too: a read changes nothing and needs no
        # transaction (a lone webhook reads why its write settled nothing).
        if self._lazy:
            assert self._driver is not None
            return self._driver
        return self.on

    @property
    def last_on(self) -> Session | psycopg.Connection[Any]:
        self._pinged()
        if self._lazy and not self._finished:
            self._finished = True
            assert self._driver is not None
            return self._driver
        return self.on

    def session(self) -> Session:
        if self._session is None:
            self._began()
            # The same pooled connection, so the same transaction: the session's
            # commit or rollback covers what ran on the driver before it.
            self._connection = Connection(self._engine, connection=self._pooled)
            self._session = self._sessions(bind=self._connection)
        return self._session

    def backend(self) -> int | None:
        """The PostgreSQL backend the unit runs on (`lost_backend`); None once its
        connection was thrown away with no other checked out (`read`)."""
        return self._backend if self._pooled is not None else None

    def end(self, commit: bool) -> None:
        if self._pooled is None:  # thrown away, no other checked out (`read`)
            return
        driver = self._driver
        assert driver is not None
        try:
            self._commit_or_roll_back(driver, commit)
        except (DBAPIError, psycopg.Error) as exc:
            note_backend(exc, self._backend if commit else None)
            raise
        finally:
            if self._connection is not None:
                self._connection.close()  # gives the pooled connection back
            else:
                self._pooled.close()

    def _commit_or_roll_back(self, driver: psycopg.Connection[Any], commit: bool) -> None:
        if self._session is not None:
            try:
                if commit:
                    self._session.commit()
                else:
                    self._session.rollback()
            finally:
                self._session.close()
        elif driver.autocommit:
            # Begun lazily and never: each statement committed as it ran.
            if not driver.closed:
                driver.autocommit = False  # the pool hands out transactions
        elif commit:
            try:  # a broken connection raises here: no silent loss
                driver.commit()
            except psycopg.Error as exc:  # as the session's commit would raise it
                raise DBAPIError.instance("COMMIT", None, exc, psycopg.Error) from exc
        elif not driver.closed:
            driver.rollback()


def outcome_unknown(exc: BaseException) -> bool:
    """Whether `exc`, raised by a call whose write was sent, leaves unknown whether it
    committed: the connection failed (psycopg's OperationalError, InterfaceError, as
    themselves or as SQLAlchemy's wrapper) after or while the write or its COMMIT
    went out: a cut network, a killed backend, a proxy restarting. A statement the
    server refused (a unique key, a check) rolled back for certain; a call past the
    database's bound (`DatabaseTimeout`) hands a late commit to its ``late``."""
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    return isinstance(cause, psycopg.OperationalError | psycopg.InterfaceError)


def backend_of(driver: psycopg.Connection[Any] | None) -> int | None:
    """The process id of `driver`'s PostgreSQL backend (libpq's, no round trip);
    None once its connection is closed or lost (libpq then forgets it)."""
    try:
        pid = driver.pgconn.backend_pid if driver is not None else 0
    except psycopg.Error:
        return None
    return pid or None


# The attribute of an error whose outcome is unknown (`outcome_unknown`) that names
# the backend which ran the write (`lost_backend`).
_BACKEND = "llmgw_backend_pid"


def note_backend(exc: BaseException, backend: int | None) -> None:
    """Name `backend` on `exc` when it leaves the outcome of the write it ran unknown."""
    if backend is not None and outcome_unknown(exc) and getattr(exc, _BACKEND, None) is None:
        setattr(exc, _BACKEND, backend)


def lost_backend(exc: BaseException) -> int | None:
    """The PostgreSQL backend whose answer `exc` lost (`outcome_unknown`), when known.
    Its connection is gone, not the backend: PostgreSQL may still be running the write
    (waiting on a lock, a synchronous standby, the disk) and commit it later, until
    the backend ends its transaction (`lost_settlements.once_over`). Unknown
    behind PgBouncer (the pid the client sees is PgBouncer's own)."""
    backend = getattr(exc, _BACKEND, None)
    return backend if isinstance(backend, int) else None


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


# A failed statement's SQLAlchemy error prints its parameters (prompts, answers,
# password hashes) into every traceback the services log: they stay out of it.
_ENGINE_OPTIONS: dict[str, Any] = {"hide_parameters": True}


def pg_connect_args(url: URL, *, pgbouncer: bool, timeout: float) -> dict[str, Any]:
    """psycopg's connect arguments: the prepare threshold, and the client-side socket
    bounds (`PG_CLIENT_TIMEOUTS`, ``connect_timeout`` from `timeout`) unless the URL
    sets its own (``?connect_timeout=…``)."""
    bounds: dict[str, Any] = {"connect_timeout": max(2, math.ceil(timeout)), **PG_CLIENT_TIMEOUTS}
    return {
        "prepare_threshold": None if pgbouncer else PG_PREPARE_THRESHOLD,
        **{name: value for name, value in bounds.items() if name not in url.query},
    }


def create_sync_engine(
    database_url: str,
    *,
    pool_size: int = POOL_SIZE,
    pgbouncer: bool = False,
    timeout: float = DB_TIMEOUT_SECONDS,
) -> Engine:
    url = engine_url(database_url)
    prepare_sqlite_path(url)
    if url.get_backend_name() == "sqlite":
        engine = create_engine(
            url, pool_size=pool_size, max_overflow=0, pool_timeout=30, **_ENGINE_OPTIONS
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=30,
        connect_args=pg_connect_args(url, pgbouncer=pgbouncer, timeout=timeout),
        **_ENGINE_OPTIONS,
    )
    event.listen(engine, "checkout", pg_ping)
    return engine


class Database:
    """The engine, the session factory and the worker threads that use them.

    Each call fails with `DatabaseTimeout` (503) once it has waited `timeout`
    seconds (or its own ``timeout=``) for its company's share, a thread and the
    database together (`db_shares`, `db_threads`)."""

    def __init__(
        self,
        database_url: str,
        *,
        pool_size: int = POOL_SIZE,
        pgbouncer: bool = False,
        timeout: float = DB_TIMEOUT_SECONDS,
    ) -> None:
        self.engine = create_sync_engine(
            database_url, pool_size=pool_size, pgbouncer=pgbouncer, timeout=timeout
        )
        self.sessions: Sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.timeout = timeout
        self._threads = DbThreads(pool_size, "db")
        self.shares = DbShares(max(1, min(SHARE_PER_COMPANY, pool_size // 2)))

    async def _call(
        self, fn: Callable[[], T], timeout: float, late: Callable[[T], None] | None = None
    ) -> T:
        """``fn`` on a thread within `timeout`, in the share of the company the
        caller acts for (`db_shares`): the wait for a slot counts in the bound."""
        company = db_shares.current()
        if company is None:
            return await self._threads.call(fn, timeout=timeout, late=late)
        loop = asyncio.get_running_loop()
        began = loop.time()
        release = await self.shares.enter(company, timeout)
        left = max(timeout - (loop.time() - began), 0.001)
        return await self._threads.call(fn, timeout=left, late=late, done=release)

    def _in_transaction(self, fn: Callable[[Session], T]) -> T:
        try:
            with checkout_begins(), self.sessions.begin() as session:
                return fn(session)
        except DBAPIError as exc:
            # Its COMMIT's answer lost: the backend may still commit it.
            note_backend(exc, checked_out_backend())
            raise

    def _in_unit(self, fn: Callable[[Unit], T], begin: bool = True) -> T:
        if not self.postgres:
            return self._in_transaction(lambda session: fn(Unit.of(session)))
        unit = _PooledUnit(self.engine, self.sessions, begin=begin)
        try:
            result = fn(unit)
        except BaseException as exc:
            # A lazily begun unit's last statement commits alone: its answer lost,
            # the backend may still commit it.
            note_backend(exc, unit.backend())
            unit.end(commit=False)
            raise
        unit.end(commit=True)
        return result

    async def unit(
        self,
        fn: Callable[[Unit], T],
        *,
        begin: bool = True,
        late: Callable[[T], None] | None = None,
    ) -> T:
        """Run ``fn(unit)`` in a worker thread, in one transaction, as `transaction`
        but with the session made only if ``fn`` asks for it (`Unit`). With
        ``begin=False`` the transaction begins only at the first statement that
        needs one (`_PooledUnit`): init's unit, a read and one write statement in
        the common case, then sends neither BEGIN nor COMMIT. ``late`` gets the
        result of a unit that committed after its caller was told 503
        (`DatabaseTimeout`) or was cancelled (`db_threads`), to undo or finish
        what nobody will."""
        return await self._call(functools.partial(self._in_unit, fn, begin), self.timeout, late)

    async def transaction(
        self,
        fn: Callable[[Session], T],
        *,
        timeout: float | None = None,
        late: Callable[[T], None] | None = None,
    ) -> T:
        """Run ``fn(session)`` in a worker thread, in one transaction; `DatabaseTimeout`
        past ``timeout`` (default: the database's). ``late``: as `unit`'s."""
        return await self._call(
            functools.partial(self._in_transaction, fn), timeout or self.timeout, late
        )

    @property
    def postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def _lookup(
        self,
        read: Callable[[Session | psycopg.Connection[Any]], R],
        then: Callable[[Session | psycopg.Connection[Any], R], T],
    ) -> T:
        if not self.postgres:
            return self._in_transaction(lambda session: then(session, read(session)))
        pooled = autocommit_checkout(self.engine, ping=False)
        try:
            try:
                found = read(pooled.driver_connection)
            except (DBAPIError, psycopg.Error):
                if not thrown_away_if_dead(pooled):
                    raise
                pooled = None
                pooled = autocommit_checkout(self.engine, ping=True)
                found = read(pooled.driver_connection)
            return then(pooled.driver_connection, found)
        finally:
            if pooled is not None:
                give_back(pooled)

    async def lookup(
        self,
        read: Callable[[Session | psycopg.Connection[Any]], R],
        then: Callable[[Session | psycopg.Connection[Any], R], T],
    ) -> T:
        """Run a `read` and then `then` (which may write,
        e.g. a key's `last_used_at`) in a worker thread, on the same connection. On
        PostgreSQL that is the pooled psycopg connection itself in autocommit: each
        statement stands alone, with no BEGIN or COMMIT round trip and no ORM
        session (issue 14.3); elsewhere (SQLite) a session in one transaction. The
        checkout sends no ping, its read is the ping (issue 14: one round trip
        less). A connection the read finds dead is replaced and the read sent
        again: ``read`` must be ONE statement without effects (a plain SELECT, no
        FOR UPDATE, no function that writes), since it may run twice. `then` runs
        once, after a read that succeeded, and is never retried."""
        return await self._call(functools.partial(self._lookup, read, then), self.timeout)

    async def ping(self) -> bool:
        def check(session: Session) -> bool:
            return session.execute(text("SELECT 1")).scalar() == 1

        try:
            return await self.transaction(check, timeout=5)
        except Exception:
            return False

    def busy(self) -> bool:
        """A call is still queued or running (`DbThreads.busy`)."""
        return self._threads.busy()

    def close(self) -> None:
        self._threads.close()
        self.engine.dispose()
