"""Init's hot statements on the pooled psycopg connection itself (issue 14.3).

Each `session.execute` of a prebuilt Core statement still costs ~0.15 ms of
SQLAlchemy (the execution context, parameter processing, result setup), and
psycopg re-parses any statement of more than 50 parameters on every run (its query
cache skips them: init's one write statement has ~60). `RawStatement` compiles a
statement once to PostgreSQL's own ``$n`` placeholders and runs it with psycopg's
`RawCursor` (no placeholder parsing at all) on the connection the session's
transaction already holds: the same transaction, committed or rolled back with the
session. Parameters keep SQLAlchemy's meaning: each column type's bind processor
(JSON, the UTC datetimes) runs once per value, as the ORM path would.

psycopg prepares statements server-side as the connection says (``prepare_threshold``),
so behind PgBouncer in transaction mode (threshold off, `db.py`) nothing is prepared
here either. On SQLite (the embedded dev mode) `RawStatement` runs the statement
through the session as before.
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

_DIALECT = PGDialect_psycopg(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]


def _db_error(sql: str, params: Any, exc: psycopg.Error) -> StatementError:
    """psycopg's error as SQLAlchemy's, like the engine's (`db.create_sync_engine`):
    without its parameters, which are prompts, answers and password hashes, and
    would otherwise reach the log in every traceback of a failed statement."""
    return DBAPIError.instance(sql, params, exc, psycopg.Error, hide_parameters=True)


class RawStatement:
    """A Core statement compiled once for psycopg's raw cursor."""

    def __init__(self, statement: Executable) -> None:
        assert isinstance(statement, ClauseElement)
        self.statement = statement
        compiled = statement.compile(dialect=_DIALECT)
        assert isinstance(compiled, SQLCompiler)
        self.sql = str(compiled)
        names = compiled.positiontup
        assert names is not None
        # `$n` is the n-th name (a name used twice, as the hold's amount, is one `$n`).
        self._names: tuple[str, ...] = tuple(names)
        self._processors: tuple[Callable[[Any], Any] | None, ...] = tuple(
            compiled.binds[name].type.dialect_impl(_DIALECT).bind_processor(_DIALECT)
            for name in self._names
        )
        columns = list(getattr(statement, "selected_columns", ()))
        self._row = namedtuple("_row", [str(c.key) for c in columns])  # type: ignore[misc]
        self._results: tuple[Callable[[Any], Any] | None, ...] = tuple(
            c.type.dialect_impl(_DIALECT).result_processor(_DIALECT, None) for c in columns
        )

    def params(self, values: Mapping[str, Any]) -> list[Any]:
        out = []
        for name, process in zip(self._names, self._processors, strict=True):
            value = values[name]
            out.append(value if process is None else process(value))
        return out

    def rows(self, session: Session, values: Mapping[str, Any]) -> list[Any]:
        """The statement's rows (named tuples of the selected columns)."""
        connection = session.connection()
        if connection.dialect.name != "postgresql":
            return list(session.execute(self.statement, dict(values)).all())
        driver = connection.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        params = self.params(values)
        try:
            with psycopg.RawCursor(driver) as cursor:
                cursor.execute(self.sql, params)
                fetched = cursor.fetchall() if cursor.description is not None else []
        except psycopg.Error as exc:
            # As SQLAlchemy would raise it (IntegrityError, OperationalError…).
            raise _db_error(self.sql, params, exc) from exc
        return [self._row_of(values_) for values_ in fetched]

    def first(self, session: Session, values: Mapping[str, Any]) -> Any | None:
        rows = self.rows(session, values)
        return rows[0] if rows else None

    def _row_of(self, values: tuple[Any, ...]) -> Any:
        return self._row(
            *(
                value if process is None else process(value)
                for value, process in zip(values, self._results, strict=True)
            )
        )

    def first_on(
        self, on: Session | psycopg.Connection[Any], values: Mapping[str, Any]
    ) -> Any | None:
        """`first` in a session's transaction, or on a psycopg connection of its own
        (`Database.lookup`: autocommit, the statement is its own transaction)."""
        if isinstance(on, Session):
            return self.first(on, values)
        params = self.params(values)
        try:
            with psycopg.RawCursor(on) as cursor:
                cursor.execute(self.sql, params)
                # Whether rows come back is known from the statement: psycopg's
                # `description` builds a Column object per column on every call.
                row = cursor.fetchone() if self._results else None
        except psycopg.Error as exc:
            raise _db_error(self.sql, params, exc) from exc
        return None if row is None else self._row_of(row)


