"""Init's writes on PostgreSQL in one statement (issue 14.3).

An init writes the hold (a conditional UPDATE of its company), the reservation, the
hold's ledger row and audit event and, for a new session, the session with its first
message. `ledger.take_hold` and `chat_sessions.create_with_messages` send those as
five statements; here they are data-modifying CTEs of ONE statement, each INSERT
selecting from the one before it, so nothing is written unless the conditional
UPDATE matched (the company could cover the hold), and the whole statement is one
round trip, compiled once. SQLite (the embedded dev mode) has no DML in a CTE and
keeps the separate statements (`reserve`'s other branch).

`NewReservation` is the reservation as plain values: no SQLModel object (validation,
attribute instrumentation) on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import CTE, Select, Table, bindparam, insert, select
from sqlalchemy.orm import Session

from control_plane import chat_sessions, raw_pg
from control_plane.hot_statements import (
    AUDIT,
    COMPANIES,
    LEDGER,
    MESSAGES,
    RESERVATIONS,
    SESSIONS,
    TAKE_HOLD,
)
from control_plane.ledger import hold_entry
from control_plane.reservation_row import ReservationTerms


@dataclass(frozen=True, slots=True)
class NewReservation(ReservationTerms):
    """A reservation row about to be written: the `reservations` table's columns."""

    status: str
    charged_micro: int | None
    created_at: datetime
    expires_at: datetime
    settled_at: datetime | None
    api_key_id: str | None
    fallbacks: list[dict[str, str]] | None

    def row(self) -> dict[str, Any]:
        # Not `dataclasses.astuple`: it deep-copies every value (the fallbacks list).
        return {name: getattr(self, name) for name in RESERVATION_COLUMNS}


RESERVATION_COLUMNS = tuple(f.name for f in fields(NewReservation))
# What `hot_statements.entry_rows` writes (tests/test_init_writes.py keeps them equal).
LEDGER_COLUMNS = (
    "id",
    "company_id",
    "kind",
    "amount_micro",
    "reservation_id",
    "user_id",
    "reason",
    "actor",
    "request_id",
    "idempotency_key",
    "created_at",
)
AUDIT_COLUMNS = (
    "id",
    "actor",
    "action",
    "company_id",
    "amount_micro",
    "reservation_id",
    "request_id",
    "details",
    "created_at",
)
SESSION_COLUMNS = tuple(c.name for c in SESSIONS.columns)
MESSAGE_COLUMNS = tuple(c.name for c in MESSAGES.columns)


def _values(table: Table, columns: tuple[str, ...], prefix: str) -> Select[Any]:
    """One row of bound values named `prefix` + column, typed as the columns."""
    return select(
        *(bindparam(prefix + name, type_=table.c[name].type).label(name) for name in columns)
    )


def _insert_after(table: Table, columns: tuple[str, ...], prefix: str, after: CTE) -> Any:
    """An INSERT of one row of bound values that happens only if `after` produced one."""
    return insert(table).from_select(columns, _values(table, columns, prefix).select_from(after))


_HELD = TAKE_HOLD.returning(COMPANIES.c.id).cte("held")
_RESERVED = (
    _insert_after(RESERVATIONS, RESERVATION_COLUMNS, "r_", _HELD)
    .returning(RESERVATIONS.c.id)
    .cte("reserved")
)
_LEDGER = _insert_after(LEDGER, LEDGER_COLUMNS, "l_", _RESERVED).cte("hold_entry")
_AUDIT = _insert_after(AUDIT, AUDIT_COLUMNS, "a_", _RESERVED).cte("hold_event")
_SESSION = (
    _insert_after(SESSIONS, SESSION_COLUMNS, "s_", _RESERVED)
    .returning(SESSIONS.c.id)
    .cte("new_session")
)
_MESSAGE = _insert_after(MESSAGES, MESSAGE_COLUMNS, "m_", _SESSION).cte("first_message")

# Returns the reservation's id, or no row when the company cannot cover the hold.
HOLD = select(_RESERVED.c.id).add_cte(_LEDGER, _AUDIT)
HOLD_WITH_NEW_SESSION = select(_RESERVED.c.id).add_cte(_LEDGER, _AUDIT, _SESSION, _MESSAGE)
# Run on the psycopg connection (`raw_pg`): ~60 parameters, past psycopg's query cache.
_RAW_HOLD = raw_pg.RawStatement(HOLD)
_RAW_HOLD_WITH_NEW_SESSION = raw_pg.RawStatement(HOLD_WITH_NEW_SESSION)


def _params(prefix: str, row: dict[str, Any], columns: tuple[str, ...]) -> dict[str, Any]:
    return {prefix + name: row[name] for name in columns}


@dataclass(frozen=True, slots=True)
class FirstTurn:
    """A new session and its one message, as rows of their tables."""

    session: dict[str, Any]
    message: dict[str, Any]


def first_turn(
    session_id: str,
    company_id: str,
    user_id: str,
    messages: list[dict[str, Any]],
    limits: chat_sessions.SessionLimits,
    now: datetime,
) -> FirstTurn | None:
    """The rows `chat_sessions.create_with_messages` writes for a new session of one
    message (its builder, `new_session_rows`); None when there are several (they go
    the usual way) or when the message alone passes the session's caps
    (`create_with_messages` answers "full")."""
    if len(messages) != 1:
        return None
    rows = chat_sessions.new_session_rows(session_id, company_id, user_id, messages, limits, now)
    if rows is None:
        return None
    [message] = rows.messages
    return FirstTurn(rows.session, message)


def hold(
    on: Session | psycopg.Connection[Any],
    reservation: NewReservation,
    turn: FirstTurn | None = None,
) -> bool:
    """Take the hold and write the reservation, its ledger row and audit event and,
    with `turn`, the new session and its message: one statement. False, and nothing
    written, when the company cannot cover the hold."""
    entry, event = hold_entry(reservation, reservation.created_at)
    params = {
        "p_company_id": reservation.company_id,
        "p_hold": reservation.hold_micro,
        **_params("r_", reservation.row(), RESERVATION_COLUMNS),
        **_params("l_", entry, LEDGER_COLUMNS),
        **_params("a_", event, AUDIT_COLUMNS),
    }
    statement = _RAW_HOLD
    if turn is not None:
        params |= _params("s_", turn.session, SESSION_COLUMNS)
        params |= _params("m_", turn.message, MESSAGE_COLUMNS)
        statement = _RAW_HOLD_WITH_NEW_SESSION
    return statement.first_on(on, params) is not None
