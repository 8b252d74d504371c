"""The money path's writes as prebuilt SQLAlchemy Core statements (issue 14.3).

Init and settlement run these on every chat turn. Built once at import (the
statement objects are immutable), executed with plain parameter dicts: no
expression building, no ORM unit of work, identity map or flush per request, and
rows of one kind go in one INSERT (several rows: one executemany). Statements that
the ORM path also runs keep their meaning exactly (the same conditional UPDATEs);
`tables.py` stays the schema, and the admin paths keep the ORM.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Insert, Table, bindparam, exists, func, insert, select, update
from sqlalchemy.orm import Session

from control_plane.tables import (
    AuditEvent,
    Budget,
    ChatMessage,
    ChatSession,
    Company,
    LedgerEntry,
    Reservation,
    UsageRecord,
    WebhookEvent,
    new_id,
)


def table_of(model: Any) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


COMPANIES = table_of(Company)
RESERVATIONS = table_of(Reservation)
LEDGER = table_of(LedgerEntry)
AUDIT = table_of(AuditEvent)
USAGE = table_of(UsageRecord)
WEBHOOK_EVENTS = table_of(WebhookEvent)
SESSIONS = table_of(ChatSession)
MESSAGES = table_of(ChatMessage)

# The hold: never drives `available` (balance - held) below zero.
TAKE_HOLD = (
    update(COMPANIES)
    .where(COMPANIES.c.id == bindparam("p_company_id"))
    .where(COMPANIES.c.balance_micro - COMPANIES.c.held_micro >= bindparam("p_hold"))
    .values(held_micro=COMPANIES.c.held_micro + bindparam("p_hold"))
)

_RESERVATION_COLUMNS = [c.name for c in RESERVATIONS.columns]
INSERT_RESERVATION = insert(RESERVATIONS)
INSERT_LEDGER = insert(LEDGER)
INSERT_AUDIT = insert(AUDIT)
INSERT_SESSION = insert(SESSIONS)
INSERT_MESSAGES = insert(MESSAGES)


def reservation_row(reservation: Reservation) -> dict[str, Any]:
    return {name: getattr(reservation, name) for name in _RESERVATION_COLUMNS}


def hold_and_reserve(session: Session, reservation: Reservation) -> bool:
    """Take `reservation.hold_micro` from its company's available credits and insert
    the reservation, atomically (in the caller's transaction); False (nothing
    written) when the company cannot cover it. The SQLite path (the embedded dev
    mode), whose writers ``BEGIN IMMEDIATE`` serialises; PostgreSQL writes the hold
    with the rest of init in one statement (`init_writes.hold`)."""
    hold = {"p_company_id": reservation.company_id, "p_hold": reservation.hold_micro}
    if _rowcount(session.execute(TAKE_HOLD, hold)) == 0:
        return False
    session.execute(INSERT_RESERVATION, reservation_row(reservation))
    return True


def _insert(session: Session, statement: Insert, rows: list[dict[str, Any]]) -> None:
    session.execute(statement, rows if len(rows) > 1 else rows[0])


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


def entry_rows(
    company_id: str,
    kind: str,
    amount_micro: int,
    *,
    actor: str,
    reservation_id: str | None,
    user_id: str | None,
    reason: str | None,
    request_id: str | None,
    idempotency_key: str | None,
    details: dict[str, Any],
    now: datetime,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One ledger row and its audit event, as `ledger.add_entry` writes them.
    `user_id`: the reservation's user (None with no reservation)."""
    entry_id = new_id()
    context: dict[str, Any] = {"ledger_entry_id": entry_id}
    if reason is not None:
        context["reason"] = reason
    if idempotency_key is not None:
        context["idempotency_key"] = idempotency_key
    entry = {
        "id": entry_id,
        "company_id": company_id,
        "kind": kind,
        "amount_micro": amount_micro,
        "reservation_id": reservation_id,
        "user_id": user_id,
        "reason": reason,
        "actor": actor,
        "request_id": request_id,
        "idempotency_key": idempotency_key,
        "created_at": now,
    }
    event = {
        "id": new_id(),
        "actor": actor,
        "action": kind,
        "company_id": company_id,
        "amount_micro": amount_micro,
        "reservation_id": reservation_id,
        "request_id": request_id,
        "details": {**context, **details},
        "created_at": now,
    }
    return entry, event


def write_entries(session: Session, rows: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """Ledger rows and their audit events: one INSERT each (executemany for several)."""
    _insert(session, INSERT_LEDGER, [entry for entry, _ in rows])
    _insert(session, INSERT_AUDIT, [event for _, event in rows])


# Settlement's exactly-once point: only an active reservation flips (`ledger`).
FLIP_RESERVATION = (
    update(RESERVATIONS)
    .where(RESERVATIONS.c.id == bindparam("p_id"))
    .where(RESERVATIONS.c.status == "active")
    .values(
        status=bindparam("p_status"),
        charged_micro=bindparam("p_charge"),
        settled_at=bindparam("p_now"),
    )
)
# The charge leaves the balance, the whole hold leaves `held`.
SETTLE_COMPANY = (
    update(COMPANIES)
    .where(COMPANIES.c.id == bindparam("p_company_id"))
    .values(
        balance_micro=COMPANIES.c.balance_micro - bindparam("p_charge"),
        held_micro=COMPANIES.c.held_micro - bindparam("p_hold"),
    )
)


def flip_reservation(
    session: Session, reservation_id: str, status: str, charge: int, now: datetime
) -> bool:
    params = {"p_id": reservation_id, "p_status": status, "p_charge": charge, "p_now": now}
    return _rowcount(session.execute(FLIP_RESERVATION, params)) == 1


def settle_company(session: Session, company_id: str, charge: int, hold: int) -> None:
    params = {"p_company_id": company_id, "p_charge": charge, "p_hold": hold}
    session.execute(SETTLE_COMPANY, params)


# A session's counters move only within its caps; the UPDATE also locks its row.
APPEND_TO_SESSION = (
    update(SESSIONS)
    .where(
        SESSIONS.c.id == bindparam("p_id"),
        SESSIONS.c.message_count + bindparam("p_added") <= bindparam("p_max_messages"),
        SESSIONS.c.content_bytes + bindparam("p_size") <= bindparam("p_max_bytes"),
    )
    .values(
        updated_at=bindparam("p_now"),
        message_count=SESSIONS.c.message_count + bindparam("p_added"),
        content_bytes=SESSIONS.c.content_bytes + bindparam("p_size"),
    )
)
SELECT_SESSION_ID = select(SESSIONS.c.id).where(SESSIONS.c.id == bindparam("p_id"))
SELECT_LAST_SEQ = select(func.max(MESSAGES.c.seq)).where(MESSAGES.c.session_id == bindparam("p_id"))

# --- init (issue 14.3): the company with whether it has any budget ----------------
# One row, one round trip: init asks `budgets.applicable` (a join over teams, ORM
# rows) only when the company has a budget at all, read afresh by every init (alone,
# before its hold, in the common case: under READ COMMITTED the same snapshot a
# transaction would give it), so a budget created a moment ago applies to the very
# next init; nothing cached.
_BUDGETS = table_of(Budget)
SELECT_COMPANY_FOR_INIT_WITH_BUDGETS = select(
    COMPANIES.c.id,
    COMPANIES.c.disabled_at,
    COMPANIES.c.default_model,
    exists().where(_BUDGETS.c.company_id == COMPANIES.c.id).label("has_budgets"),
).where(COMPANIES.c.id == bindparam("p_id"))
