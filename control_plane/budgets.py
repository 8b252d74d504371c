"""Budgets against the database: holds at init, spend at settlement, the views.

Every function takes the caller's session and does not commit: a budget's hold
lands in init's transaction with the balance's hold, and its spend in the
settlement's transaction with the charge (one transaction per use case). Counters
move only through conditional UPDATEs (``… WHERE spent + held + :hold <= amount``),
never read-then-write.

Lock order (PostgreSQL row locks), added to `ledger`'s: reservation row → company
row → budget period rows in budget id order → chat session row. Init holds on the
company row first (`ledger.take_hold`), then here on each budget period in id
order; settlement and release move the company's money first, then these rows in
the same order. Every budget of a hold belongs to the reservation's company, so the
company row already serialises everything that writes its budget periods.

Arithmetic (periods, what fits, thresholds) is `budget_math`'s, without I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, delete, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import budget_math
from control_plane.errors import BudgetExceeded
from control_plane.tables import (
    Budget,
    BudgetEvent,
    BudgetPeriod,
    CompanyWebhook,
    Reservation,
    ReservationBudget,
    TeamMember,
    iso,
    new_id,
    rowcount,
)
from shared.pricing import format_credits

EVENT_TYPE = "budget.threshold"
# How long a threshold event is kept once done with (delivered, given up, or of a
# deleted budget). Longer than the longest calendar period (31 days): an event
# pruned is never one of the current period, which would be told again.
EVENT_RETENTION = timedelta(days=45)
# How long a period's counters are kept once the period has ended (`prune_periods`).
# No API reads an ended period (the views show the current one), so this only
# bounds the table: a daily budget wrote 365 rows a year.
PERIOD_RETENTION = timedelta(days=45)


def applicable(
    session: Session, company_id: str, user_id: str, api_key_id: str | None
) -> list[Budget]:
    """The budgets that cap a request by `user_id` (through `api_key_id`, if any):
    the user's, the key's and those of every team the user is in; in id order (the
    lock order)."""
    teams = select(col(TeamMember.team_id)).where(col(TeamMember.user_id) == user_id)
    targets = [
        and_(col(Budget.scope) == "user", col(Budget.target_id) == user_id),
        and_(col(Budget.scope) == "team", col(Budget.target_id).in_(teams)),
    ]
    if api_key_id is not None:
        targets.append(and_(col(Budget.scope) == "api_key", col(Budget.target_id) == api_key_id))
    stmt = (
        select(Budget)
        .where(col(Budget.company_id) == company_id)
        .where(or_(*targets))
        .order_by(col(Budget.id))
    )
    return list(session.scalars(stmt))


def _ensure_period(session: Session, budget_id: str, start: datetime) -> None:
    """The period's counters row, created at zero by its first hold."""
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    values = {"budget_id": budget_id, "period_start": start, "spent_micro": 0, "held_micro": 0}
    session.execute(insert(BudgetPeriod).values(**values).on_conflict_do_nothing())


def _resets_at(budget: Budget, start: datetime) -> str | None:
    moment = budget_math.resets_at(budget.period, start)
    return None if moment is None else iso(moment)


def hold(
    session: Session,
    *,
    reservation_id: str,
    company_id: str,
    user_id: str,
    api_key_id: str | None,
    hold_micro: int,
    now: datetime,
) -> None:
    """Count `hold_micro` against every budget that caps this request, atomically
    with the balance's hold (same transaction, after it). BudgetExceeded (402) names
    the first budget it would cross; the caller's transaction then rolls back the
    holds already counted on the others, and the balance's."""
    for budget in applicable(session, company_id, user_id, api_key_id):
        start = budget_math.period_start(budget.period, now)
        _ensure_period(session, budget.id, start)
        period = col(BudgetPeriod.held_micro) + col(BudgetPeriod.spent_micro)
        result = session.execute(
            update(BudgetPeriod)
            .where(col(BudgetPeriod.budget_id) == budget.id)
            .where(col(BudgetPeriod.period_start) == start)
            .where(period + hold_micro <= budget.amount_micro)
            .values(held_micro=col(BudgetPeriod.held_micro) + hold_micro)
        )
        if rowcount(result) == 0:
            raise BudgetExceeded(budget.id, budget.scope, _resets_at(budget, start))
        session.add(
            ReservationBudget(
                reservation_id=reservation_id,
                budget_id=budget.id,
                period_start=start,
                hold_micro=hold_micro,
            )
        )
    session.flush()


