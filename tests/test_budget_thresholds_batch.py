"""`budget.threshold` events when one settlement batch settles several reservations
of one budget (issue 14.2 with 16.3), on PostgreSQL: `budgets.settle_many` moves
the batch's charges together, one UPDATE per budget period, yet queues each
threshold the charges cross exactly once, carrying the spend just after the charge
that crossed it; a batch that crosses nothing queues nothing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import budgets, init_writes, settlement, webhook_settlement
from control_plane.books import check_books
from control_plane.ledger import charge_for, reservation_price
from control_plane.tables import Budget, BudgetEvent, BudgetPeriod, CompanyWebhook, new_id, utcnow
from shared.pricing import format_credits
from tests.ledger_db import migrated_sessions
from tests.lone_webhooks import usage_delivery
from tests.test_init_writes import Tenant

AMOUNT = 5_000  # the budget: 80 % is 4,000, 100 % is 5,000
INPUT_TOKENS = 200


class Budgeted:
    """A tenant whose user has a monthly budget of `AMOUNT` and whose company has a
    webhook URL (without one, no event is queued)."""

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self.budget_id = new_id()

        def setup(s: Session) -> None:
            now = utcnow()
            s.add(
                Budget(
                    id=self.budget_id, company_id=tenant.company_id, scope="user",
                    target_id=tenant.user_id, amount_micro=AMOUNT, period="month",
                    created_at=now, updated_at=now,
                )
            )  # fmt: skip
            s.add(
                CompanyWebhook(
                    company_id=tenant.company_id, url="https://hooks.example.com/budgets",
                    secret_encrypted="unused here", created_at=now, updated_at=now,
                )
            )  # fmt: skip

        tenant.tx(setup)

    def hold(self, micro: int) -> init_writes.NewReservation:
        """A reservation of `micro`, counted on the budget, as init writes it."""
        r = self.tenant.reservation(micro)

        def write(s: Session) -> None:
            assert init_writes.hold(s, r)
            budgets.hold(
                s, reservation_id=r.id, company_id=r.company_id, user_id=r.user_id,
                api_key_id=None, hold_micro=micro, now=r.created_at,
            )  # fmt: skip

        self.tenant.tx(write)
        return r

    def settle_batch(self, charges: list[int]) -> None:
        """Hold each charge, then settle them all in ONE batch (`settle_webhooks`, as
        the batcher's one transaction), charged exactly what they held, in order."""
        deliveries = []
        for charge in charges:
            r = self.hold(charge)
            # price: 1 per Mtok in, 2 per Mtok out (tests.test_init_writes)
            output = (charge - INPUT_TOKENS) // 2
            price = reservation_price(r)
            assert charge_for("completed", INPUT_TOKENS, output, price, charge) == charge
            delivery = usage_delivery(r, None)
            event = replace(delivery.event, input_tokens=INPUT_TOKENS, output_tokens=output)
            deliveries.append(replace(delivery, event=event))
        outcomes = self.tenant.tx(lambda s: webhook_settlement.settle_webhooks(s, deliveries))
        assert [o.charged_micro for o in outcomes if isinstance(o, settlement.Outcome)] == charges

    def events(self) -> list[dict[str, Any]]:
        query = select(BudgetEvent).where(col(BudgetEvent.budget_id) == self.budget_id)
        return self.tenant.tx(lambda s: [e.payload for e in s.scalars(query)])

    def period(self) -> tuple[int, int]:
        query = select(BudgetPeriod).where(col(BudgetPeriod.budget_id) == self.budget_id)
        [row] = self.tenant.tx(lambda s: [(p.spent_micro, p.held_micro) for p in s.scalars(query)])
        return row


@pytest.fixture
def budgeted(migrated_pg_url: str) -> Iterator[Budgeted]:
    with migrated_sessions(migrated_pg_url) as sessions:
        yield Budgeted(Tenant(sessions))


def test_a_batch_crossing_a_threshold_together_queues_it_once(budgeted: Budgeted) -> None:
    budgeted.settle_batch([1_000, 1_000])  # 0 → 2,000 (40 %): crosses nothing
    assert budgeted.events() == []
    assert budgeted.period() == (2_000, 0)

    # 2,000 → 3,200 → 4,000 (80 %, by the second) → 4,400: no charge crosses alone.
    budgeted.settle_batch([1_200, 800, 400])
    [event] = budgeted.events()
    assert event["type"] == budgets.EVENT_TYPE
    data = event["data"]
    assert (data["company_id"], data["percent"]) == (budgeted.tenant.company_id, 80)
    assert data["budget"]["id"] == budgeted.budget_id
    assert data["budget"]["amount"] == format_credits(AMOUNT)
    assert data["budget"]["spent"] == format_credits(4_000)  # after the crossing charge
    assert budgeted.period() == (4_400, 0)

    budgeted.settle_batch([250, 250])  # 4,400 → 4,900 (98 %): nothing new, 80 % not again
    assert [e["data"]["percent"] for e in budgeted.events()] == [80]
    assert budgeted.period() == (4_900, 0)
    company_id = budgeted.tenant.company_id
    assert budgeted.tenant.tx(lambda s: budgets.check(s, company_id)) == []
    assert budgeted.tenant.tx(lambda s: check_books(s, company_id)) == []
