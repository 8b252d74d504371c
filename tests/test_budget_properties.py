"""Property tests of budgets (DESIGN §11), on top of the credits machine.

`BudgetsMachine` extends `test_credits_properties.CreditsMachine` (its grants, holds,
lone and concurrent webhooks, expiry and sweeps, and its ledger invariants) with
budgets, driven through the functions the admin routes call (`budget_admin`): user,
API key and team budgets created, edited (amount raised or lowered, period changed)
and deleted; team membership changed; inits by the owner (with or without its API
key) and by a member, which budgets may refuse; settlements through the
`SettlementBatcher` (several at once, duplicates inside one batch) as well as alone.
A fixed clock, advanced by a rule, is init's and the edits' ``now``: holds cross day,
week and month boundaries. (Every budget is hard: a hold that does not fit is refused.
There is no company-wide scope.)

A plain model predicts each outcome; after every step, against the database:

* each period row's held = Σ the active holds counted on it (`reservation_budgets`),
  and its spent = Σ the charges of the holds counted on it that settled since the
  row was last zeroed (a period change reusing the row, `budgets.rearm`);
* a budget's current period keeps spent + held ≤ amount, unless an edit lowered the
  amount under it (and then no new hold is admitted: the model predicts each refusal);
* at most one live (not superseded) threshold event per budget x period x percent,
  exactly those the model expects, and one for each threshold the spend has reached
  when the last change of the spend was a charge after the budget's last edit.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    invariant,
    multiple,
    precondition,
    rule,
)
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import budget_admin, budgets
from control_plane.budget_math import BudgetInput
from control_plane.chat_request import parse_init_request
from control_plane.db import Database
from control_plane.errors import BudgetExceeded, Conflict, InsufficientCredits
from control_plane.grants import move
from control_plane.policy import Principal
from control_plane.settlement_batch import SettlementBatcher
from control_plane.tables import (
    ApiKey,
    Budget,
    BudgetEvent,
    BudgetPeriod,
    CompanyWebhook,
    Reservation,
    ReservationBudget,
    User,
    new_id,
    utcnow,
)
from control_plane.webhook_settlement import Delivery
from shared.pricing import estimate_input_tokens
from shared.tokens import ALL_SCOPES
from shared.webhooks import STATUSES, USAGE_SOURCES
from tests.test_credits_properties import (
    OUTPUT,
    TEXT,
    TOKENS,
    CreditsMachine,
    Hold,
    expected_charge,
    expected_cost,
    reservation_of,
    run_machine,
)

ADMIN = Principal(
    user_id=None, company_id=None, role="admin", scopes=frozenset({"llm:admin"}), via="admin_token"
)
# Monday 1 April 2024, 00:30 UTC: the day, the week and the month start together (a
# period change reuses the row), until the clock's steps cross their ends.
START = datetime(2024, 4, 1, 0, 30, tzinfo=UTC)
STEPS = (
    timedelta(hours=2),
    timedelta(hours=7),
    timedelta(days=1),
    timedelta(days=6),
    timedelta(days=30),
)
PERIODS = ("day", "week", "month", "none")
THRESHOLDS = (80, 100)
AMOUNTS = st.integers(min_value=0, max_value=9_000) | st.sampled_from([0, 1_500, 3_000, 6_000])
CALLERS = ("owner", "owner-key", "member")
NEVER = datetime(1970, 1, 1, tzinfo=UTC)


def oracle_start(period: str, now: datetime) -> datetime:
    """The period containing `now`, written apart from `budget_math.period_start`."""
    if period == "none":
        return NEVER
    day = datetime(now.year, now.month, now.day, tzinfo=UTC)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=now.weekday())
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def reached(amount: int, spent: int) -> set[int]:
    """The thresholds `spent` has reached (a zero budget has none)."""
    return {p for p in THRESHOLDS if amount > 0 and spent * 100 >= p * amount}


def utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass
class Row:
    """One budget period's counters, as the model predicts them."""

    spent: int = 0
    held: int = 0
    since_zero: set[str] = field(default_factory=set)  # settled holds counted in `spent`
    events: set[int] = field(default_factory=set)  # live threshold events
    told: bool = False  # the last change of spend was a charge after the last edit


@dataclass
class BudgetModel:
    id: str
    scope: str
    target: str
    amount: int
    period: str
    rows: dict[datetime, Row] = field(default_factory=dict)
    over_by_edit: bool = False