_COUNTED = select(
    col(ReservationBudget.reservation_id),
    col(ReservationBudget.budget_id),
    col(ReservationBudget.period_start),
    col(ReservationBudget.hold_micro),
).where(col(ReservationBudget.reservation_id).in_(bindparam("p_ids", expanding=True)))


def settle(session: Session, reservation_id: str, charge_micro: int, now: datetime) -> None:
    """`settle_many` for one reservation (a release: `charge_micro` 0)."""
    settle_many(session, [(reservation_id, charge_micro)], now)


def settle_many(session: Session, charges: Sequence[tuple[str, int]], now: datetime) -> None:
    """Move finished reservations' holds off their budget periods and add what each
    was charged to their spend (0: a release), in the periods the holds were taken
    in: a stream that crosses midnight is charged to the day it was allowed on.
    Queues a ``budget.threshold`` event for each threshold the spend crossed.

    A settlement batch's reservations together (issue 14.2): one SELECT of their
    counted holds (none at all for a company without budgets), then one UPDATE per
    budget period, in budget id order, whatever the number of reservations."""
    charge_of = dict(charges)
    # Prebuilt, on the connection: every settlement runs it, most find nothing.
    counted = session.connection().execute(_COUNTED, {"p_ids": list(charge_of)}).all()
    if not counted:
        return
    # Per period: the holds to move and each reservation's charge in the batch's order.
    periods: dict[tuple[str, datetime], tuple[int, list[int]]] = {}
    order = {reservation_id: i for i, (reservation_id, _) in enumerate(charges)}
    for reservation_id, budget_id, start, hold_micro in sorted(
        counted, key=lambda row: (row[1], order[row[0]])
    ):
        held, spent = periods.get((budget_id, start), (0, []))
        periods[(budget_id, start)] = (held + hold_micro, [*spent, charge_of[reservation_id]])
    for (budget_id, start), (hold_micro, spent_each) in periods.items():
        charged = sum(spent_each)
        # A budget deleted since the hold has no rows left: nothing to move.
        result = session.execute(
            update(BudgetPeriod)
            .where(col(BudgetPeriod.budget_id) == budget_id)
            .where(col(BudgetPeriod.period_start) == start)
            .values(
                held_micro=col(BudgetPeriod.held_micro) - hold_micro,
                spent_micro=col(BudgetPeriod.spent_micro) + charged,
            )
        )
        if rowcount(result) == 0 or charged == 0:
            continue
        budget = session.get(Budget, budget_id)
        spent = session.scalar(
            select(col(BudgetPeriod.spent_micro))
            .where(col(BudgetPeriod.budget_id) == budget_id)
            .where(col(BudgetPeriod.period_start) == start)
        )
        if budget is None or spent is None:
            continue
        if not budget_math.due(budget.amount_micro, spent, ()):
            continue  # under 80 %: the common case reads no more
        if session.get(CompanyWebhook, budget.company_id) is None:
            continue  # nobody to tell: no event is queued
        sent = _sent(session, budget_id, start)
        # The thresholds each charge reached in turn, each event with the spend just
        # after it: the same events as settling the reservations one by one.
        after = spent - charged
        for charge in spent_each:
            after += charge
            for percent in budget_math.due(budget.amount_micro, after, sent):
                _queue_threshold(session, budget, start, percent, after, now)
                sent.add(percent)
    session.flush()


def _sent(session: Session, budget_id: str, start: datetime) -> set[int]:
    """The thresholds of this budget's period already queued (once per period, until
    an edit re-arms them: `rearm`). The company row is locked (settlement moved its
    money first), so read-then-insert cannot race; the unique key stays the
    database's guard."""
    return set(
        session.scalars(
            select(col(BudgetEvent.percent))
            .where(col(BudgetEvent.budget_id) == budget_id)
            .where(col(BudgetEvent.period_start) == start)
            .where(col(BudgetEvent.superseded_at).is_(None))
        )
    )


