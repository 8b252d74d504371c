"""Checking out a pooled PostgreSQL connection: the ping, or what stands in for it.

SQLAlchemy's ``pool_pre_ping`` sends a ping on every checkout; `pg_ping` (a pool
``checkout`` listener, `db.create_sync_engine`) sends a cheaper one, or the
transaction's own BEGIN (`checkout_begins`), or nothing, when the caller's first
statement is a read that can be sent again (`checkout_unpinged`,
`thrown_away_if_dead`: `Database.lookup`, a lazy unit's first `read`). Each form
finds a connection that died idle in the pool before anything with an effect ran
on it (issue 14: one round trip less per init per form).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError, InvalidatePoolError
from sqlalchemy.orm import Session

_CHECKOUT = threading.local()


@contextmanager
def checkout_unpinged() -> Iterator[None]:
    """While set, this thread's next checkout sends nothing: for a caller whose first
    statement is a read, which finds a dead connection as the ping would and can be
    sent again on a fresh one (`Database.lookup`, `Unit.read`)."""
    _CHECKOUT.skip = True
    try:
        yield
    finally:
        _CHECKOUT.skip = False


@contextmanager
def checkout_begins() -> Iterator[None]:
    """While set, this thread's next checkout begins a transaction as its ping (that
    checkout only: `pg_ping` clears it)."""
    before = getattr(_CHECKOUT, "begin", False)
    _CHECKOUT.begin = True
    _CHECKOUT.backend = None
    try:
        yield
    finally:
        _CHECKOUT.begin = before


def pg_ping(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """What ``pool_pre_ping`` does on each checkout, cheaper: SQLAlchemy's psycopg
    ping switches autocommit on and off and runs ``SELECT 1`` through a cursor; an
    empty query on the libpq connection is the same round trip (measured, one
    checkout and return: 26.3 µs of CPU with ``pool_pre_ping``, 15 µs with this).

    For a caller about to run a transaction (`checkout_begins`: `Database.transaction`
    and `unit`), the ping is ``BEGIN`` itself: the round trip the transaction's first
    statement would have paid first anyway (psycopg sends BEGIN only while the
    connection is idle), so one round trip less per transaction (issue 14). BEGIN
    writes nothing, so a dead connection found by it is replaced exactly as by the
    empty ping: SQLAlchemy drops every pooled connection older than now and checks
    out a fresh one (at most twice, then the checkout fails), before the caller has
    sent anything."""
    if getattr(_CHECKOUT, "skip", False):
        _CHECKOUT.skip = False  # this checkout's only
        return
    pgconn = dbapi_connection.pgconn
    # The first checkout the flag sees is the one it was set for; any other (a
    # nested one, a retry after a dead connection) pings plainly and leaves the
    # BEGIN to psycopg.
    wanted, _CHECKOUT.begin = getattr(_CHECKOUT, "begin", False), False
    begin = wanted and _plain_begin(dbapi_connection)
    try:
        if pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            status = None  # never expected: a connection is reset when returned
        else:
            status = pgconn.exec_(b"BEGIN" if begin else b"").status
    except psycopg.Error as exc:  # the libpq connection is already closed
        raise InvalidatePoolError(str(exc)) from exc
    expected = psycopg.pq.ExecStatus.COMMAND_OK if begin else psycopg.pq.ExecStatus.EMPTY_QUERY
    if status == expected:
        # Read now, while the connection is up: libpq forgets it once it is lost,
        # and a lost answer needs it (`db.lost_backend`).
        _CHECKOUT.backend = pgconn.backend_pid or None
        return
    if pgconn.status == psycopg.pq.ConnStatus.BAD:  # the server or the network went away
        raise InvalidatePoolError("the pooled connection failed its ping")
    # Alive but not idle: this one only is replaced.
    raise DisconnectionError("the pooled connection is not idle")


def _plain_begin(connection: psycopg.Connection[Any]) -> bool:
    """Whether psycopg would start this connection's transaction with a bare BEGIN
    (no isolation level, access mode or deferrable set on it)."""
    return not connection.autocommit and (
        connection.isolation_level is None
        and connection.read_only is None
        and connection.deferrable is None
    )


def autocommit_checkout(engine: Engine, *, ping: bool) -> Any:
    """A pooled connection in autocommit, pinged at checkout or not."""
    if ping:
        pooled = engine.raw_connection()
    else:
        with checkout_unpinged():
            pooled = engine.raw_connection()
    return in_autocommit(pooled)


def in_autocommit(pooled: Any) -> Any:
    """`pooled` with its psycopg connection switched to autocommit; a connection
    that refuses (it was not idle) is thrown away, never left checked out."""
    try:
        driver = pooled.driver_connection
        assert isinstance(driver, psycopg.Connection)
        driver.autocommit = True
    except BaseException:
        pooled.invalidate()
        raise
    return pooled


def thrown_away_if_dead(pooled: Any) -> bool:
    """After a read failed as the first statement of an unpinged checkout: whether
    it found the connection dead (closed while idle in the pool: a restarted server,
    a dropped network). Then nothing ran on it, it is thrown away (out of the pool),
    and the read may be sent again on a pinged checkout, whose ping handles any
    further dead connection as always (`pg_ping`). Otherwise the error is the
    statement's own."""
    driver = pooled.driver_connection
    if driver is not None and not driver.closed:
        return False
    pooled.invalidate()  # closes it and checks its record back in: no `close` needed
    return True


def empty_query(on: Session | psycopg.Connection[Any]) -> None:
    """An empty query: the checkout ping's round trip, as a read
    (`thrown_away_if_dead`)."""
    assert isinstance(on, psycopg.Connection)
    try:
        on.execute(b"")
    except psycopg.Error as exc:
        raise DBAPIError.instance("", None, exc, psycopg.Error) from exc


def give_back(pooled: Any) -> None:
    """Return an autocommit checkout to the pool out of autocommit."""
    try:
        driver = pooled.driver_connection
        if driver is not None and not driver.closed:
            driver.autocommit = False  # the pool hands out transactions
    finally:
        pooled.close()


def checked_out_backend() -> int | None:
    """The PostgreSQL backend of this thread's last pinged checkout since its last
    `checkout_begins` (None: none yet, or SQLite)."""
    backend = getattr(_CHECKOUT, "backend", None)
    return backend if isinstance(backend, int) else None
