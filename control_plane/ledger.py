"""The credits ledger: holds, settlements and releases, and the books recomputed
from it.

Each function here is one step of a use case run inside one transaction (the caller
passes the session of `Database.transaction`), so a balance change, its ledger rows
and their audit events land together or not at all. Balances move only through
conditional UPDATEs (``… WHERE balance_micro - held_micro >= :hold``), never
read-then-write, so concurrent requests cannot overdraw a company.

Ledger amounts are signed micro-credits and give two exact views of a company:

* ``balance   = Σ grant + Σ adjustment + Σ charge``  (charges are negative)
* ``available = Σ grant + Σ adjustment + Σ hold + Σ release``
  (a hold is ``-hold``; its settlement releases ``hold - charge``)

so ``held = balance - available`` is the sum of the active holds. The company row's
``balance_micro`` and ``held_micro`` are a cache of those sums, moved in the same
transaction as the rows; `books` recomputes and checks them.

Lock order (PostgreSQL row locks), the same in every use case so none can deadlock
another: reservation row → company row → budget period rows (budget id order) →
chat session row. Init inserts its reservation (no lock on an existing one), then
holds on the company, then on its budgets (`budgets.hold`), then appends to the
session; settlement and release flip the reservation first, then move the
company's money, then the budgets' (`budgets.settle`), then (settlement) append the
reply; grants lock the company only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import audit, budgets, hot_statements
from control_plane.errors import InsufficientCredits
from control_plane.tables import Company, LedgerEntry, Reservation, new_id, rowcount, utcnow
from shared.catalog import Price
from shared.pricing import TokenUsage, usage_cost_micro

KINDS = ("grant", "adjustment", "hold", "charge", "release")


def charge_for(
    status: str,
    input_tokens: int,
    output_tokens: int,
    price: Price,
    hold: int,
    *,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
) -> int:
    """What a finished stream costs (DESIGN §9 "What is billed"), capped at its hold:
    each part of the input at its own rate (DESIGN §11 "Prices"), one ceiling.

    A stream that failed or was revoked before its first output token costs nothing;
    every other stream pays for its input and the output it produced. ValueError
    when the cache parts exceed the input (`parse_usage_event` refuses those)."""
    if status in ("failed", "revoked") and output_tokens == 0:
        return 0
    usage = TokenUsage(input_tokens, output_tokens, cached_input_tokens, cache_write_tokens)
    return max(0, min(usage_cost_micro(usage, price), hold))


def _rate(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


def reservation_price(reservation: Reservation) -> Price:
    return Price(
        input_per_mtok=Decimal(reservation.price_input_per_mtok),
        output_per_mtok=Decimal(reservation.price_output_per_mtok),
        cached_input_per_mtok=_rate(reservation.price_cached_input_per_mtok),
        cache_write_per_mtok=_rate(reservation.price_cache_write_per_mtok),
    )


def add_entry(
    session: Session,
    company_id: str,
    kind: str,
    amount_micro: int,
    *,
    actor: str,
    reservation_id: str | None = None,
    reason: str | None = None,
    request_id: str | None = None,
    idempotency_key: str | None = None,
    details: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> LedgerEntry:
    """Append one ledger row and its audit event (same transaction, same instant)."""
    assert kind in KINDS
    moment = now or utcnow()
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
        created_at=moment,
    )
    session.add(entry)
    context: dict[str, Any] = {"ledger_entry_id": entry.id}
    if reason is not None:
        context["reason"] = reason
    if idempotency_key is not None:
        context["idempotency_key"] = idempotency_key
    audit.record(
        session,
        actor=actor,
        action=kind,
        company_id=company_id,
        amount_micro=amount_micro,
        reservation_id=reservation_id,
        request_id=request_id,
        details={**context, **(details or {})},
        now=moment,
    )
    return entry


def take_hold(session: Session, reservation: Reservation) -> None:
    """Reserve `reservation.hold_micro` atomically, then record the reservation and
    its ``hold`` entry (actor: the user). Raises InsufficientCredits when the company
    cannot cover it; the caller's transaction then rolls back whatever it added."""
    # One statement on PostgreSQL (`hot_statements.hold_and_reserve`), Core rows for
    # the ledger and audit: no ORM unit of work on the hot path.
    hold = reservation.hold_micro
    if not hot_statements.hold_and_reserve(session, reservation):
        raise InsufficientCredits()
    hot_statements.write_entries(
        session,
        [
            hot_statements.entry_rows(
                reservation.company_id,
                "hold",
                -hold,
                actor=reservation.user_id,
                reservation_id=reservation.id,
                reason=f"hold for {reservation.model}",
                request_id=reservation.request_id,
                idempotency_key=None,
                details={
                    "jti": reservation.jti,
                    "model": reservation.model,
                    "input_estimate": reservation.input_estimate,
                    "max_tokens": reservation.max_tokens,
                },
                now=reservation.created_at,
            )
        ],
    )