def rearm(session: Session, budget: Budget, *, new_period: bool, now: datetime) -> None:
    """After an edit of `budget` (its new amount and period already set, the company
    row locked): its current period's thresholds that the spend no longer reaches
    can be told again. Raised from 100 to 1,000 after its 80 % event, a budget tells
    80 % of 1,000 when the spend gets there; an edit the spend still reaches re-arms
    nothing (no second event for news already told).

    `new_period`: the period changed, and a new period counts from zero. Its start
    may be that of a period of the old one (daily to weekly on a Monday, monthly to
    daily on the 1st), whose counters row it would otherwise inherit with a part of
    the old spend and the old events: that row's spend is zeroed. Its held stays,
    the holds counted on it are still out and settle on it."""
    start = budget_math.period_start(budget.period, now)
    where = (col(BudgetPeriod.budget_id) == budget.id, col(BudgetPeriod.period_start) == start)
    if new_period:
        session.execute(update(BudgetPeriod).where(*where).values(spent_micro=0))
    spent = session.scalar(select(col(BudgetPeriod.spent_micro)).where(*where)) or 0
    reached = budget_math.due(budget.amount_micro, spent, ())
    unreached = [p for p in budget_math.THRESHOLDS if p not in reached]
    if not unreached:
        return
    session.execute(
        update(BudgetEvent)
        .where(col(BudgetEvent.budget_id) == budget.id)
        .where(col(BudgetEvent.period_start) == start)
        .where(col(BudgetEvent.percent).in_(unreached))
        .where(col(BudgetEvent.superseded_at).is_(None))
        .values(superseded_at=now)
    )


def _queue_threshold(
    session: Session, budget: Budget, start: datetime, percent: int, spent: int, now: datetime
) -> None:
    """One outbox row for this budget x period x threshold."""
    event_id = new_id()
    payload = {
        "id": event_id,
        "type": EVENT_TYPE,
        "timestamp": iso(now),
        "data": {
            "company_id": budget.company_id,
            "percent": percent,
            "budget": {
                **budget_public(budget),
                "period_start": iso(start),
                "resets_at": _resets_at(budget, start),
                "spent": format_credits(spent),
            },
        },
    }
    session.add(
        BudgetEvent(
            id=event_id,
            company_id=budget.company_id,
            budget_id=budget.id,
            period_start=start,
            percent=percent,
            payload=payload,
            attempts=0,
            created_at=now,
            next_attempt_at=now,
            delivered_at=None,
        )
    )


def budget_public(budget: Budget) -> dict[str, Any]:
    return {
        "id": budget.id,
        "scope": budget.scope,
        "target_id": budget.target_id,
        "amount": format_credits(budget.amount_micro),
        "period": budget.period,
    }


@dataclass(frozen=True, slots=True)
class Standing:
    budget: Budget
    spent_micro: int
    held_micro: int
    resets_at: str | None


def standing(session: Session, budget: Budget, now: datetime) -> Standing:
    """A budget's current period: spent, held, when it resets."""
    [one] = standings(session, [budget], now)
    return one


def standings(session: Session, budgets: Sequence[Budget], now: datetime) -> list[Standing]:
    """Each budget's current period, in one SELECT whatever their number (a company's
    listing holds up to `budget_admin.BUDGETS_PER_COMPANY_MAX`: one read each held a
    database thread for seconds, review 5). At `now` there are at most as many period
    starts as periods, so the rows are narrowed by those, then matched exactly."""
    starts = {b.id: budget_math.period_start(b.period, now) for b in budgets}
    if not budgets:
        return []
    rows = session.scalars(
        select(BudgetPeriod)
        .where(col(BudgetPeriod.budget_id).in_(list(starts)))
        .where(col(BudgetPeriod.period_start).in_(sorted(set(starts.values()))))
    )
    found = {(r.budget_id, r.period_start): (r.spent_micro, r.held_micro) for r in rows}
    return [
        Standing(b, *found.get((b.id, starts[b.id]), (0, 0)), _resets_at(b, starts[b.id]))
        for b in budgets
    ]


def standing_public(s: Standing) -> dict[str, Any]:
    return {
        **budget_public(s.budget),
        "spent": format_credits(s.spent_micro),
        "held": format_credits(s.held_micro),
        "available": format_credits(
            budget_math.available(s.budget.amount_micro, s.spent_micro, s.held_micro)
        ),
        "resets_at": s.resets_at,
    }


