"""The credits ledger: holds, settlement, releases and grants.

Each function here is one use case run inside one transaction (the caller passes
the session of `Database.transaction`), so a balance change and its ledger rows
land together or not at all. Balances move only through conditional UPDATEs
(``… WHERE balance_micro - held_micro >= :hold``), never read-then-write, so
concurrent requests cannot overdraw a company.

Ledger amounts are signed micro-credits and give two exact views of a company:

* ``balance   = Σ grant + Σ adjustment + Σ charge``  (charges are negative)
* ``available = Σ grant + Σ adjustment + Σ hold + Σ release``
  (a hold is ``-hold``; its settlement releases ``hold - charge``)

so ``held = balance - available`` is the sum of the active holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.errors import Conflict, InsufficientCredits, NotFound
from control_plane.tables import Company, LedgerEntry, Reservation, new_id, rowcount, utcnow
from shared.catalog import Price
from shared.pricing import cost_micro

BALANCE_KINDS = ("grant", "adjustment", "charge")
AVAILABLE_KINDS = ("grant", "adjustment", "hold", "release")


def charge_for(status: str, input_tokens: int, output_tokens: int, price: Price, hold: int) -> int:
    """What a finished stream costs (DESIGN §9 "What is billed"), capped at its hold.

    A stream that failed or was revoked before its first output token costs nothing;
    every other stream pays for its input and the output it produced."""
    if status in ("failed", "revoked") and output_tokens == 0:
        return 0
    return min(cost_micro(input_tokens, output_tokens, price), hold)


def reservation_price(reservation: Reservation) -> Price:
    return Price(
        input_per_mtok=Decimal(reservation.price_input_per_mtok),
        output_per_mtok=Decimal(reservation.price_output_per_mtok),
    )


def add_entry(
    session: Session,
    company_id: str,
    kind: str,
    amount_micro: int,
    *,
    reservation_id: str | None = None,
    reason: str | None = None,
    actor: str | None = None,
    request_id: str | None = None,
    idempotency_key: str | None = None,
    now: datetime | None = None,
) -> LedgerEntry:
    entry = LedgerEntry(
        id=new_id(),
        company_id=company_id,
        kind=kind,
        amount_micro=amount_micro,
        reservation_id=reservation_id,
        reason=reason,
        actor=actor,
        request_id=request_id,
        idempotency_key=idempotency_key,
        created_at=now or utcnow(),
    )
    session.add(entry)
    return entry


def take_hold(session: Session, reservation: Reservation) -> None:
    """Reserve `reservation.hold_micro` atomically, then record the reservation and
    its ``hold`` entry. Raises InsufficientCredits when the company cannot cover it."""
    hold = reservation.hold_micro
    result = session.execute(
        update(Company)
        .where(col(Company.id) == reservation.company_id)
        .where(col(Company.balance_micro) - col(Company.held_micro) >= hold)
        .values(held_micro=col(Company.held_micro) + hold)
    )
    if rowcount(result) == 0:
        raise InsufficientCredits()
    session.add(reservation)
    add_entry(
        session,
        reservation.company_id,
        "hold",
        -hold,
        reservation_id=reservation.id,
        reason=f"hold for {reservation.model}",
        actor=reservation.user_id,
        request_id=reservation.request_id,
        now=reservation.created_at,
    )
    session.flush()


@dataclass(frozen=True, slots=True)
class Settled:
    charged_micro: int
    released_micro: int


def settle_reservation(
    session: Session, reservation: Reservation, charge: int, *, request_id: str | None
) -> Settled | None:
    """Charge `charge` (≤ the hold) and release the rest, exactly once: None when the
    reservation was already settled or released (by a concurrent duplicate, too)."""
    hold = reservation.hold_micro
    assert 0 <= charge <= hold
    now = utcnow()
    result = session.execute(
        update(Reservation)
        .where(col(Reservation.id) == reservation.id)
        .where(col(Reservation.status) == "active")
        .values(status="settled", charged_micro=charge, settled_at=now)
    )
    if rowcount(result) == 0:
        return None
    session.execute(
        update(Company)
        .where(col(Company.id) == reservation.company_id)
        .values(
            balance_micro=col(Company.balance_micro) - charge,
            held_micro=col(Company.held_micro) - hold,
        )
    )
    for kind, amount, reason in (
        ("charge", -charge, "usage"),
        ("release", hold - charge, "unused hold"),
    ):
        add_entry(
            session,
            reservation.company_id,
            kind,
            amount,
            reservation_id=reservation.id,
            reason=reason,
            request_id=request_id,
            now=now,
        )
    return Settled(charged_micro=charge, released_micro=hold - charge)


def release_reservation(session: Session, reservation_id: str, reason: str) -> int | None:
    """Give an active hold back untouched; the released amount, or None when the
    reservation is no longer active."""
    reservation = session.get(Reservation, reservation_id)
    if reservation is None:
        return None
    now = utcnow()
    result = session.execute(
        update(Reservation)
        .where(col(Reservation.id) == reservation_id)
        .where(col(Reservation.status) == "active")
        .values(status="released", charged_micro=0, settled_at=now)
    )
    if rowcount(result) == 0:
        return None
    hold = reservation.hold_micro
    session.execute(
        update(Company)
        .where(col(Company.id) == reservation.company_id)
        .values(held_micro=col(Company.held_micro) - hold)
    )
    add_entry(
        session,
        reservation.company_id,
        "release",
        hold,
        reservation_id=reservation_id,
        reason=reason,
        request_id=reservation.request_id,
        now=now,
    )
    return hold


def expired_reservation_ids(session: Session, now: datetime, limit: int = 100) -> list[str]:
    stmt = (
        select(col(Reservation.id))
        .where(col(Reservation.status) == "active")
        .where(col(Reservation.expires_at) < now)
        .order_by(col(Reservation.expires_at))
        .limit(limit)
    )
    return list(session.scalars(stmt))


def grant(
    session: Session,
    company_id: str,
    amount_micro: int,
    *,
    reason: str | None,
    actor: str,
    request_id: str | None,
    idempotency_key: str | None = None,
) -> tuple[LedgerEntry, bool]:
    """Add (or, negative, take away) credits. Returns the entry and whether it is new:
    a repeated `idempotency_key` returns the first entry and changes nothing."""
    if idempotency_key is not None:
        existing = session.scalars(
            select(LedgerEntry)
            .where(col(LedgerEntry.company_id) == company_id)
            .where(col(LedgerEntry.idempotency_key) == idempotency_key)
        ).first()
        if existing is not None:
            if existing.amount_micro != amount_micro:
                raise Conflict("This Idempotency-Key was already used with a different amount.")
            return existing, False
    if amount_micro >= 0:
        result = session.execute(
            update(Company)
            .where(col(Company.id) == company_id)
            .values(balance_micro=col(Company.balance_micro) + amount_micro)
        )
    else:
        result = session.execute(
            update(Company)
            .where(col(Company.id) == company_id)
            .where(col(Company.balance_micro) - col(Company.held_micro) + amount_micro >= 0)
            .values(balance_micro=col(Company.balance_micro) + amount_micro)
        )
    if rowcount(result) == 0:
        if session.get(Company, company_id) is None:
            raise NotFound("No such company.")
        raise InsufficientCredits("The company's available credits cannot cover this debit.")
    entry = add_entry(
        session,
        company_id,
        "grant" if amount_micro >= 0 else "adjustment",
        amount_micro,
        reason=reason,
        actor=actor,
        request_id=request_id,
        idempotency_key=idempotency_key,
    )
    session.flush()
    return entry, True


def ledger_sums(session: Session, company_id: str) -> tuple[int, int]:
    """(Σ balance kinds, Σ available kinds): equal to the company's balance and
    available when the books are straight."""

    def total(kinds: tuple[str, ...]) -> int:
        stmt = (
            select(func.coalesce(func.sum(col(LedgerEntry.amount_micro)), 0))
            .where(col(LedgerEntry.company_id) == company_id)
            .where(col(LedgerEntry.kind).in_(kinds))
        )
        return int(session.scalar(stmt) or 0)

    return total(BALANCE_KINDS), total(AVAILABLE_KINDS)
