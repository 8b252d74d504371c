"""Budget period counters are kept a bounded time (DESIGN §11 budgets): a daily
budget wrote 365 ``budget_periods`` rows a year, forever. The sweeper prunes the
rows of periods long ended, in bounded batches, and never one that a hold still
out is counted on (its settlement moves that row), nor a budget's endless period
``none``, nor a current period. Migrations 0015 and 0016 go down and up again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import budget_math, budgets, init_writes, settlement, webhook_settlement
from control_plane.books import check_books
from control_plane.db import Database
from control_plane.migrate import alembic_config, current
from control_plane.sweeper import sweep_budget_periods
from control_plane.tables import (
    Budget,
    BudgetEvent,
    BudgetPeriod,
    ReservationBudget,
    new_id,
    utcnow,
)
from tests.ledger_db import migrated_sessions
from tests.lone_webhooks import usage_delivery
from tests.test_budget_thresholds_batch import INPUT_TOKENS, Budgeted
from tests.test_init_writes import Tenant

# The newest period start that may be pruned at `now`: the longest period ended
# the retention before.
AGE = budget_math.LONGEST_PERIOD + budgets.PERIOD_RETENTION


@pytest.fixture
def budgeted(migrated_pg_url: str) -> Iterator[Budgeted]:
    with migrated_sessions(migrated_pg_url) as sessions:
        yield Budgeted(Tenant(sessions))


def _hold_at(b: Budgeted, micro: int, when: datetime) -> init_writes.NewReservation:
    """A hold counted on the budget's period at `when` (a stream still out from
    then: its edge died and the store was down, so nothing has reconciled it)."""
    r = b.tenant.reservation(micro)

    def write(s: Session) -> None:
        assert init_writes.hold(s, r)
        budgets.hold(
            s, reservation_id=r.id, company_id=r.company_id, user_id=r.user_id,
            api_key_id=None, hold_micro=micro, now=when,
        )  # fmt: skip

    b.tenant.tx(write)
    return r


def _settle(b: Budgeted, r: init_writes.NewReservation, charge: int) -> None:
    output = (charge - INPUT_TOKENS) // 2  # price: 1 per Mtok in, 2 per Mtok out
    delivery = usage_delivery(r, None)
    event = replace(delivery.event, input_tokens=INPUT_TOKENS, output_tokens=output)
    [outcome] = b.tenant.tx(
        lambda s: webhook_settlement.settle_webhooks(s, [replace(delivery, event=event)])
    )
    assert isinstance(outcome, settlement.Outcome)
    assert outcome.charged_micro == charge


def _rows(b: Budgeted, budget_ids: list[str]) -> dict[tuple[str, datetime], tuple[int, int]]:
    query = select(BudgetPeriod).where(col(BudgetPeriod.budget_id).in_(budget_ids))
    return b.tenant.tx(
        lambda s: {
            (p.budget_id, p.period_start): (p.spent_micro, p.held_micro) for p in s.scalars(query)
        }
    )


def test_ended_periods_are_pruned_in_bounded_batches_and_held_ones_kept(
    budgeted: Budgeted, migrated_pg_url: str
) -> None:
    b = budgeted
    company_id = b.tenant.company_id
    now = utcnow()
    endless = new_id()
    current = budget_math.period_start("month", now)
    # A month long ended whose stream is still out: its hold is on that month's row.
    out_at = now - timedelta(days=200)
    out = _hold_at(b, 1_000, out_at)
    held_start = budget_math.period_start("month", out_at)
    # A row with no held money yet an active reservation counted on it (a zero hold).
    zero = b.tenant.reservation(500)
    zero_start = now - AGE - timedelta(days=30)
    pruned = [now - AGE - timedelta(days=1), now - AGE - timedelta(days=90), now - AGE * 3]
    recent = now - AGE + timedelta(days=1)  # ended, but not long enough ago

    def setup(s: Session) -> None:
        s.add(
            Budget(
                id=endless, company_id=company_id, scope="api_key", target_id="key",
                amount_micro=5_000, period="none", created_at=now, updated_at=now,
            )
        )  # fmt: skip
        s.flush()
        none = budget_math.NO_PERIOD_START
        s.add(BudgetPeriod(budget_id=endless, period_start=none, spent_micro=900, held_micro=0))
        for start in [*pruned, recent, current]:
            s.add(
                BudgetPeriod(budget_id=b.budget_id, period_start=start, spent_micro=7, held_micro=0)
            )
        assert init_writes.hold(s, zero)
        s.add(
            BudgetPeriod(
                budget_id=b.budget_id, period_start=zero_start, spent_micro=0, held_micro=0
            )
        )
        s.add(
            ReservationBudget(
                reservation_id=zero.id, budget_id=b.budget_id, period_start=zero_start,
                hold_micro=0,
            )
        )  # fmt: skip

    b.tenant.tx(setup)
    before = _rows(b, [b.budget_id, endless])
    prune = budgets.prune_periods
    assert b.tenant.tx(lambda s: prune(s, now, 2)) == 2  # bounded
    assert b.tenant.tx(lambda s: prune(s, now, 2)) == 1
    assert b.tenant.tx(lambda s: prune(s, now, 2)) == 0
    after = _rows(b, [b.budget_id, endless])
    assert set(before) - set(after) == {(b.budget_id, start) for start in pruned}
    assert after[(b.budget_id, held_start)] == (0, 1_000)  # kept: its hold is out
    assert after[(endless, budget_math.NO_PERIOD_START)] == (900, 0)  # never ends

    # The hold still out settles on its row: the spend lands in its month, nothing
    # is held any more, and the books of both the balance and the budgets hold.
    _settle(b, out, 600)
    assert _rows(b, [b.budget_id])[(b.budget_id, held_start)] == (600, 0)
    assert b.tenant.tx(lambda s: check_books(s, company_id)) == []
    # The zero hold's row is kept while its reservation is out (`check` matches it).
    assert b.tenant.tx(lambda s: budgets.check(s, company_id)) == []

    # Settled, that month is done with: the sweeper's pass prunes it.
    db = Database(migrated_pg_url, pool_size=1)
    try:
        assert asyncio.run(sweep_budget_periods(db, now=now)) == 1
        assert asyncio.run(sweep_budget_periods(db, now=now)) == 0
    finally:
        db.close()
    left = set(_rows(b, [b.budget_id, endless]))
    assert (b.budget_id, held_start) not in left
    assert left == {
        (b.budget_id, zero_start),
        (b.budget_id, recent),
        (b.budget_id, current),
        (endless, budget_math.NO_PERIOD_START),
    }


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migrations_0015_and_0016_go_down_and_up_again(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Down to 0014 with a superseded threshold event beside its live successor
    (0014's unique key admits one of them: the superseded one goes), then up."""
    url = (
        f"sqlite:///{tmp_path}/old.db"
        if backend == "sqlite"
        else request.getfixturevalue("migrated_pg_url")
    )
    with migrated_sessions(url) as sessions:
        tenant = Tenant(sessions)
        now = utcnow()
        start = budget_math.period_start("month", now)
        budget_id = new_id()
        live, superseded = new_id(), new_id()

        def events(s: Session) -> None:
            for event_id, gone in ((superseded, now), (live, None)):
                s.add(
                    BudgetEvent(
                        id=event_id, company_id=tenant.company_id, budget_id=budget_id,
                        period_start=start, percent=80, payload={}, attempts=0,
                        created_at=now, next_attempt_at=now, delivered_at=None,
                        superseded_at=gone,
                    )
                )  # fmt: skip

        tenant.tx(events)
    command.downgrade(alembic_config(url), "0014")
    assert current(url) == "0014"
    with migrated_sessions(url) as sessions:
        tenant.sessions = sessions
        query = select(col(BudgetEvent.id)).where(col(BudgetEvent.budget_id) == budget_id)
        assert tenant.tx(lambda s: list(s.scalars(query))) == [live]
        assert tenant.tx(lambda s: budgets.prune_periods(s, now, 10)) == 0