def prune_events(session: Session, now: datetime, limit: int, give_up_after: timedelta) -> int:
    """Delete up to `limit` threshold events created more than `EVENT_RETENTION`
    before `now`; how many went. Kept: those still to deliver (created less than
    `give_up_after` ago: `company_webhooks.GIVE_UP_AFTER`), and those of a living
    budget's period ``none``, which never ends: they stop its thresholds being told
    twice."""
    cutoff = now - EVENT_RETENTION
    living = select(col(Budget.id))
    done = or_(
        col(BudgetEvent.delivered_at).is_not(None),
        col(BudgetEvent.created_at) < now - give_up_after,
    )
    ended = or_(
        col(BudgetEvent.period_start) != budget_math.NO_PERIOD_START,
        col(BudgetEvent.budget_id).not_in(living),
    )
    ids = list(
        session.scalars(
            select(col(BudgetEvent.id))
            .where(col(BudgetEvent.created_at) < cutoff)
            .where(done)
            .where(ended)
            .limit(limit)
        )
    )
    if ids:
        session.execute(delete(BudgetEvent).where(col(BudgetEvent.id).in_(ids)))
    return len(ids)


def prune_periods(session: Session, now: datetime, limit: int) -> int:
    """Delete up to `limit` counters rows of periods that ended more than
    `PERIOD_RETENTION` before `now`; how many went. A row's period length is not
    stored and an edit may have changed the budget's, so a period counts as ended
    once the longest one would have (`budget_math.LONGEST_PERIOD`): no current
    period is that old, and no hold can be counted on such a row any more (a hold
    counts on its budget's current period).

    Kept: the endless period ``none`` (one row a budget, deleted with it), and any
    row a hold still out is counted on, or its settlement, however late, would
    find no row to move its hold off and add its charge to. ``held_micro`` is the
    sum of those holds (`check`); the active reservations are asked as well, so
    that a zero hold, or books `check` would flag, keep the row too. The DELETE
    repeats the conditions: PostgreSQL rechecks ``held_micro`` on a row a
    settlement changed meanwhile."""
    cutoff = now - budget_math.LONGEST_PERIOD - PERIOD_RETENTION
    out = (
        select(col(ReservationBudget.reservation_id))
        .join(Reservation, col(Reservation.id) == col(ReservationBudget.reservation_id))
        .where(col(ReservationBudget.budget_id) == col(BudgetPeriod.budget_id))
        .where(col(ReservationBudget.period_start) == col(BudgetPeriod.period_start))
        .where(col(Reservation.status) == "active")
    )
    prunable = (
        col(BudgetPeriod.period_start) > budget_math.NO_PERIOD_START,
        col(BudgetPeriod.period_start) < cutoff,
        col(BudgetPeriod.held_micro) == 0,
        ~out.exists(),
    )
    keys = session.execute(
        select(col(BudgetPeriod.budget_id), col(BudgetPeriod.period_start))
        .where(*prunable)
        .limit(limit)
    ).all()
    if not keys:
        return 0
    result = session.execute(
        delete(BudgetPeriod)
        .where(tuple_(col(BudgetPeriod.budget_id), col(BudgetPeriod.period_start)).in_(keys))
        .where(*prunable)
    )
    return rowcount(result)


def delete_budget(session: Session, budget_id: str) -> None:
    """A budget and its counters; holds counted on it settle as if it never was."""
    session.execute(delete(BudgetPeriod).where(col(BudgetPeriod.budget_id) == budget_id))
    session.execute(delete(Budget).where(col(Budget.id) == budget_id))


def check(session: Session, company_id: str) -> list[str]:
    """The budgets' books (like `books.check_books` for the balance): each period's
    ``held`` is the sum of the active holds counted on it, and never negative."""
    problems: list[str] = []
    stmt = (
        select(BudgetPeriod)
        .join(Budget, col(Budget.id) == col(BudgetPeriod.budget_id))
        .where(col(Budget.company_id) == company_id)
    )
    for period in session.scalars(stmt):
        active = session.scalars(
            select(col(ReservationBudget.hold_micro))
            .join(Reservation, col(Reservation.id) == col(ReservationBudget.reservation_id))
            .where(col(ReservationBudget.budget_id) == period.budget_id)
            .where(col(ReservationBudget.period_start) == period.period_start)
            .where(col(Reservation.status) == "active")
        ).all()
        if period.held_micro != sum(active) or period.held_micro < 0:
            problems.append(
                f"budget {period.budget_id} at {iso(period.period_start)}: held "
                f"{period.held_micro}, active holds {sum(active)}"
            )
    return problems
