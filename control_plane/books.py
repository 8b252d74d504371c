"""A company's books: recomputed from the ledger alone, and checked.

The ledger (append-only, signed micro-credits) is the source of truth:

* ``balance   = Σ grant + Σ adjustment + Σ charge``
* ``available = Σ grant + Σ adjustment + Σ hold + Σ release``
* ``held      = balance - available`` = Σ holds of the active reservations

`check_books` states every invariant the credits system promises (DESIGN §10) as
a list of problems, empty when the books are straight; the tests call it after
every step, and an operator can run it against a live database (read-only).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.tables import AuditEvent, Company, LedgerEntry, Reservation

BALANCE_KINDS = ("grant", "adjustment", "charge")
AVAILABLE_KINDS = ("grant", "adjustment", "hold", "release")


@dataclass(frozen=True, slots=True)
class Books:
    balance_micro: int
    held_micro: int

    @property
    def available_micro(self) -> int:
        return self.balance_micro - self.held_micro


def books_from_ledger(session: Session, company_id: str) -> Books:
    sums = {
        kind: int(total)
        for kind, total in session.execute(
            select(col(LedgerEntry.kind), func.coalesce(func.sum(col(LedgerEntry.amount_micro)), 0))
            .where(col(LedgerEntry.company_id) == company_id)
            .group_by(col(LedgerEntry.kind))
        )
    }
    balance = sum(sums.get(kind, 0) for kind in BALANCE_KINDS)
    available = sum(sums.get(kind, 0) for kind in AVAILABLE_KINDS)
    return Books(balance_micro=balance, held_micro=balance - available)


def books_from_row(session: Session, company_id: str) -> Books | None:
    """The cached figures on the company row (what /v1/me shows)."""
    company = session.get(Company, company_id)
    if company is None:
        return None
    return Books(balance_micro=company.balance_micro, held_micro=company.held_micro)


def active_holds_micro(session: Session, company_id: str) -> int:
    stmt = (
        select(func.coalesce(func.sum(col(Reservation.hold_micro)), 0))
        .where(col(Reservation.company_id) == company_id)
        .where(col(Reservation.status) == "active")
    )
    return int(session.scalar(stmt) or 0)


def _reservation_problems(r: Reservation, rows: list[LedgerEntry]) -> list[str]:
    kinds = Counter(e.kind for e in rows)
    amount = {e.kind: e.amount_micro for e in rows}
    problems = []
    if kinds["hold"] != 1 or amount.get("hold") != -r.hold_micro:
        problems.append(f"reservation {r.id}: expected one hold of {-r.hold_micro}")
    if kinds["charge"] > 1 or kinds["release"] > 1:
        problems.append(f"reservation {r.id}: charged or released more than once")
    if any(e.user_id != r.user_id for e in rows):  # a member's ledger goes by it
        problems.append(f"reservation {r.id}: an entry names another user than {r.user_id}")
    expected: dict[str, tuple[int, int]] = {
        "active": (0, 0),
        "settled": (1, 1),
        "released": (0, 1),
    }
    if (kinds["charge"], kinds["release"]) != expected.get(r.status):
        problems.append(f"reservation {r.id}: status {r.status} with {dict(kinds)}")
    charged = r.charged_micro or 0
    if r.status == "settled" and (
        amount.get("charge") != -charged
        or amount.get("release") != r.hold_micro - charged
        or not 0 <= charged <= r.hold_micro
    ):
        problems.append(f"reservation {r.id}: charge + release != hold")
    if r.status == "released" and amount.get("release") != r.hold_micro:
        problems.append(f"reservation {r.id}: released {amount.get('release')} != hold")
    return problems


def check_books(session: Session, company_id: str) -> list[str]:
    """Every way the company's books could be wrong; [] when they are straight."""
    problems: list[str] = []
    ledger = books_from_ledger(session, company_id)
    row = books_from_row(session, company_id)
    if row != ledger:
        problems.append(f"company row {row} != ledger {ledger}")
    if ledger.available_micro < 0 or ledger.held_micro < 0:
        problems.append(f"negative available or held: {ledger}")
    if (holds := active_holds_micro(session, company_id)) != ledger.held_micro:
        problems.append(f"held {ledger.held_micro} != Σ active holds {holds}")
    entries = list(
        session.scalars(select(LedgerEntry).where(col(LedgerEntry.company_id) == company_id))
    )
    for e in entries:
        if (e.kind == "grant" and e.amount_micro <= 0) or (
            e.kind == "adjustment" and (e.amount_micro == 0 or not e.reason)
        ):
            problems.append(f"entry {e.id}: {e.kind} of {e.amount_micro} ({e.reason!r})")
    by_reservation: dict[str, list[LedgerEntry]] = {}
    for e in entries:
        if e.reservation_id is not None:
            by_reservation.setdefault(e.reservation_id, []).append(e)
    reservations = session.scalars(
        select(Reservation).where(col(Reservation.company_id) == company_id)
    )
    for r in reservations:
        problems += _reservation_problems(r, by_reservation.pop(r.id, []))
    problems += [f"ledger rows for unknown reservation {rid}" for rid in by_reservation]
    audited: Counter[tuple[str, str, int | None, str | None]] = Counter(
        (str(a.details.get("ledger_entry_id")), a.action, a.amount_micro, a.actor)
        for a in session.scalars(select(AuditEvent).where(col(AuditEvent.company_id) == company_id))
    )
    for e in entries:
        key = (e.id, e.kind, e.amount_micro, e.actor)
        if audited[key] != 1:
            problems.append(f"entry {e.id} ({e.kind}) has {audited[key]} matching audit events")
    return problems