@dataclass(frozen=True, slots=True)
class Settled:
    charged_micro: int
    released_micro: int


def settle_reservation(
    session: Session,
    reservation: Reservation,
    charge: int,
    *,
    actor: str,
    request_id: str | None,
    details: dict[str, Any] | None = None,
) -> Settled | None:
    """Charge `charge` (≤ the hold) and release the rest, exactly once: None when the
    reservation was already settled or released (by a concurrent duplicate, too).

    The conditional UPDATE on the reservation's status is the exactly-once point: on
    PostgreSQL a concurrent twin blocks on the row lock, then re-reads the row, sees
    it settled and matches nothing."""
    hold = reservation.hold_micro
    assert 0 <= charge <= hold
    now = utcnow()
    if not hot_statements.flip_reservation(session, reservation.id, "settled", charge, now):
        return None
    hot_statements.settle_company(session, reservation.company_id, charge, hold)
    budgets.settle(session, reservation.id, charge, now)
    hot_statements.write_entries(
        session,
        [
            hot_statements.entry_rows(
                reservation.company_id,
                kind,
                amount,
                actor=actor,
                reservation_id=reservation.id,
                reason=reason,
                request_id=request_id,
                idempotency_key=None,
                details={"hold_micro": hold, **(details or {})},
                now=now,
            )
            for kind, amount, reason in (
                ("charge", -charge, "usage"),
                ("release", hold - charge, "unused hold"),
            )
        ],
    )
    return Settled(charged_micro=charge, released_micro=hold - charge)


def release_reservation(
    session: Session,
    reservation_id: str,
    reason: str,
    *,
    actor: str,
    details: dict[str, Any] | None = None,
) -> int | None:
    """Give an active hold back untouched; the released amount, or None when the
    reservation is no longer active (settled or released already)."""
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
    budgets.settle(session, reservation_id, 0, now)
    add_entry(
        session,
        reservation.company_id,
        "release",
        hold,
        actor=actor,
        reservation_id=reservation_id,
        reason=reason,
        request_id=reservation.request_id,
        details={"hold_micro": hold, **(details or {})},
        now=now,
    )
    session.flush()
    return hold


def expired_reservation_ids(session: Session, now: datetime, limit: int = 100) -> list[str]:
    """Active reservations past their deadline, oldest deadline first."""
    stmt = (
        select(col(Reservation.id))
        .where(col(Reservation.status) == "active")
        .where(col(Reservation.expires_at) < now)
        .order_by(col(Reservation.expires_at))
        .limit(limit)
    )
    return list(session.scalars(stmt))


def active_reservation_ids(session: Session, after_id: str, limit: int = 100) -> list[str]:
    """Active reservations by id, after `after_id` (keyset pages): those whose stream
    may be running, or may have gone silent."""
    stmt = (
        select(col(Reservation.id))
        .where(col(Reservation.status) == "active")
        .where(col(Reservation.id) > after_id)
        .order_by(col(Reservation.id))
        .limit(limit)
    )
    return list(session.scalars(stmt))


def active_hold_count(session: Session) -> int:
    """How many reservations hold credits now (the ``holds_active`` gauge)."""
    stmt = select(func.count()).select_from(Reservation).where(col(Reservation.status) == "active")
    return int(session.scalar(stmt) or 0)