def substituted(sql: str, old: str, new: str, *, count: int = -1) -> str:
    """`sql` with `old` replaced by `new`, for a statement derived from another one.
    Fails loudly when `old` is missing: a silent no-op `str.replace` would drop the
    condition or the rows the derived statement exists for (the lone webhook's
    `EXISTS (claimed)` gate is what keeps a reused webhook id from settling)."""
    if old not in sql:
        raise ValueError(f"statement to derive from lacks {old!r}")
    return sql.replace(old, new, count)


def driver_connection(session: Session) -> psycopg.Connection[Any] | None:
    """The psycopg connection of the session's transaction; None on SQLite."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        return None
    driver = connection.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    return driver


_PLACEHOLDER = re.compile(r"%\((\w+)\)([sb])")
_CONVERTED: dict[str, tuple[str, tuple[str, ...]] | None] = {}


def _positional(sql: str) -> tuple[str, tuple[str, ...]] | None:
    """`sql` with ``$n`` for its ``%(name)s`` (a name used twice is one ``$n``) and
    the names in order; None when it binds an array in binary (``%(name)b``), which
    only psycopg's own placeholders can ask for. Converted once per SQL text."""
    if sql in _CONVERTED:
        return _CONVERTED[sql]
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    binary = any(match[2] == "b" for match in _PLACEHOLDER.finditer(sql))
    found = None if binary else (_PLACEHOLDER.sub(number, sql), tuple(names))
    _CONVERTED[sql] = found
    return found


def run(driver: psycopg.Connection[Any], sql: str, params: Mapping[str, Any]) -> list[Any]:
    """A PostgreSQL statement written as psycopg SQL (``%(name)s``, or ``%(name)b``
    for an array, whose text format escapes every element with a regular
    expression), run on `driver` in the session's transaction: no SQLAlchemy
    execution context or result proxy (settlement, issue 14.2: ~95 µs of
    `exec_driver_sql` per statement). A statement of scalars only runs with ``$n``
    on psycopg's raw cursor (psycopg parses a query of more than 50 parameters on
    every run); one with arrays as psycopg SQL. Prepared as the connection says
    (PgBouncer: never). Its rows, as tuples."""
    positional = _positional(sql)
    try:
        if positional is None:
            with driver.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall() if _has_rows(cursor) else []
        text, names = positional
        with psycopg.RawCursor(driver) as raw:
            raw.execute(text, [params[name] for name in names])
            return raw.fetchall() if _has_rows(raw) else []
    except psycopg.Error as exc:
        raise _db_error(sql, params, exc) from exc


def _has_rows(cursor: psycopg.Cursor[Any]) -> bool:
    """Whether the statement returned a result set (`description` is not None),
    without `description`, which builds a `Column` object per column on every
    call: ~15% of `run`'s CPU for a settlement's statements (issue 14.2)."""
    result = cursor.pgresult
    return result is not None and (
        result.nfields > 0 or result.status == psycopg.pq.ExecStatus.TUPLES_OK
    )


@contextmanager
def savepoint(on: Session | psycopg.Connection[Any]) -> Iterator[None]:
    """What `Session.begin_nested` does, for a block of statements that changes no ORM
    object: on PostgreSQL a plain ``SAVEPOINT`` on the psycopg connection (the
    session's, or `on` itself in its transaction; no SQLAlchemy transaction
    object, events or flush), rolled back to if the block raises. Kept when the
    block succeeds rather than released (one round trip less): its work commits
    or rolls back with the transaction all the same, and a later savepoint of the
    same name only hides it."""
    driver = on if isinstance(on, psycopg.Connection) else driver_connection(on)
    if driver is None:
        assert isinstance(on, Session)
        with on.begin_nested():
            yield
        return
    run(driver, "SAVEPOINT raw_pg", {})
    try:
        yield
    except BaseException:
        run(driver, "ROLLBACK TO SAVEPOINT raw_pg", {})
        raise