@dataclass
class Counted:
    budget_id: str
    start: datetime
    hold: int


class BudgetsMachine(CreditsMachine):
    def __init__(self, db: Database, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(db, loop)
        self.clock = START
        self.batcher = SettlementBatcher(db)
        self.member_id, self.key_id, self.team_id = new_id(), new_id(), ""
        self.team: set[str] = {self.user_id, self.member_id}
        self.budgets: dict[str, BudgetModel] = {}
        self.order: list[str] = []  # budgets by creation: picked by index, deterministic
        self.gone: set[str] = set()  # deleted budgets (their events stay)
        self.counted: dict[str, list[Counted]] = {}  # reservation → its budget holds
        self.callers: dict[str, str] = {}  # reservation → caller
        self.tx(self._setup)
        self.team_id = str(
            self.tx(
                lambda s: budget_admin.create_team(
                    s,
                    ADMIN,
                    self.company_id,
                    budget_admin.TeamInput("t", sorted(self.team)),
                    self.clock,
                )
            )["id"]
        )
        self.credited += 150_000
        # Every example starts with budgets to hold on: the owner's monthly, the team's
        # daily (the rules create, edit and delete more).
        for scope, target, amount, period in (
            ("user", self.user_id, 20_000, "month"),
            ("team", self.team_id, 8_000, "day"),
        ):
            self.create_budget_of(scope, target, amount, period)

    def _setup(self, s: Session) -> None:
        now = utcnow()
        s.add(
            User(
                id=self.member_id,
                company_id=self.company_id,
                email=f"{self.member_id}@example.com",
                role="member",
                created_at=now,
            )
        )
        s.add(
            ApiKey(
                id=self.key_id,
                user_id=self.user_id,
                prefix="p",
                key_hash=self.key_id * 2,
                scopes="[]",
                created_at=now,
            )
        )
        # Without a webhook URL no threshold event is queued.
        s.add(
            CompanyWebhook(
                company_id=self.company_id,
                url="https://hooks.example.com/budgets",
                secret_encrypted="unused here",
                created_at=now,
                updated_at=now,
            )
        )
        s.flush()
        move(
            s,
            self.company_id,
            150_000,
            kind="grant",
            reason="start",
            actor="admin-token",
            request_id=None,
        )

    # --- the model ---------------------------------------------------------------

    def _caps(self, caller: str) -> list[BudgetModel]:
        """The budgets that cap `caller`'s requests, in id order (the lock order)."""
        user = self.member_id if caller == "member" else self.user_id
        targets = {("user", user)}
        if user in self.team:
            targets.add(("team", self.team_id))
        if caller == "owner-key":
            targets.add(("api_key", self.key_id))
        return sorted(
            (b for b in self.budgets.values() if (b.scope, b.target) in targets),
            key=lambda b: b.id,
        )

    def _finish(self, rid: str, charge: int) -> None:
        """A hold leaves its budget periods: their held drops, spend grows by the charge
        (a release: 0), and thresholds reached by a positive charge are told."""
        for c in self.counted.get(rid, []):
            budget = self.budgets.get(c.budget_id)
            if budget is None:
                continue  # deleted: settles as if it never was
            row = budget.rows[c.start]
            row.held -= c.hold
            row.spent += charge
            row.since_zero.add(rid)
            if charge > 0:
                row.events |= reached(budget.amount, row.spent)
                row.told = True

    def _settled(self, rid: str, charge: int) -> None:
        super()._settled(rid, charge)
        self._finish(rid, charge)

    def _released(self, rid: str) -> None:
        super()._released(rid)
        self._finish(rid, 0)

    def _pick(self, index: int) -> BudgetModel:
        live = [b for b in self.order if b in self.budgets]
        return self.budgets[live[index % len(live)]]

    # --- rules -------------------------------------------------------------------

    @rule(step=st.sampled_from(STEPS))
    def advance_clock(self, step: timedelta) -> None:
        self.clock += step

    @rule(
        scope=st.sampled_from(("user", "user-member", "api_key", "team")),
        amount=AMOUNTS,
        period=st.sampled_from(PERIODS),
    )
    def create_budget(self, scope: str, amount: int, period: str) -> None:
        target = {
            "user": self.user_id,
            "user-member": self.member_id,
            "api_key": self.key_id,
            "team": self.team_id,
        }[scope]
        self.create_budget_of(scope.removesuffix("-member"), target, amount, period)

    def create_budget_of(self, scope: str, target: str, amount: int, period: str) -> None:
        body = BudgetInput(scope, target, amount, period)

        def run(s: Session) -> dict[str, Any]:
            return budget_admin.create_budget(s, ADMIN, self.company_id, body, self.clock)

        if any(
            (b.scope, b.target, b.period) == (scope, target, period) for b in self.budgets.values()
        ):
            with pytest.raises(Conflict):
                self.tx(run)
            event("budget create: 409")
            return
        shown = self.tx(run)
        # A new budget counts nothing yet, whatever holds are out.
        assert (shown["spent"], shown["held"]) == ("0.000000", "0.000000")
        bid = str(shown["id"])
        self.budgets[bid] = BudgetModel(bid, scope, target, amount, period)
        self.order.append(bid)
        event(f"budget created ({scope}, {period})")

    @precondition(lambda self: bool(self.budgets))
    @rule(
        pick=st.integers(min_value=0, max_value=7),
        amount=st.none() | AMOUNTS,
        period=st.none() | st.sampled_from((*PERIODS, "aligned")),
    )
    def edit_budget(self, pick: int, amount: int | None, period: str | None) -> None:
        budget = self._pick(pick)
        if period == "aligned":
            # Another period whose current one starts with the budget's (daily to weekly
            # on a Monday, to monthly on the 1st): the new period reuses its row.
            start = oracle_start(budget.period, self.clock)
            period = next(
                (p for p in PERIODS if p != budget.period and oracle_start(p, self.clock) == start),
                None,
            )
            event(f"aligned period change: {budget.period} to {period}")
        if amount is None and period is None:
            amount = budget.amount // 2  # lowered: often under the spend
        body = BudgetInput(amount_micro=amount, period=period)

        def run(s: Session) -> dict[str, Any]:
            return budget_admin.update_budget(
                s, ADMIN, self.company_id, budget.id, body, self.clock
            )

        new_period = period is not None and period != budget.period
        if new_period and any(
            (b.scope, b.target, b.period) == (budget.scope, budget.target, period)
            for b in self.budgets.values()
            if b.id != budget.id
        ):
            with pytest.raises(Conflict):
                self.tx(run)
            event("budget edit: 409")
            return
        self.tx(run)
        event(
            f"budget edited (amount {'same' if amount is None else 'set'}, new period {new_period})"
        )
        if amount is not None:
            budget.amount = amount
        if period is not None:
            budget.period = period
        for each in budget.rows.values():
            each.told = False  # the spend is measured against a new amount now
        row = budget.rows.get(oracle_start(budget.period, self.clock))
        if row is None:
            budget.over_by_edit = False
            return
        if new_period:
            # A new period counts from zero, even on a row an old period used.
            row.spent, row.since_zero = 0, set()
        row.events &= reached(budget.amount, row.spent)  # the others re-armed
        budget.over_by_edit = row.spent + row.held > budget.amount

    @precondition(lambda self: len(self.budgets) >= 2)
    @rule(pick=st.integers(min_value=0, max_value=7))
    def delete_budget(self, pick: int) -> None:
        budget = self._pick(pick)
        self.tx(lambda s: budget_admin.remove_budget(s, ADMIN, self.company_id, budget.id))
        del self.budgets[budget.id]
        self.gone.add(budget.id)
        event("budget deleted")

    @rule(member_in=st.booleans(), owner_in=st.booleans())
    def set_team(self, member_in: bool, owner_in: bool) -> None:
        members = {u for u, keep in ((self.user_id, owner_in), (self.member_id, member_in)) if keep}
        body = budget_admin.TeamInput(None, sorted(members))
        self.tx(lambda s: budget_admin.update_team(s, ADMIN, self.company_id, self.team_id, body))
        self.team = members

    @rule(
        target=CreditsMachine.reservations,
        content=TEXT,
        max_tokens=st.integers(1, 4096),
        caller=st.sampled_from(CALLERS),
    )
    def init(self, content: str, max_tokens: int, caller: str = "owner") -> Any:
        return self._init(content, max_tokens, caller)

    @rule(
        target=CreditsMachine.reservations,
        content=TEXT,
        max_tokens=st.integers(1, 1500),
        caller=st.sampled_from(CALLERS),
    )
    def init_small(self, content: str, max_tokens: int, caller: str) -> Any:
        return self._init(content, max_tokens, caller)

    def _init(self, content: str, max_tokens: int, caller: str) -> Any:
        """Init by `caller` at the clock's instant: refused by the balance first, then
        by the first budget (in id order) the hold does not fit."""
        messages = [{"role": "user", "content": content}]
        expected = expected_cost(estimate_input_tokens(messages), max_tokens)
        req = parse_init_request({"messages": messages, "max_tokens": max_tokens})
        user = self.member_id if caller == "member" else self.user_id
        principal = Principal(
            user_id=user,
            company_id=self.company_id,
            role="member" if caller == "member" else "owner",
            scopes=frozenset(ALL_SCOPES),
            via="api_key",
            api_key_id=self.key_id if caller == "owner-key" else None,
        )
        jti, now = uuid.uuid4().hex, self.clock
        # The deadline is the real clock's: `expire` and the sweeps use it.
        run = reservation_of(principal, req, jti, now, utcnow() + timedelta(hours=1))
        if expected > self.available:
            with pytest.raises(InsufficientCredits):
                self.tx(run)
            event("init refused (402 credits)")
            return multiple()
        caps = self._caps(caller)
        for budget in caps:
            row = budget.rows.get(oracle_start(budget.period, now), Row())
            if row.spent + row.held + expected > budget.amount:
                with pytest.raises(BudgetExceeded) as refused:
                    self.tx(run)
                assert (refused.value.details or {}).get("budget_id") == budget.id
                event(f"init refused (402 {budget.scope} budget)")
                return multiple()
        reservation = self.tx(run).reservation
        assert reservation.hold_micro == expected
        event(f"init held on {len(caps)} budgets")
        self.holds[reservation.id] = Hold(
            jti=jti, user_id=user, session_id=reservation.session_id, hold=expected
        )
        self.callers[reservation.id] = caller
        counted = []
        for budget in caps:
            start = oracle_start(budget.period, now)
            row = budget.rows.setdefault(start, Row())
            row.held += expected
            counted.append(Counted(budget.id, start, expected))
        self.counted[reservation.id] = counted
        return reservation.id

    @rule(
        items=st.lists(
            st.tuples(
                CreditsMachine.reservations,
                st.sampled_from(STATUSES),
                TOKENS,
                OUTPUT,
                st.sampled_from(USAGE_SOURCES),
                st.sampled_from(("once", "same id", "other id")),
            ),
            min_size=1,
            max_size=5,
        )
    )
    def settle_batch(self, items: list[tuple[str, str, int, int, str, str]]) -> None:
        """Deliveries queued together settle in ONE batch (`SettlementBatcher`), a
        reservation's twins (same webhook id or another) and repeats in it too; a lone
        one through `settle_delivery`. The first delivery of a reservation settles it."""
        deliveries: list[tuple[str, Delivery]] = []
        for rid, status, inp, out, source, twin in items:
            hold = self.holds[rid]
            report = self._event(rid, status, inp, out, source)
            hold.webhooks += 1
            ids = [f"usage_{hold.jti}_b{hold.webhooks}"]
            if twin != "once":
                ids.append(ids[0] if twin == "same id" else f"{ids[0]}_twin")
            deliveries += [(rid, Delivery(i, report, transcripts=True)) for i in ids]

        async def deliver() -> list[Any]:
            return list(await asyncio.gather(*(self.batcher.settle(d) for _, d in deliveries)))

        outcomes = self.run(deliver())
        event(f"batch of {len(deliveries)}")
        for (rid, delivery), outcome in zip(deliveries, outcomes, strict=True):
            hold = self.holds[rid]
            if hold.status != "active":
                assert outcome.duplicate, (rid, hold.status)
                continue
            assert not outcome.duplicate
            report = delivery.event
            charge = expected_charge(
                report.status, report.input_tokens, report.output_tokens, hold.hold
            )
            assert (outcome.charged_micro, outcome.released_micro) == (charge, hold.hold - charge)
            self._settled(rid, charge)

    def teardown(self) -> None:
        self.run(self.batcher.close())
        super().teardown()

    # --- invariants --------------------------------------------------------------

    @invariant()
    def budget_books(self) -> None:
        def read(s: Session) -> tuple[list[str], Any, Any, Any, Any]:
            ids = [*self.budgets, *self.gone]
            periods = s.execute(
                select(
                    col(BudgetPeriod.budget_id),
                    col(BudgetPeriod.period_start),
                    col(BudgetPeriod.spent_micro),
                    col(BudgetPeriod.held_micro),
                ).where(col(BudgetPeriod.budget_id).in_(ids))
            ).all()
            counted = s.execute(
                select(
                    col(ReservationBudget.reservation_id),
                    col(ReservationBudget.budget_id),
                    col(ReservationBudget.period_start),
                    col(ReservationBudget.hold_micro),
                    col(Reservation.status),
                    col(Reservation.charged_micro),
                )
                .join(Reservation, col(Reservation.id) == col(ReservationBudget.reservation_id))
                .where(col(Reservation.company_id) == self.company_id)
            ).all()
            events = s.execute(
                select(
                    col(BudgetEvent.budget_id),
                    col(BudgetEvent.period_start),
                    col(BudgetEvent.percent),
                )
                .where(col(BudgetEvent.company_id) == self.company_id)
                .where(col(BudgetEvent.superseded_at).is_(None))
            ).all()
            amounts = dict(
                s.execute(
                    select(col(Budget.id), col(Budget.amount_micro)).where(
                        col(Budget.company_id) == self.company_id
                    )
                ).all()
            )
            return budgets.check(s, self.company_id), periods, counted, events, amounts

        problems, periods, counted, events, amounts = self.tx(read)
        assert problems == []
        assert amounts == {b.id: b.amount for b in self.budgets.values()}
        # A deleted budget's counters went with it.
        rows = {(b, utc(start)): (spent, held) for b, start, spent, held in periods}
        assert {b for b, _ in rows} <= set(self.budgets)
        # What init counted is what the model counted, hold for hold.
        charged: dict[str, int] = {}
        on_row: dict[tuple[str, datetime], list[tuple[str, int, str]]] = {}
        for rid, bid, start, hold, status, charge in counted:
            charged[rid] = charge or 0
            on_row.setdefault((bid, utc(start)), []).append((rid, hold, status))
        assert sorted((rid, bid, utc(start), hold) for rid, bid, start, hold, _, _ in counted) == (
            sorted(
                (rid, c.budget_id, c.start, c.hold) for rid, cs in self.counted.items() for c in cs
            )
        )
        for budget in self.budgets.values():
            for start, row in budget.rows.items():
                spent, held = rows.pop((budget.id, start))
                mine = on_row.get((budget.id, start), [])
                # held = Σ the active holds counted on it
                assert held == row.held == sum(h for _, h, st in mine if st == "active")
                # spent = Σ the charges of its holds settled since it was last zeroed
                assert row.since_zero <= {rid for rid, _, st in mine if st != "active"}
                assert spent == row.spent == sum(charged[rid] for rid in row.since_zero)
            # Hard: the current period never goes over, but for an edit that lowered it.
            now = budget.rows.get(oracle_start(budget.period, self.clock), Row())
            if now.spent + now.held <= budget.amount:
                budget.over_by_edit = False
            assert now.spent + now.held <= budget.amount or budget.over_by_edit
        assert rows == {}, "period rows the model does not know"
        # Threshold events: at most one live per budget x period x percent...
        keys = [(b, utc(start), p) for b, start, p in events]
        assert len(keys) == len(set(keys))
        live = {k for k in keys if k[0] in self.budgets}
        assert live == {
            (b.id, start, p)
            for b in self.budgets.values()
            for start, row in b.rows.items()
            for p in row.events
        }
        # ... and one for each threshold reached by a charge since the last edit.
        for budget in self.budgets.values():
            for start, row in budget.rows.items():
                if row.told:
                    for p in reached(budget.amount, row.spent):
                        assert (budget.id, start, p) in live


def test_budget_properties_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/budget-props.db"
    run_machine(BudgetsMachine, url, examples=25, steps=30, derandomize=True, database=None)


@pytest.mark.postgres
def test_budget_properties_on_postgresql(migrated_pg_url: str) -> None:
    url = migrated_pg_url
    run_machine(BudgetsMachine, url, examples=12, steps=25, derandomize=True, database=None)
