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

from collections import namedtuple
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

_DIALECT = PGDialect_psycopg(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]


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
            raise DBAPIError.instance(self.sql, params, exc, psycopg.Error) from exc
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
        (`Database.standalone`: autocommit, the statement is its own transaction)."""
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
            raise DBAPIError.instance(self.sql, params, exc, psycopg.Error) from exc
        return None if row is None else self._row_of(row)
