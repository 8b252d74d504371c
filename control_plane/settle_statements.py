"""Settlement's writes for a whole batch at once, one statement per table (issue 14.2).

Each function takes the rows of every settlement in the batch and sends one
statement on PostgreSQL: the rows go as arrays (``unnest``), so the SQL text is the
same whatever the batch size (cached by SQLAlchemy, prepared once per connection
by psycopg where allowed). The conditions are the per-row ones of
`hot_statements` (a reservation flips only while ``active``; a session's counters
move only within its caps), applied row by row by the database.

SQLite (embedded dev mode) runs the same conditional statements one row at a time:
it has no arrays to bind, and its writers are serialised by ``BEGIN IMMEDIATE``,
so nothing runs beside them. Rows are sent in key order: two batches in two
processes then lock the rows of one table in the same order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import JSON, Insert, Table, bindparam, func, insert, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from control_plane import hot_statements, raw_pg
from control_plane.tables import rowcount

# Where a statement runs: a session's transaction, or a psycopg connection itself
# (a lone webhook's, `webhook_settlement.settle_alone`: PostgreSQL, no ORM session).
On = Session | psycopg.Connection[Any]


def _postgres(on: On) -> bool:
    return isinstance(on, psycopg.Connection) or on.get_bind().dialect.name == "postgresql"


def _session(on: On) -> Session:
    """The session of a SQLite path (a psycopg connection is always PostgreSQL's)."""
    assert isinstance(on, Session)
    return on


def _run(on: On, sql: str, params: dict[str, Any]) -> list[Any]:
    """A PostgreSQL statement of this module, sent as it is (pyformat parameters)
    on the session's psycopg connection, in its transaction, or on `on` itself
    (`raw_pg.run`): no compilation, no SQLAlchemy execution context. Arrays go in
    binary (``%(name)b``): psycopg's text format escapes each element with a
    regular expression (measured: 480 against 180 µs for 16 rows of 5 columns)."""
    driver = on if isinstance(on, psycopg.Connection) else raw_pg.driver_connection(on)
    assert driver is not None
    return raw_pg.run(driver, sql, params)


# --- append-only rows ----------------------------------------------------------------

_PG = postgresql.dialect()  # type: ignore[no-untyped-call]
_INSERTS: dict[tuple[str, int], tuple[str, list[tuple[str, bool]]]] = {}
_SQLITE_INSERTS: dict[str, Insert] = {}
# Up to this many rows a table's INSERT binds scalars (a lone settlement's two ledger
# rows and audit events, its usage record): psycopg dumps an array in binary by
# looking at its elements each time (~20 µs an array), a scalar at once.
SCALAR_ROWS = 2


def _pg_insert(table: Table, scalar_rows: int, prefix: str) -> tuple[str, list[tuple[str, bool]]]:
    """An INSERT of every column of `table`, its parameters named `prefix` + column:
    of `scalar_rows` rows of scalars (``VALUES``, the j-th row's named ``…_j``), or,
    for 0, of any number (``SELECT * FROM unnest(%(a)b, …)``, one array per column);
    and which columns are JSON (sent as their JSON text)."""
    key = (f"{prefix}{table.name}", scalar_rows)
    found = _INSERTS.get(key)
    if found is None:
        quote = _PG.identifier_preparer.quote
        columns = list(table.columns)
        if scalar_rows:
            source = "VALUES " + ", ".join(
                "("
                + ", ".join(
                    f"CAST(%({prefix}{c.name}_{j})s AS {c.type.compile(dialect=_PG)})"
                    for c in columns
                )
                + ")"
                for j in range(scalar_rows)
            )
        else:
            arrays = ", ".join(
                f"CAST(%({prefix}{c.name})b AS {c.type.compile(dialect=_PG)}[])" for c in columns
            )
            source = f"SELECT * FROM unnest({arrays})"
        names = ", ".join(quote(c.name) for c in columns)
        found = _INSERTS[key] = (
            f"INSERT INTO {quote(table.name)} ({names}) {source}",
            [(c.name, isinstance(c.type, JSON)) for c in columns],
        )
    return found


def _column(rows: Sequence[dict[str, Any]], name: str, is_json: bool) -> list[Any]:
    # A column a row leaves out is NULL, as in a Core INSERT (none has a default).
    if is_json:
        return [json.dumps(row[name]) if name in row else None for row in rows]
    return [row.get(name) for row in rows]


def insert_rows(session: Session, *tables: tuple[Table, Sequence[dict[str, Any]]]) -> None:
    """Each table's `rows` (every column), all in ONE statement on PostgreSQL (the
    first tables' INSERTs as data-modifying WITH clauses of the last's). Not
    executemany: psycopg pipelines one INSERT per row there and busy-polls the
    socket until the server answers; nor SQLAlchemy's multi-row VALUES, which
    rewrites the SQL row by row with regular expressions (each measured at a fifth
    or more of a batch's CPU). When no table has more than `SCALAR_ROWS` rows the
    values go as scalars, otherwise every table's as arrays (so that the SQL text
    depends on the batch size only up to there). A JSON value goes as its text
    (None: JSON null), as SQLAlchemy's JSON type writes it."""
    tables = tuple((table, rows) for table, rows in tables if rows)
    if not tables:
        return
    if not _postgres(session):
        for table, rows in tables:
            session.execute(_SQLITE_INSERTS.setdefault(table.name, insert(table)), list(rows))
        return
    parts, params = _insert_parts(tables)
    withs = ", ".join(f"w{i} AS ({sql})" for i, sql in enumerate(parts[:-1]))
    _run(session, f"WITH {withs} {parts[-1]}" if withs else parts[-1], params)


def _insert_parts(
    tables: Sequence[tuple[Table, Sequence[dict[str, Any]]]],
) -> tuple[list[str], dict[str, Any]]:
    """`insert_rows`' INSERT per table (each of at least one row) and their parameters."""
    scalars = all(len(rows) <= SCALAR_ROWS for _, rows in tables)
    parts: list[str] = []
    params: dict[str, Any] = {}
    for i, (table, rows) in enumerate(tables):
        prefix = f"t{i}_"
        sql, columns = _pg_insert(table, len(rows) if scalars else 0, prefix)
        parts.append(sql)
        if scalars:
            for j, row in enumerate(rows):
                _scalar_params(params, row, _scalar_keys(table, prefix, j, columns))
            continue
        for name, is_json in columns:
            params[prefix + name] = _column(rows, name, is_json)
    return parts, params


# (table, prefix, j) -> the j-th row's parameter names: its plain columns' and its
# JSON columns'. Made once: a lone settlement binds ~60 scalars, and building each
# name and value through generators cost ~40 µs a webhook (measured), ~15 this way.
_SCALAR_KEYS: dict[tuple[str, str, int], tuple[list[str], list[str], list[tuple[str, str]]]] = {}


def _scalar_keys(
    table: Table, prefix: str, j: int, columns: list[tuple[str, bool]]
) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    key = (table.name, prefix, j)
    found = _SCALAR_KEYS.get(key)
    if found is None:
        found = _SCALAR_KEYS[key] = (
            [f"{prefix}{name}_{j}" for name, is_json in columns if not is_json],
            [name for name, is_json in columns if not is_json],
            [(f"{prefix}{name}_{j}", name) for name, is_json in columns if is_json],
        )
    return found


def _scalar_params(
    params: dict[str, Any],
    row: dict[str, Any],
    keys: tuple[list[str], list[str], list[tuple[str, str]]],
) -> None:
    """One row's values as `_column` reads them (absent: NULL; JSON as its text)."""
    plain_keys, plain_names, json_keys = keys
    params.update(zip(plain_keys, map(row.get, plain_names), strict=True))
    for key, name in json_keys:
        params[key] = json.dumps(row[name]) if name in row else None


# --- webhook ids -------------------------------------------------------------------

# A twin in flight in another transaction makes ON CONFLICT wait for it: once it
# commits, the row is its own and this statement leaves it (no IntegrityError).
_CLAIM_PG = (
    "INSERT INTO webhook_events (webhook_id, reservation_id, received_at) "
    "SELECT w, r, %(now)s "
    "FROM unnest(CAST(%(ids)b AS varchar[]), CAST(%(reservations)b AS varchar[])) AS v(w, r) "
    "ORDER BY w "
    "ON CONFLICT (webhook_id) DO NOTHING RETURNING webhook_id"
)
# One delivery's, with scalars (`SCALAR_ROWS`).
_CLAIM_ONE_PG = (
    "INSERT INTO webhook_events (webhook_id, reservation_id, received_at) "
    "VALUES (CAST(%(id)s AS varchar), CAST(%(reservation)s AS varchar), %(now)s) "
    "ON CONFLICT (webhook_id) DO NOTHING RETURNING webhook_id"
)
_CLAIM_SQLITE = (
    sqlite_insert(hot_statements.WEBHOOK_EVENTS)
    .values(
        webhook_id=bindparam("p_webhook_id"),
        reservation_id=bindparam("p_reservation_id"),
        received_at=bindparam("p_now"),
    )
    .on_conflict_do_nothing()
)
_OWNERS = select(
    hot_statements.WEBHOOK_EVENTS.c.webhook_id, hot_statements.WEBHOOK_EVENTS.c.reservation_id
).where(hot_statements.WEBHOOK_EVENTS.c.webhook_id.in_(bindparam("p_ids", expanding=True)))


def claim_webhook_ids(
    session: Session, claims: Sequence[tuple[str, str]], now: datetime
) -> dict[str, tuple[str, bool]]:
    """Record each (webhook id, reservation id) whose id is new. For every id: the
    reservation its row names and whether this call wrote it (False: an earlier
    delivery, committed, had it). Ids must be distinct."""
    if not claims:
        return {}
    ordered = sorted(claims)
    if _postgres(session):
        if len(ordered) == 1:
            [(w, r)] = ordered
            result = _run(session, _CLAIM_ONE_PG, {"id": w, "reservation": r, "now": now})
        else:
            result = _run(
                session,
                _CLAIM_PG,
                {
                    "ids": [w for w, _ in ordered],
                    "reservations": [r for _, r in ordered],
                    "now": now,
                },
            )
        written = {row[0] for row in result}
    else:
        written = {
            w
            for w, r in ordered
            if rowcount(
                session.execute(
                    _CLAIM_SQLITE, {"p_webhook_id": w, "p_reservation_id": r, "p_now": now}
                )
            )
            == 1
        }
    owners = {w: (r, True) for w, r in ordered if w in written}
    seen = [w for w, _ in ordered if w not in written]
    if seen:
        for w, r in session.execute(_OWNERS, {"p_ids": seen}):
            owners[w] = (r, False)
    return owners


def _claim_and_settle(
    session: On,
    charges: Sequence[tuple[str, str, int, int]],
    now: datetime,
    claim: str,
    tables: Sequence[tuple[Table, Sequence[dict[str, Any]]]],
) -> set[str]:
    """`settle_held` of one reservation with its webhook id's claim, and the rows of
    `tables` written in the same statement if (and only if) it settled."""
    assert len(charges) == 1 and _postgres(session)
    [(reservation_id, _, charge, _)] = charges
    params = {"webhook_id": claim, "ids": reservation_id, "charges": charge, "now": now}
    sql = _CLAIM_AND_SETTLE_ONE_PG
    tables = [(table, rows) for table, rows in tables if rows]
    if tables:
        parts, row_params = _insert_parts(tables)
        params.update(row_params)
        # Each INSERT as a WITH clause, its VALUES kept only if the flip matched (a
        # lone webhook's tables have at most `SCALAR_ROWS` rows: VALUES, not arrays).
        gated = [
            raw_pg.substituted(part, " VALUES ", " SELECT * FROM (VALUES ", count=1)
            + ") AS v WHERE EXISTS (SELECT FROM flipped)"
            for part in parts
        ]
        withs = "".join(f", w{i} AS ({part})" for i, part in enumerate(gated))
        sql = raw_pg.substituted(sql, " SELECT id FROM flipped", f"{withs} SELECT id FROM flipped")
    return {row[0] for row in _run(session, sql, params)}


def claim_settle_and_write(
    session: On,
    charge: tuple[str, str, int, int],
    now: datetime,
    claim: str,
    *tables: tuple[Table, Sequence[dict[str, Any]]],
) -> bool:
    """A lone webhook's whole settlement in ONE statement (PostgreSQL,
    `can_claim_and_settle`): its id recorded, the reservation flipped and its
    company's money moved (`settle_held` with `claim`), and the rows of `tables`
    (the ledger rows, their audit events, the usage record: `insert_rows`) written
    only if the flip matched. One round trip less again than `settle_held` then
    `insert_rows`. Whether it settled."""
    return bool(_claim_and_settle(session, [charge], now, claim, tables))


def can_claim_and_settle(session: Session) -> bool:
    """Whether `settle_held` can record a lone webhook's id itself (PostgreSQL)."""
    return _postgres(session)


_OWNER_PG = "SELECT reservation_id FROM webhook_events WHERE webhook_id = %(id)s"


def webhook_owner(on: On, webhook_id: str) -> str | None:
    """The reservation a recorded webhook id names (None: not recorded)."""
    if isinstance(on, psycopg.Connection):
        for (reservation_id,) in _run(on, _OWNER_PG, {"id": webhook_id}):
            return str(reservation_id)
        return None
    for _, reservation_id in on.execute(_OWNERS, {"p_ids": [webhook_id]}):
        return str(reservation_id)
    return None


# --- reservations and companies ----------------------------------------------------

# The flip and the money in one statement: the companies' UPDATE sums exactly the
# reservations the flip matched (its RETURNING), after all of them (an aggregate).
_SETTLE_SOURCE = "unnest(CAST(%(ids)b AS varchar[]), CAST(%(charges)b AS bigint[]))"
_SETTLE_ONE_SOURCE = "(VALUES (CAST(%(ids)s AS varchar), CAST(%(charges)s AS bigint)))"
_SETTLE_PG = (
    "WITH flipped AS ("
    "UPDATE reservations AS r SET status = 'settled', charged_micro = v.charge, "
    "settled_at = %(now)s "
    f"FROM {_SETTLE_SOURCE} AS v(id, charge) "
    "WHERE r.id = v.id AND r.status = 'active' "
    "RETURNING r.id, r.company_id, v.charge, r.hold_micro), "
    "moved AS ("
    "UPDATE companies AS c SET balance_micro = c.balance_micro - m.charge, "
    "held_micro = c.held_micro - m.hold "
    "FROM (SELECT company_id, sum(charge) AS charge, sum(hold_micro) AS hold "
    "FROM flipped GROUP BY company_id ORDER BY company_id) AS m "
    "WHERE c.id = m.company_id) "
    "SELECT id FROM flipped"
)
_SETTLE_ONE_PG = raw_pg.substituted(_SETTLE_PG, _SETTLE_SOURCE, _SETTLE_ONE_SOURCE)
# A lone webhook's claim of its id and its settlement in ONE statement (one round
# trip less than `claim_webhook_ids` then `_SETTLE_ONE_PG`, the lone webhook being
# the case at low load): the flip happens only if the id was recorded now. A twin
# in flight makes ON CONFLICT wait for it, as `_CLAIM_ONE_PG` does; the id is
# recorded even when the reservation is no longer active (a redelivery then finds it).
_CLAIM_AND_SETTLE_ONE_PG = (
    "WITH claimed AS ("
    "INSERT INTO webhook_events (webhook_id, reservation_id, received_at) "
    "VALUES (CAST(%(webhook_id)s AS varchar), CAST(%(ids)s AS varchar), %(now)s) "
    "ON CONFLICT (webhook_id) DO NOTHING RETURNING webhook_id), "
    + raw_pg.substituted(
        _SETTLE_ONE_PG.removeprefix("WITH "),
        "WHERE r.id = v.id AND r.status = 'active' ",
        "WHERE r.id = v.id AND r.status = 'active' AND EXISTS (SELECT FROM claimed) ",
    )
)


def settle_held(
    session: Session,
    charges: Sequence[tuple[str, str, int, int]],
    now: datetime,
    *,
    claim: str | None = None,
) -> set[str]:
    """(reservation id, company id, charge, hold) each: settle every reservation
    still active (the exactly-once point: a concurrent twin waits on the row lock,
    then finds it settled and matches nothing), and move its company's money: the
    charges leave the balance, the whole holds leave ``held``. Returns the ids
    that were still active.

    `claim`: a webhook id to record for the one reservation first, in the same
    statement (`can_claim_and_settle`); it settles only if the id is new. Whether
    the id was taken before is the caller's to look up when nothing settled."""
    ordered = sorted(charges)
    if claim is not None:
        return _claim_and_settle(session, ordered, now, claim, ())
    if _postgres(session):
        one = len(ordered) == 1
        ids = [i for i, _, _, _ in ordered]
        amounts = [charge for _, _, charge, _ in ordered]
        params = {
            "ids": ids[0] if one else ids,
            "charges": amounts[0] if one else amounts,
            "now": now,
        }
        return {row[0] for row in _run(session, _SETTLE_ONE_PG if one else _SETTLE_PG, params)}
    flipped = {
        reservation_id
        for reservation_id, _, charge, _ in ordered
        if hot_statements.flip_reservation(session, reservation_id, "settled", charge, now)
    }
    moves: dict[str, tuple[int, int]] = {}
    for reservation_id, company_id, charge, hold in ordered:
        if reservation_id in flipped:
            charged, held = moves.get(company_id, (0, 0))
            moves[company_id] = (charged + charge, held + hold)
    for company_id, (charge, hold) in sorted(moves.items()):
        hot_statements.settle_company(session, company_id, charge, hold)
    return flipped


# --- chat sessions -----------------------------------------------------------------

_GROW_SOURCE = (
    "unnest(CAST(%(ids)b AS varchar[]), CAST(%(added)b AS bigint[]), "
    "CAST(%(sizes)b AS bigint[]), CAST(%(max_messages)b AS bigint[]), "
    "CAST(%(max_bytes)b AS bigint[]))"
)
_GROW_ONE_SOURCE = (
    "(VALUES (CAST(%(ids)s AS varchar), CAST(%(added)s AS bigint), "
    "CAST(%(sizes)s AS bigint), CAST(%(max_messages)s AS bigint), "
    "CAST(%(max_bytes)s AS bigint)))"
)
_GROW_SESSIONS_PG = (
    "UPDATE chat_sessions AS s SET updated_at = %(now)s, "
    "message_count = s.message_count + v.added, content_bytes = s.content_bytes + v.size "
    f"FROM {_GROW_SOURCE} "
    "AS v(id, added, size, max_messages, max_bytes) "
    "WHERE s.id = v.id AND s.message_count + v.added <= v.max_messages "
    "AND s.content_bytes + v.size <= v.max_bytes RETURNING s.id"
)
_GROW_ONE_PG = raw_pg.substituted(_GROW_SESSIONS_PG, _GROW_SOURCE, _GROW_ONE_SOURCE)
_LAST_SEQS = (
    select(hot_statements.MESSAGES.c.session_id, func.max(hot_statements.MESSAGES.c.seq))
    .where(hot_statements.MESSAGES.c.session_id.in_(bindparam("p_ids", expanding=True)))
    .group_by(hot_statements.MESSAGES.c.session_id)
)


def grow_sessions(
    session: On, growth: Sequence[tuple[str, int, int, int, int]], now: datetime
) -> set[str]:
    """(session id, messages added, bytes added, max messages, max bytes) per session:
    the counters of those that stay within their caps move (and their rows are
    locked); returns those ids. A session absent or full is left as it is."""
    ordered = sorted(growth)
    if _postgres(session):
        one = len(ordered) == 1
        columns = list(zip(*ordered, strict=True))
        params: dict[str, Any] = {
            name: values[0] if one else list(values)
            for name, values in zip(
                ("ids", "added", "sizes", "max_messages", "max_bytes"), columns, strict=True
            )
        }
        params["now"] = now
        sql = _GROW_ONE_PG if one else _GROW_SESSIONS_PG
        return {row[0] for row in _run(session, sql, params)}
    grown = set()
    for session_id, added, size, max_messages, max_bytes in ordered:
        params = {
            "p_id": session_id,
            "p_added": added,
            "p_size": size,
            "p_max_messages": max_messages,
            "p_max_bytes": max_bytes,
            "p_now": now,
        }
        if rowcount(_session(session).execute(hot_statements.APPEND_TO_SESSION, params)) == 1:
            grown.add(session_id)
    return grown


def session_exists(driver: psycopg.Connection[Any], session_id: str) -> bool:
    return bool(_run(driver, "SELECT 1 FROM chat_sessions WHERE id = %(id)s", {"id": session_id}))


def last_seqs(session: Session, session_ids: Sequence[str]) -> dict[str, int]:
    """Each session's highest message number (absent: no message yet)."""
    rows = session.connection().execute(_LAST_SEQS, {"p_ids": list(session_ids)})
    return {session_id: int(seq) for session_id, seq in rows if seq is not None}


def _messages_after_last_pg(one: bool) -> str:
    """The INSERT of `insert_messages_after_last`: of one row (scalars) or any."""
    quote = _PG.identifier_preparer.quote
    columns = list(hot_statements.MESSAGES.columns)
    names = [c.name for c in columns]
    casts = ", ".join(
        f"CAST(%({c.name})s AS {c.type.compile(dialect=_PG)})"
        if one
        else f"CAST(%({c.name})b AS {c.type.compile(dialect=_PG)}[])"
        for c in columns
    )
    values = [
        "coalesce((SELECT max(m.seq) FROM chat_messages AS m WHERE m.session_id = v.session_id), 0)"
        " + v.seq"
        if n == "seq"
        else f"v.{quote(n)}"
        for n in names
    ]
    source = f"(VALUES ({casts}))" if one else f"unnest({casts})"
    return (
        f"INSERT INTO chat_messages ({', '.join(quote(n) for n in names)}) "
        f"SELECT {', '.join(values)} "
        f"FROM {source} AS v({', '.join(quote(n) for n in names)})"
    )


# Numbered in the statement that inserts them, after the session's last message: a
# statement of its own, so that its snapshot is taken once the caller's counter
# UPDATE holds the session's row (a concurrent appender has committed by then).
_MESSAGES_AFTER_LAST_PG = _messages_after_last_pg(one=False)
_MESSAGE_AFTER_LAST_PG = _messages_after_last_pg(one=True)


def insert_messages_after_last(session: On, rows: Sequence[dict[str, Any]]) -> None:
    """Messages (every column) whose ``seq`` counts from 1 in each session, numbered
    after that session's last message, in one INSERT on PostgreSQL (SQLite: one
    SELECT of the last numbers, then the INSERT). The caller holds the sessions'
    rows (`grow_sessions`), so nothing numbers between the read and the write."""
    if not rows:
        return
    if not _postgres(session):
        last = last_seqs(_session(session), sorted({row["session_id"] for row in rows}))
        numbered = [{**row, "seq": last.get(row["session_id"], 0) + row["seq"]} for row in rows]
        insert_rows(_session(session), (hot_statements.MESSAGES, numbered))
        return
    one = len(rows) == 1
    params = {
        column.name: values[0] if one else values
        for column in hot_statements.MESSAGES.columns
        for values in [_column(rows, column.name, isinstance(column.type, JSON))]
    }
    _run(session, _MESSAGE_AFTER_LAST_PG if one else _MESSAGES_AFTER_LAST_PG, params)
