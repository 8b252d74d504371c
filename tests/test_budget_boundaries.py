"""Budgets at the edges of their periods, through a real control plane on PostgreSQL
+ Redis (DESIGN §11 budgets): its host clock is fixed at a chosen instant (the
`create_app(wall_clock=…)` seam a replica's skew uses), so a hold lands on the day
of the month, or the minute, a test needs, whatever today is. Settlements are the
signed usage webhooks an edge posts."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlmodel import col

from control_plane import budget_math, budgets
from control_plane.app import create_app
from control_plane.tables import BudgetEvent, BudgetPeriod, Reservation, iso
from shared.pricing import cost_micro, estimate_input_tokens, format_credits
from tests.test_control_plane import (
    CP,
    assert_books_balance,
    credits_of,
    data_of,
    error_of,
    micro,
    pg_settings,
    serve_cp,
    usage_event,
)

MESSAGES = [{"role": "user", "content": "hi"}]
MAX_TOKENS = 16
INPUT = estimate_input_tokens(MESSAGES)
# A 31st followed by a shorter month, in a year to come: the hold's deadline
# (its token's expiry plus the grace) is then never past, so no sweep settles it.
LAST_OF_JANUARY = datetime(datetime.now(UTC).year + 2, 1, 31, 12, tzinfo=UTC)
FEBRUARY = LAST_OF_JANUARY.replace(month=2, day=1, hour=0)


def D(year: int, month: int, day: int) -> datetime:
    return datetime(year, month, day, tzinfo=UTC)


class Wall:
    """The control plane's host clock, set by each test."""

    def __init__(self) -> None:
        self.at = LAST_OF_JANUARY

    def time(self) -> float:
        return self.at.timestamp()


WALL = Wall()


@pytest.fixture(scope="module")
def cp(pg_server: str) -> Iterator[CP]:
    env = {"LLMGW_COMPANY_WEBHOOKS_ALLOW_PRIVATE": "1"}
    with pg_settings(pg_server, env) as settings:
        app = create_app(settings, wall_clock=WALL.time)
        with serve_cp(settings, app) as handle:
            yield handle


def _hold(cp: CP) -> int:
    price = cp.settings.catalog.models[cp.settings.catalog.default_model].price
    return cost_micro(INPUT, MAX_TOKENS, price)


def _init(client: httpx.Client) -> dict[str, Any]:
    body = {"messages": MESSAGES, "max_tokens": MAX_TOKENS}
    return dict(data_of(client.post("/v1/chat/init", json=body), 201))


def _status(cp: CP, reservation_id: str) -> str:
    db = cp.app.state.db

    def read(session: Any) -> str:
        return str(
            session.scalar(
                select(col(Reservation.status)).where(col(Reservation.id) == reservation_id)
            )
        )

    return str(cp.on_loop(lambda: db.transaction(read)))


def test_a_daily_budget_made_monthly_still_settles_the_holds_of_a_31st(cp: CP) -> None:
    """A member's hold is counted on its daily budget's 31 January; the owner then
    makes the budget monthly (its period's rows stay, and the hold settles on the
    day it was taken). The charge reaches the budget's thresholds, so settlement
    queues a ``budget.threshold`` event naming when that period resets, which took
    the budget's new period from the hold's start: 31 January plus a month, no such
    day. Before, every such settlement raised (ValueError, 500 ``internal_error``),
    again on each redelivery and on each sweep settling from a checkpoint; with no
    checkpoint the sweeper released the hold at its deadline (measured: 3 webhooks
    500, the reservation active with its 0.000038 credits held, then released:
    the stream served and never billed)."""
    WALL.at = LAST_OF_JANUARY
    company_id = cp.company("10")
    owner = cp.client(cp.api_key(cp.user(company_id, "owner", password=None)["id"]))
    member = cp.user(company_id, "member", password=None)
    client = cp.client(cp.api_key(member["id"]))
    hook = f"/v1/admin/companies/{company_id}/webhook"
    data_of(owner.put(hook, json={"url": "http://127.0.0.1:9/budget-events"}), 201)
    hold = _hold(cp)
    body = {"scope": "user", "target_id": member["id"], "amount": format_credits(hold)}
    budget = data_of(
        owner.post(f"/v1/admin/companies/{company_id}/budgets", json={**body, "period": "day"}),
        201,
    )
    init = _init(client)
    path = f"/v1/admin/companies/{company_id}/budgets/{budget['id']}"
    data_of(owner.patch(path, json={"period": "month"}))
    settled = cp.webhook(
        usage_event(init, company_id, input_tokens=INPUT, output_tokens=MAX_TOKENS)
    )
    assert settled.status_code == 200, settled.text
    assert data_of(settled)["settled"] is True
    assert _status(cp, init["reservation_id"]) != "active"
    credits = credits_of(client)
    assert micro(credits["held"]) == 0
    assert micro(credits["balance"]) < micro("10")
    assert_books_balance(cp, company_id, owner)
    db = cp.app.state.db
    assert cp.on_loop(lambda: db.transaction(lambda s: budgets.check(s, company_id))) == []
    # Its thresholds were told, for the day the hold was counted on, which the
    # monthly budget would have ended on 1 February.
    events = cp.on_loop(lambda: db.transaction(lambda s: _events(s, budget["id"])))
    assert [
        (e["percent"], e["budget"]["period_start"], e["budget"]["resets_at"]) for e in events
    ] == [(percent, iso(LAST_OF_JANUARY.replace(hour=0)), iso(FEBRUARY)) for percent in (80, 100)]


