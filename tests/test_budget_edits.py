"""A budget edited mid-period, on PostgreSQL (DESIGN §11 budgets): raising its
amount re-arms the thresholds the spend no longer reaches, and a new period counts
from zero even when it starts at the same instant as a period of the old one
(daily to weekly on a Monday), thresholds included; a budget created while holds
are out counts none of them; old threshold events are pruned, bounded, and never
those that still stop a threshold being told twice."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import budget_admin, budget_math, budgets, init_writes
from control_plane.books import check_books
from control_plane.budget_math import BudgetInput
from control_plane.company_webhooks import GIVE_UP_AFTER
from control_plane.db import Database
from control_plane.policy import Principal
from control_plane.sweeper import sweep_budget_events
from control_plane.tables import Budget, BudgetEvent, BudgetPeriod, new_id, utcnow
from tests.ledger_db import migrated_sessions
from tests.test_budget_thresholds_batch import Budgeted
from tests.test_init_writes import Tenant

ADMIN = Principal(
    user_id=None, company_id=None, role="admin", scopes=frozenset({"llm:admin"}), via="admin_token"
)


@pytest.fixture
def budgeted(migrated_pg_url: str) -> Iterator[Budgeted]:
    with migrated_sessions(migrated_pg_url) as sessions:
        yield Budgeted(Tenant(sessions))


def _edit(b: Budgeted, now: datetime, **fields: object) -> dict[str, object]:
    body = BudgetInput(
        amount_micro=fields.get("amount_micro"),  # type: ignore[arg-type]
        period=fields.get("period"),  # type: ignore[arg-type]
    )
    company_id = b.tenant.company_id
    return b.tenant.tx(
        lambda s: budget_admin.update_budget(s, ADMIN, company_id, b.budget_id, body, now)
    )


def _percents(b: Budgeted) -> list[tuple[int, str]]:
    return [(e["data"]["percent"], e["data"]["budget"]["amount"]) for e in b.events()]


def test_raising_a_budget_re_arms_the_thresholds_its_spend_no_longer_reaches(
    budgeted: Budgeted,
) -> None:
    budgeted.settle_batch([4_000])  # 80 % of 5,000
    assert [p for p, _ in _percents(budgeted)] == [80]
    # Raised to 5,500: 4,000 is 72 %, so 80 % (4,400) can be told again.
    _edit(budgeted, utcnow(), amount_micro=5_500)
    budgeted.settle_batch([400])
    assert _percents(budgeted) == [(80, "0.005000"), (80, "0.005500")]
    # An edit the spend still reaches re-arms nothing: lowered to 5,400 (81 %).
    _edit(budgeted, utcnow(), amount_micro=5_400)
    budgeted.settle_batch([300])
    assert [p for p, _ in _percents(budgeted)] == [80, 80]
    company_id = budgeted.tenant.company_id
    assert budgeted.tenant.tx(lambda s: budgets.check(s, company_id)) == []
    assert budgeted.tenant.tx(lambda s: check_books(s, company_id)) == []


def test_a_new_period_starting_with_an_old_ones_counts_from_zero(budgeted: Budgeted) -> None:
    """Daily, with Monday's spend at 80 % told; changed to weekly later that week:
    the week starts on that Monday too, yet counts from zero and tells its own 80 %."""
    now = utcnow()
    monday = budget_math.period_start("week", now)
    b = budgeted

    def monday_spend(s: Session) -> None:
        budget = s.get(Budget, b.budget_id)
        assert budget is not None
        budget.period = "day"
        s.add(
            BudgetPeriod(
                budget_id=b.budget_id, period_start=monday, spent_micro=4_500, held_micro=0
            )
        )
        s.flush()
        told = {"data": {"percent": 80, "budget": {"amount": "0.005000"}}}
        s.add(
            BudgetEvent(
                id=new_id(), company_id=b.tenant.company_id, budget_id=b.budget_id,
                period_start=monday, percent=80, payload=told, attempts=0,
                created_at=monday, next_attempt_at=monday, delivered_at=monday,
            )
        )  # fmt: skip

    b.tenant.tx(monday_spend)
    shown = _edit(b, now, period="week")
    assert shown["spent"] == "0.000000"
    assert shown["resets_at"] == budgets.iso(monday + timedelta(days=7))
    b.settle_batch([4_000])  # 80 % of the week's 5,000
    assert [p for p, _ in _percents(b)] == [80, 80]
    [row] = b.tenant.tx(
        lambda s: [
            (p.spent_micro, p.held_micro)
            for p in s.scalars(
                select(BudgetPeriod).where(col(BudgetPeriod.budget_id) == b.budget_id)
            )
        ]
    )
    assert row == (4_000, 0)


def test_holds_taken_before_a_budget_existed_are_not_counted_on_it(budgeted: Budgeted) -> None:
    """A budget counts what is held and spent from its creation on (as a deleted one
    lets its holds settle as if it never was): a hold that pre-dates it settles
    without touching its counters, and no counter goes negative."""
    tenant = budgeted.tenant
    company_id = tenant.company_id
    tenant.tx(lambda s: s.delete(s.get(Budget, budgeted.budget_id)))
    early = tenant.reservation(3_000)
    tenant.tx(lambda s: init_writes.hold(s, early))
    created = tenant.tx(
        lambda s: budget_admin.create_budget(
            s, ADMIN, company_id,
            BudgetInput("user", tenant.user_id, 5_000, "month"), utcnow(),
        )
    )  # fmt: skip
    assert created["held"] == "0.000000"
    budgeted.budget_id = str(created["id"])
    budgeted.hold(2_000)
    # The early hold finishing changes nothing on the budget.
    tenant.tx(lambda s: budgets.settle(s, early.id, 3_000, utcnow()))
    assert budgeted.period() == (0, 2_000)
    assert tenant.tx(lambda s: budgets.check(s, company_id)) == []


def test_old_threshold_events_are_pruned_in_bounded_batches(
    budgeted: Budgeted, migrated_pg_url: str
) -> None:
    """Kept: an event still to deliver (were events retried longer than they are
    kept), a recent one, and one of a living budget's
    period ``none`` (it never ends: pruning it would tell its threshold twice).
    Pruned: old events delivered, given up (undelivered `GIVE_UP_AFTER` after their
    creation, whatever their attempts), or of a deleted budget, a batch at most
    `limit` a transaction."""
    b = budgeted
    now = utcnow()
    old = now - budgets.EVENT_RETENTION - timedelta(days=1)
    recent = now - timedelta(days=1)
    month = budget_math.period_start("month", old)
    none = budget_math.NO_PERIOD_START
    gone = new_id()
    # (budget, period start, percent, created, delivered, attempts, pruned)
    rows = [
        (b.budget_id, month, 80, old, True, 1, True),
        (b.budget_id, month, 100, old, False, 20, True),  # given up
        (b.budget_id, month - timedelta(days=31), 80, old, False, 3, True),  # given up too
        (b.budget_id, budget_math.period_start("month", now), 80, recent, True, 1, False),
        (b.budget_id, none, 80, old, True, 1, False),  # the budget's endless period
        (gone, none, 80, old, True, 1, True),
    ]
    ids = [new_id() for _ in rows]

    def insert(s: Session) -> None:
        for event_id, (budget_id, start, percent, created, delivered, attempts, _) in zip(
            ids, rows, strict=True
        ):
            s.add(
                BudgetEvent(
                    id=event_id, company_id=b.tenant.company_id, budget_id=budget_id,
                    period_start=start, percent=percent, payload={}, attempts=attempts,
                    created_at=created, next_attempt_at=created,
                    delivered_at=created if delivered else None,
                )
            )  # fmt: skip

    b.tenant.tx(insert)
    prune = budgets.prune_events
    # Retried for longer than the retention, the undelivered ones would be kept.
    longer = budgets.EVENT_RETENTION + timedelta(days=2)
    assert b.tenant.tx(lambda s: prune(s, now, 9, longer)) == 2
    assert GIVE_UP_AFTER < budgets.EVENT_RETENTION
    assert b.tenant.tx(lambda s: prune(s, now, 1, GIVE_UP_AFTER)) == 1  # bounded
    assert b.tenant.tx(lambda s: prune(s, now, 1, GIVE_UP_AFTER)) == 1
    assert b.tenant.tx(lambda s: prune(s, now, 1, GIVE_UP_AFTER)) == 0
    query = select(col(BudgetEvent.id)).where(col(BudgetEvent.id).in_(ids))
    left = set(b.tenant.tx(lambda s: list(s.scalars(query))))
    assert left == {i for i, row in zip(ids, rows, strict=True) if not row[-1]}

    # The sweeper's pass runs the same pruning (nothing left to prune here).
    db = Database(migrated_pg_url, pool_size=1)
    try:
        assert asyncio.run(sweep_budget_events(db, now=now)) == 0
    finally:
        db.close()
