"""Admin money movements: credit grants and adjustments, each idempotent by key.

* A **grant** adds credits (amount > 0), e.g. a purchase or a promotion.
* An **adjustment** corrects the books either way (amount ≠ 0) and must say why; a
  negative one may take at most what is available (balance - active holds), so it
  can never leave a hold uncovered.

``Idempotency-Key``: the first request with a key records its entry; a repeat with
the same key and the same kind, amount and reason returns that entry and changes
nothing; the same key with a different body is a 409. Keys are unique per company
(`uq_ledger_entries_company_idempotency_key`), so a concurrent twin loses on the
unique index and the caller replays (`routes.admin_credits`).
"""

from __future__ import annotations

from typing import Literal, NoReturn

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.errors import (
    AvailableCreditsExceeded,
    BalanceLimitExceeded,
    IdempotencyConflict,
    NotFound,
)
from control_plane.ledger import add_entry
from control_plane.tables import Company, LedgerEntry, rowcount
from shared.pricing import MAX_CREDITS, MICRO, format_credits

# A balance far beyond any real one, and far below the bigint column's 9.2e18: ten
# maximal grants used to overflow it (a 500 from PostgreSQL).
MAX_BALANCE_MICRO = int(MAX_CREDITS) * MICRO


def _refuse_over_ceiling(session: Session, company_id: str) -> NoReturn:
    company = session.get(Company, company_id)
    if company is None:
        raise NotFound("No such company.")
    raise BalanceLimitExceeded(
        f"This would take the company's balance past {format_credits(MAX_BALANCE_MICRO)} "
        f"credits (it is {format_credits(company.balance_micro)})."
    )


def _replay(
    session: Session,
    company_id: str,
    key: str | None,
    kind: str,
    amount_micro: int,
    reason: str | None,
) -> LedgerEntry | None:
    if key is None:
        return None
    existing = session.scalars(
        select(LedgerEntry)
        .where(col(LedgerEntry.company_id) == company_id)
        .where(col(LedgerEntry.idempotency_key) == key)
    ).first()
    if existing is None:
        return None
    if (existing.kind, existing.amount_micro, existing.reason) != (kind, amount_micro, reason):
        raise IdempotencyConflict()
    return existing


MoveKind = Literal["grant", "adjustment"]


def move(
    session: Session,
    company_id: str,
    amount_micro: int,
    *,
    kind: MoveKind,
    reason: str | None,
    actor: str,
    request_id: str | None,
    idempotency_key: str | None = None,
) -> tuple[LedgerEntry, bool]:
    """Record a grant (amount > 0) or an adjustment (either sign, with a reason): one
    conditional UPDATE of the balance and its ledger entry, or a replay of the entry
    `idempotency_key` already recorded. Returns the entry and whether it is new
    (False: a replay). A debit larger than what is available raises
    AvailableCreditsExceeded and changes nothing."""
    assert amount_micro > 0 if kind == "grant" else amount_micro != 0 and reason
    existing = _replay(session, company_id, idempotency_key, kind, amount_micro, reason)
    if existing is not None:
        return existing, False
    stmt = (
        update(Company)
        .where(col(Company.id) == company_id)
        .values(balance_micro=col(Company.balance_micro) + amount_micro)
    )
    if amount_micro < 0:
        stmt = stmt.where(col(Company.balance_micro) - col(Company.held_micro) + amount_micro >= 0)
    else:
        stmt = stmt.where(col(Company.balance_micro) + amount_micro <= MAX_BALANCE_MICRO)
    if rowcount(session.execute(stmt)) == 0:
        if amount_micro > 0:
            _refuse_over_ceiling(session, company_id)
        company = session.get(Company, company_id)
        if company is None:
            raise NotFound("No such company.")
        available = company.balance_micro - company.held_micro
        raise AvailableCreditsExceeded(
            f"This adjustment ({format_credits(amount_micro)}) would take the company's "
            f"available credits ({format_credits(available)}) below zero."
        )
    entry = add_entry(
        session,
        company_id,
        kind,
        amount_micro,
        actor=actor,
        reason=reason,
        request_id=request_id,
        idempotency_key=idempotency_key,
    )
    session.flush()
    return entry, True