def test_holds_just_before_midnight_fill_their_day_and_never_the_next(cp: CP) -> None:
    """A member takes all its daily budget at 23:59:59 on the last day of February and
    all of it again at 00:00:01 on 1 March; its team's monthly budget rolls over at
    the same instant. The streams settle after midnight, one failed before its first
    token (nothing billed: its hold released): each charge and release lands on the
    period its hold was counted in, never on the new day, so neither day nor month
    holds or spends more than its amount, and the new day is full for good."""
    hold = _hold(cp)
    year = LAST_OF_JANUARY.year
    evening = datetime(year, 3, 1, tzinfo=UTC) - timedelta(seconds=1)
    morning = evening + timedelta(seconds=2)
    company_id = cp.company("10")
    owner = cp.client(cp.api_key(cp.user(company_id, "owner", password=None)["id"]))
    member = cp.user(company_id, "member", password=None)
    client = cp.client(cp.api_key(member["id"]))
    admin = f"/v1/admin/companies/{company_id}"
    team = data_of(
        owner.post(f"{admin}/teams", json={"name": "t", "user_ids": [member["id"]]}), 201
    )
    daily = {"scope": "user", "target_id": member["id"], "amount": format_credits(2 * hold)}
    monthly = {"scope": "team", "target_id": team["id"], "amount": format_credits(10 * hold)}
    day = data_of(owner.post(f"{admin}/budgets", json={**daily, "period": "day"}), 201)["id"]
    month = data_of(owner.post(f"{admin}/budgets", json={**monthly, "period": "month"}), 201)["id"]
    body = {"messages": MESSAGES, "max_tokens": MAX_TOKENS}
    taken: dict[datetime, list[dict[str, Any]]] = {}
    for instant in (evening, morning):
        WALL.at = instant
        answers = [client.post("/v1/chat/init", json=body) for _ in range(3)]
        assert [r.status_code for r in answers] == [201, 201, 402]
        assert answers[2].json()["error"]["details"]["budget_id"] == day
        taken[instant] = [data_of(r, 201) for r in answers[:2]]
    failed = {"status": "failed", "finish_reason": "error", "output_tokens": 0}
    reports = [
        usage_event(taken[evening][0], company_id, input_tokens=INPUT, output_tokens=MAX_TOKENS),
        usage_event(taken[evening][1], company_id, input_tokens=INPUT, **failed),
        *(
            usage_event(init, company_id, input_tokens=INPUT, output_tokens=MAX_TOKENS)
            for init in taken[morning]
        ),
    ]
    for report in reports:
        assert data_of(cp.webhook(report))["settled"] is True
    db = cp.app.state.db
    rows = cp.on_loop(lambda: db.transaction(lambda s: _periods(s, [day, month])))
    assert rows == {
        (day, budget_math.period_start("day", evening)): (hold, 0),  # the 28th or 29th
        (day, datetime(year, 3, 1, tzinfo=UTC)): (2 * hold, 0),
        (month, datetime(year, 2, 1, tzinfo=UTC)): (hold, 0),
        (month, datetime(year, 3, 1, tzinfo=UTC)): (2 * hold, 0),
    }
    # The day the holds were released on has room, but it is over: the new one is full.
    error_of(client.post("/v1/chat/init", json=body), 402, "budget_exceeded")
    assert cp.on_loop(lambda: db.transaction(lambda s: budgets.check(s, company_id))) == []
    assert_books_balance(cp, company_id, owner)


def _periods(session: Any, budget_ids: list[str]) -> dict[tuple[str, datetime], tuple[int, int]]:
    stmt = select(BudgetPeriod).where(col(BudgetPeriod.budget_id).in_(budget_ids))
    return {
        (p.budget_id, p.period_start): (p.spent_micro, p.held_micro) for p in session.scalars(stmt)
    }


def _events(session: Any, budget_id: str) -> list[dict[str, Any]]:
    stmt = (
        select(BudgetEvent)
        .where(col(BudgetEvent.budget_id) == budget_id)
        .order_by(col(BudgetEvent.percent))
    )
    return [dict(e.payload["data"]) for e in session.scalars(stmt)]


@pytest.mark.parametrize(
    ("period", "start", "resets"),
    [
        # A row of the budget's own period: its end, as before.
        ("month", D(2027, 2, 1), D(2027, 3, 1)),
        ("month", D(2027, 12, 1), D(2028, 1, 1)),
        ("week", D(2027, 3, 1), D(2027, 3, 8)),
        # A row an edit of the period left (a daily 31st, a Wednesday): the end of the
        # new period that contains it, never a day the month lacks.
        ("month", D(2027, 1, 31), D(2027, 2, 1)),
        ("month", D(2028, 1, 30), D(2028, 2, 1)),
        ("month", D(2027, 12, 31), D(2028, 1, 1)),
        ("week", D(2027, 3, 3), D(2027, 3, 8)),
        ("day", D(2027, 3, 1), D(2027, 3, 2)),
        ("none", D(2027, 3, 3), None),
    ],
)
def test_a_period_ends_whatever_row_it_is_asked_of(
    period: str, start: datetime, resets: datetime | None
) -> None:
    assert budget_math.resets_at(period, start) == resets
