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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import Table, func, select, tuple_, update
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import audit, budgets, chat_sessions, hot_statements, settle_statements
from control_plane.errors import InsufficientCredits
from control_plane.reservation_row import ReservationTerms
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


class Held(Protocol):
    """What settling reads of a reservation: the ORM row (the sweeper's) or the
    plain values a settlement batch selects (`settlement.HeldRow`, no ORM object)."""

    @property
    def id(self) -> str: ...
    @property
    def company_id(self) -> str: ...
    @property
    def user_id(self) -> str: ...
    @property
    def jti(self) -> str: ...
    @property
    def session_id(self) -> str: ...
    @property
    def request_id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def provider(self) -> str: ...
    @property
    def hold_micro(self) -> int: ...
    @property
    def input_estimate(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def price_input_per_mtok(self) -> str: ...
    @property
    def price_output_per_mtok(self) -> str: ...
    @property
    def price_cached_input_per_mtok(self) -> str | None: ...
    @property
    def price_cache_write_per_mtok(self) -> str | None: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def api_key_id(self) -> str | None: ...
    @property
    def fallbacks(self) -> list[dict[str, str]] | None: ...


def reservation_price(reservation: Held) -> Price:
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
    user_id: str | None = None,
    reason: str | None = None,
    request_id: str | None = None,
    idempotency_key: str | None = None,
    details: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> LedgerEntry:
    """Append one ledger row and its audit event (same transaction, same instant).
    `user_id`: the user of the reservation, with one."""
    assert kind in KINDS
    moment = now or utcnow()
    entry = LedgerEntry(
        id=new_id(),
        company_id=company_id,
        kind=kind,
        amount_micro=amount_micro,
        reservation_id=reservation_id,
        user_id=user_id,
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


def hold_entry(
    reservation: Reservation | ReservationTerms, created_at: datetime
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A hold's ledger row and audit event (actor: the user), whichever way it is
    written: `take_hold`, or init's one statement on PostgreSQL (`init_writes`)."""
    r = reservation
    return hot_statements.entry_rows(
        r.company_id,
        "hold",
        -r.hold_micro,
        actor=r.user_id,
        reservation_id=r.id,
        user_id=r.user_id,
        reason=f"hold for {r.model}",
        request_id=r.request_id,
        idempotency_key=None,
        details={
            "jti": r.jti,
            "model": r.model,
            "input_estimate": r.input_estimate,
            "max_tokens": r.max_tokens,
        },
        now=created_at,
    )


def take_hold(session: Session, reservation: Reservation) -> None:
    """Reserve `reservation.hold_micro` atomically, then record the reservation and
    its ``hold`` entry (actor: the user). Raises InsufficientCredits when the company
    cannot cover it; the caller's transaction then rolls back whatever it added.
    Init's way on SQLite; on PostgreSQL init writes all of this, and more, in one
    statement (`init_writes.hold`)."""
    # Core rows for the ledger and audit: no ORM unit of work on the hot path.
    if not hot_statements.hold_and_reserve(session, reservation):
        raise InsufficientCredits()
    hot_statements.write_entries(session, [hold_entry(reservation, reservation.created_at)])


@dataclass(frozen=True, slots=True)
class Settled:
    charged_micro: int
    released_micro: int


@dataclass(frozen=True, slots=True)
class ToSettle:
    """One reservation to settle in a batch, and what its rows say."""

    reservation: Held
    charge: int  # <= the hold
    actor: str
    request_id: str | None
    details: dict[str, Any]
    # False: init counted its hold against no budget, so there is none to move.
    budgeted: bool = True


# Rows of other tables that a batch's settlements add (the usage records), by what
# each item came to and at the settlement's instant (the ledger rows' own, so that a
# stream's record and its charge fall on one UTC day): written in the ledger rows'
# one statement.
AlsoRows = Callable[
    [Sequence["Settled | None"], datetime], Sequence[tuple[Table, Sequence[dict[str, Any]]]]
]


def settle_reservation(
    session: Session,
    reservation: Reservation,
    charge: int,
    *,
    actor: str,
    request_id: str | None,
    details: dict[str, Any] | None = None,
) -> Settled | None:
    """`settle_reservations` for one."""
    item = ToSettle(reservation, charge, actor, request_id, details or {})
    return settle_reservations(session, [item])[0]


def settle_reservations(
    session: Session,
    items: Sequence[ToSettle],
    also: AlsoRows | None = None,
    *,
    claim: str | None = None,
) -> list[Settled | None]:
    """Charge each item's `charge` (≤ its hold) and release the rest, exactly once:
    None for a reservation already settled or released (by a concurrent duplicate,
    too). Reservations must be distinct.

    Set-based (issue 14.2): one conditional UPDATE flips every reservation still
    active (the exactly-once point) and moves each company's money summed over the
    flipped ones (`settle_statements.settle_held`, one statement on PostgreSQL),
    the budgets follow (`budgets.settle_many`), and the charge and release rows with
    their audit events go in one INSERT, with the rows `also` adds for the outcomes
    (the caller's usage records). Locks follow the order above: reservations,
    companies, budget periods. `claim`: a lone item's webhook id, recorded in the
    flip's statement, which settles only if the id is new
    (`settle_statements.settle_held`)."""
    if not items:
        return []
    now = utcnow()
    for item in items:
        assert 0 <= item.charge <= item.reservation.hold_micro
    if claim is not None and len(items) == 1 and not items[0].budgeted:
        # Nothing between the flip and the rows: all of it in one statement.
        return [settle_claimed(session, items[0], claim, also, now=now)]
    flipped = settle_statements.settle_held(
        session,
        [
            (
                item.reservation.id,
                item.reservation.company_id,
                item.charge,
                item.reservation.hold_micro,
            )
            for item in items
        ],
        now,
        claim=claim,
    )
    done = [item for item in items if item.reservation.id in flipped]
    if not done:
        return [None] * len(items)
    budgeted = [(item.reservation.id, item.charge) for item in done if item.budgeted]
    if budgeted:
        budgets.settle_many(session, budgeted, now)
    rows = _entry_rows(done, now)
    outcomes = [
        Settled(item.charge, item.reservation.hold_micro - item.charge)
        if item.reservation.id in flipped
        else None
        for item in items
    ]
    settle_statements.insert_rows(
        session,
        (hot_statements.LEDGER, [entry for entry, _ in rows]),
        (hot_statements.AUDIT, [event for _, event in rows]),
        *(also(outcomes, now) if also is not None else ()),
    )
    return outcomes


def settle_claimed(
    on: settle_statements.On,
    item: ToSettle,
    claim: str,
    also: AlsoRows | None = None,
    *,
    now: datetime | None = None,
) -> Settled | None:
    """`settle_reservations` of one reservation counted against no budget, with its
    webhook id `claim`, on PostgreSQL: the id recorded, the flip, the company's money
    and the rows (with those `also` adds) in ONE statement
    (`settle_statements.claim_settle_and_write`), atomic by itself, so it may run
    outside any transaction (a lone webhook's, `webhook_settlement.settle_alone`). None:
    the id was taken or the reservation is no longer active; nothing was moved."""
    assert not item.budgeted and 0 <= item.charge <= item.reservation.hold_micro
    now = now or utcnow()
    settled = Settled(item.charge, item.reservation.hold_micro - item.charge)
    rows = _entry_rows([item], now)
    wrote = settle_statements.claim_settle_and_write(
        on,
        (
            item.reservation.id,
            item.reservation.company_id,
            item.charge,
            item.reservation.hold_micro,
        ),
        now,
        claim,
        (hot_statements.LEDGER, [entry for entry, _ in rows]),
        (hot_statements.AUDIT, [event for _, event in rows]),
        *(also([settled], now) if also is not None else ()),
    )
    return settled if wrote else None


def _entry_rows(
    items: Sequence[ToSettle], now: datetime
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each settled item's charge and release rows with their audit events."""
    return [
        hot_statements.entry_rows(
            item.reservation.company_id,
            kind,
            amount,
            actor=item.actor,
            reservation_id=item.reservation.id,
            user_id=item.reservation.user_id,
            reason=reason,
            request_id=item.request_id,
            idempotency_key=None,
            details={"hold_micro": item.reservation.hold_micro, **item.details},
            now=now,
        )
        for item in items
        for kind, amount, reason in (
            ("charge", -item.charge, "usage"),
            ("release", item.reservation.hold_micro - item.charge, "unused hold"),
        )
    ]


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
    # Nothing was billed, so what the init stored of its turn goes with the hold: an
    # abandoned init is not free storage (a session it created and left empty too).
    chat_sessions.take_back_turn(session, reservation.session_id, reservation.created_at)
    add_entry(
        session,
        reservation.company_id,
        "release",
        hold,
        actor=actor,
        reservation_id=reservation_id,
        user_id=reservation.user_id,
        reason=reason,
        request_id=reservation.request_id,
        details={"hold_micro": hold, **(details or {})},
        now=now,
    )
    session.flush()
    return hold


def expired_reservations(
    session: Session, now: datetime, after: tuple[datetime, str] | None = None, limit: int = 100
) -> list[tuple[datetime, str, str]]:
    """Active reservations past their deadline, oldest deadline first: (deadline, id,
    company id), after `after` (a page's last deadline and id: keyset pages, so that
    one the sweep could not reconcile is not listed again in the same pass)."""
    stmt = (
        select(col(Reservation.expires_at), col(Reservation.id), col(Reservation.company_id))
        .where(col(Reservation.status) == "active")
        .where(col(Reservation.expires_at) < now)
        .order_by(col(Reservation.expires_at), col(Reservation.id))
        .limit(limit)
    )
    if after is not None:
        stmt = stmt.where(tuple_(col(Reservation.expires_at), col(Reservation.id)) > after)
    return [(at, rid, company) for at, rid, company in session.execute(stmt)]


def active_reservations(
    session: Session, after_id: str, limit: int = 100, up_to: str | None = None
) -> list[tuple[str, str, str]]:
    """Active reservations by id, after `after_id` (keyset pages) and, given, up to
    `up_to` included: (id, company id, jti) of those whose stream may be running, or
    may have gone silent."""
    stmt = (
        select(col(Reservation.id), col(Reservation.company_id), col(Reservation.jti))
        .where(col(Reservation.status) == "active")
        .where(col(Reservation.id) > after_id)
        .order_by(col(Reservation.id))
        .limit(limit)
    )
    if up_to is not None:
        stmt = stmt.where(col(Reservation.id) <= up_to)
    return [(rid, company, jti) for rid, company, jti in session.execute(stmt)]


def active_hold_count(session: Session) -> int:
    """How many reservations hold credits now (the ``holds_active`` gauge)."""
    stmt = select(func.count()).select_from(Reservation).where(col(Reservation.status) == "active")
    return int(session.scalar(stmt) or 0)
