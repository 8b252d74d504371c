"""Property tests of the credits system (issue point 7).

A hypothesis state machine drives the real use cases, each in its own transaction
on a real database (a SQLite file; a smaller run on PostgreSQL): grants and
adjustments (`grants`), init's hold (`chat_init.reserve`), webhook settlement
(`webhook_settlement.settle_delivery`, duplicates with the same and with other webhook ids,
concurrent twins included), and expiry + reconciliation (`sweeper`, with or without
the edge's checkpoint in a real `MemoryStore`). A plain Python model predicts each
outcome; after every step the invariants are checked against the database:

* balance = Σ grants and adjustments - Σ charges, recomputed from the ledger, equal
  to the company row and to the model;
* available = balance - Σ active holds ≥ 0, held = Σ active holds;
* every reservation is settled or released at most once (≤ 1 charge and ≤ 1
  release row), and its status only moves active → settled | released;
* every ledger row has exactly one audit event (`books.check_books`).
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.books import books_from_ledger, check_books
from control_plane.chat_init import reserve
from control_plane.chat_request import parse_init_request
from control_plane.db import Database
from control_plane.errors import AvailableCreditsExceeded, InsufficientCredits
from control_plane.grants import move
from control_plane.metrics import Metrics
from control_plane.migrate import upgrade
from control_plane.policy import Principal
from control_plane.sweeper import sweep_expired_holds
from control_plane.tables import Company, Reservation, User, new_id, utcnow
from control_plane.webhook_settlement import Delivery, settle_delivery
from shared.catalog import Catalog, ModelSpec, Price, Provider
from shared.checkpoints import UsageCheckpoint, checkpoint_key
from shared.pricing import estimate_input_tokens
from shared.store_memory import MemoryStore
from shared.tokens import ALL_SCOPES
from shared.webhooks import STATUSES, USAGE_SOURCES, UsageEvent

T = TypeVar("T")

# Prices that are not whole micro-credits per token, so the ceiling matters.
PRICE = Price(input_per_mtok=Decimal("0.37"), output_per_mtok=Decimal("1.13"))
MODEL = ModelSpec(
    id="frac",
    provider="p",
    upstream_model="frac",
    context_length=100_000,
    max_output_tokens=4096,
    price=PRICE,
)
CATALOG = Catalog(
    default_model="frac",
    providers={"p": Provider(name="p", api_type="openai_chat", base_url="http://x")},
    models={"frac": MODEL},
)
TEXT = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
    min_size=1,
    max_size=40,
)
TOKENS = st.integers(min_value=0, max_value=5000)
# "No output yet" decides what a failed stream costs: draw it often.
OUTPUT = st.one_of(st.just(0), st.integers(min_value=1, max_value=5000))


def expected_cost(input_tokens: int, output_tokens: int) -> int:
    """The oracle's price: one ceiling on the exact decimal sum (DESIGN §9 "Money")."""
    exact = input_tokens * PRICE.input_per_mtok + output_tokens * PRICE.output_per_mtok
    return math.ceil(exact)


def expected_charge(status: str, input_tokens: int, output_tokens: int, hold: int) -> int:
    """The oracle's bill (DESIGN §9 "What is billed"), written independently of
    `ledger.charge_for`: failed or revoked before the first output token is free;
    anything else pays input + output, capped at the hold."""
    if status in ("failed", "revoked") and output_tokens == 0:
        return 0
    return min(expected_cost(input_tokens, output_tokens), hold)


@dataclass
class Hold:
    jti: str
    user_id: str
    session_id: str
    hold: int
    status: str = "active"
    expired: bool = False
    checkpoint: tuple[int, int] | None = None
    webhooks: int = 0


def reservation_of(
    principal: Principal, req: Any, jti: str, now: datetime, hold_expires_at: datetime
) -> Callable[[Session], Any]:
    """The init's hold for `principal` (`reserve` on the test catalog, its request id
    made of `jti`), as a use case to run in a transaction."""

    def run(s: Session) -> Any:
        return reserve(
            s,
            CATALOG,
            principal,
            req,
            jti=jti,
            request_id=f"req-{jti[:8]}",
            now=now,
            hold_expires_at=hold_expires_at,
        )

    return run


class CreditsMachine(RuleBasedStateMachine):
    """One company per example, in a database shared by the examples of one test."""

    reservations = Bundle("reservations")

    def __init__(self, db: Database, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.db, self.loop = db, loop
        self.store = MemoryStore()
        self.metrics = Metrics()
        self.company_id, self.user_id = new_id(), new_id()
        self.credited = 0  # Σ grants + adjustments
        self.charged = 0  # Σ charges
        self.holds: dict[str, Hold] = {}
        self.run(self.db.transaction(self._create_company))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def tx(self, fn: Callable[[Session], T]) -> T:
        return self.run(self.db.transaction(fn))

    def _create_company(self, session: Session) -> None:
        now = utcnow()
        session.add(Company(id=self.company_id, name=f"p-{self.company_id}", created_at=now))
        session.flush()
        session.add(
            User(
                id=self.user_id,
                company_id=self.company_id,
                email=f"{self.user_id}@example.com",
                role="owner",
                created_at=now,
            )
        )

    # --- the model ---------------------------------------------------------------

    @property
    def held(self) -> int:
        return sum(h.hold for h in self.holds.values() if h.status == "active")

    @property
    def available(self) -> int:
        return self.credited - self.charged - self.held

    def _settled(self, rid: str, charge: int) -> None:
        hold = self.holds[rid]
        assert hold.status == "active"
        assert 0 <= charge <= hold.hold
        hold.status = "settled"
        self.charged += charge

    def _released(self, rid: str) -> None:
        hold = self.holds[rid]
        assert hold.status == "active"
        hold.status = "released"

    # --- rules -------------------------------------------------------------------

    @rule(amount=st.integers(min_value=1, max_value=50_000))
    def grant_credits(self, amount: int) -> None:
        entry, created = self.tx(
            lambda s: move(
                s,
                self.company_id,
                amount,
                kind="grant",
                reason="top-up",
                actor="admin-token",
                request_id=None,
            )
        )
        assert created and entry.amount_micro == amount
        self.credited += amount

    @rule(amount=st.integers(min_value=-20_000, max_value=5_000).filter(bool))
    def adjust_credits(self, amount: int) -> None:
        def run(s: Session) -> Any:
            return move(
                s,
                self.company_id,
                amount,
                kind="adjustment",
                reason="fix",
                actor="admin-token",
                request_id=None,
            )

        if amount < 0 and -amount > self.available:
            with pytest.raises(AvailableCreditsExceeded):
                self.tx(run)
            event("adjustment refused")
            return
        self.tx(run)
        self.credited += amount

    @rule(target=reservations, content=TEXT, max_tokens=st.integers(1, 4096) | st.integers(1, 300))
    def init(self, content: str, max_tokens: int) -> Any:
        messages = [{"role": "user", "content": content}]
        estimate = estimate_input_tokens(messages)
        # The hold, computed independently: one ceiling on the exact decimal sum.
        expected = expected_cost(estimate, max_tokens)
        req = parse_init_request({"messages": messages, "max_tokens": max_tokens})
        principal = Principal(
            user_id=self.user_id,
            company_id=self.company_id,
            role="owner",
            scopes=frozenset(ALL_SCOPES),
            via="api_key",
        )
        jti, now = uuid.uuid4().hex, utcnow()
        run = reservation_of(principal, req, jti, now, now + timedelta(hours=1))
        if expected > self.available:
            with pytest.raises(InsufficientCredits):
                self.tx(run)
            event("init refused (402)")
            return multiple()
        reservation = self.tx(run).reservation
        assert reservation.hold_micro == expected
        event("init held")
        self.holds[reservation.id] = Hold(
            jti=jti, user_id=self.user_id, session_id=reservation.session_id, hold=expected
        )
        return reservation.id

    def _event(
        self, rid: str, status: str, input_tokens: int, output_tokens: int, source: str
    ) -> UsageEvent:
        hold = self.holds[rid]
        now = datetime.now(UTC).isoformat()
        return UsageEvent(
            jti=hold.jti,
            reservation_id=rid,
            company_id=self.company_id,
            user_id=hold.user_id,
            session_id=hold.session_id,
            request_id="",
            model="frac",
            provider="p",
            status=status,
            finish_reason=None,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            usage_source=source,
            started_at=now,
            first_token_at=None,
            ended_at=now,
            content="reply" if status == "completed" else None,
        )

    @rule(
        rid=reservations,
        status=st.sampled_from(STATUSES),
        input_tokens=TOKENS,
        output_tokens=OUTPUT,
        source=st.sampled_from(USAGE_SOURCES),
        twins=st.integers(min_value=1, max_value=3),
        same_id=st.booleans(),
    )
    def webhook(
        self,
        rid: str,
        status: str,
        input_tokens: int,
        output_tokens: int,
        source: str,
        twins: int,
        same_id: bool,
    ) -> None:
        """Deliver a report `twins` times at once (same webhook id or different
        ones); a report for a reservation no longer active is a duplicate."""
        hold = self.holds[rid]
        report = self._event(rid, status, input_tokens, output_tokens, source)
        ids = []
        for i in range(twins):
            hold.webhooks += 1
            ids.append(report.webhook_id if same_id else f"usage_{hold.jti}_{hold.webhooks}_{i}")

        async def deliver() -> list[Any]:
            return list(
                await asyncio.gather(
                    *(settle_delivery(self.db, Delivery(i, report, transcripts=True)) for i in ids)
                )
            )

        outcomes = self.run(deliver())
        fresh = [o for o in outcomes if not o.duplicate]
        if hold.status != "active":
            assert fresh == []
            event(f"webhook after {hold.status}: duplicate")
            return
        assert len(fresh) == 1
        event(f"webhook settled ({twins} deliveries, same id: {same_id})")
        charge = expected_charge(status, input_tokens, output_tokens, hold.hold)
        assert fresh[0].charged_micro == charge
        assert fresh[0].released_micro == hold.hold - charge
        self._settled(rid, charge)

    @rule(
        rid=reservations,
        checkpoint=st.one_of(st.none(), st.just("garbage"), st.tuples(TOKENS, OUTPUT)),
        sweep_now=st.booleans(),
    )
    def expire(self, rid: str, checkpoint: tuple[int, int] | str | None, sweep_now: bool) -> None:
        """The stream's deadline passes; the edge may have left a checkpoint. The
        sweeper runs now, or later (leaving room for a late webhook first)."""
        hold = self.holds[rid]
        if isinstance(checkpoint, tuple):
            point = UsageCheckpoint(
                jti=hold.jti,
                reservation_id=rid,
                input_tokens=checkpoint[0],
                output_tokens=checkpoint[1],
                updated_at=datetime.now(UTC).isoformat(),
            )
            self.run(self.store.set(checkpoint_key(rid), point.dumps(), 3600))
            hold.checkpoint = checkpoint
        elif checkpoint == "garbage":
            self.run(self.store.set(checkpoint_key(rid), b"\x00not json", 3600))
            hold.checkpoint = None
        past = utcnow() - timedelta(seconds=1)
        self.tx(
            lambda s: s.execute(
                update(Reservation).where(col(Reservation.id) == rid).values(expires_at=past)
            )
        )
        hold.expired = True
        event(f"expired while {hold.status}")
        if sweep_now:
            self.sweep()

    @precondition(lambda self: any(h.expired and h.status == "active" for h in self.holds.values()))
    @rule()
    def sweep(self) -> None:
        """Reconcile every expired active hold, as the model predicts."""
        result = self.run(sweep_expired_holds(self.db, self.store, self.metrics))
        settled = released = 0
        for rid, hold in self.holds.items():
            if hold.status != "active" or not hold.expired:
                continue
            if hold.checkpoint is None:
                self._released(rid)
                released += 1
            else:
                inp, out = hold.checkpoint
                self._settled(rid, expected_charge("failed", inp, out, hold.hold))
                settled += 1
        assert (result.settled, result.released) == (settled, released)
        event(f"sweep: {settled} settled from a checkpoint, {released} released")

    def teardown(self) -> None:
        # The examples share one database and the sweeper is global: leave no expired
        # active hold behind for the next example's sweep to find.
        self.run(sweep_expired_holds(self.db, self.store, self.metrics))

    # --- invariants --------------------------------------------------------------

    @invariant()
    def books_balance(self) -> None:
        def read(s: Session) -> tuple[list[str], Any, dict[str, str]]:
            statuses = s.execute(
                select(col(Reservation.id), col(Reservation.status)).where(
                    col(Reservation.company_id) == self.company_id
                )
            )
            return (
                check_books(s, self.company_id),
                books_from_ledger(s, self.company_id),
                {rid: status for rid, status in statuses},
            )

        problems, books, statuses = self.tx(read)
        assert problems == []
        assert books.balance_micro == self.credited - self.charged
        assert books.held_micro == self.held
        assert books.available_micro == self.available >= 0
        # Statuses only move active → settled | released, as the model says.
        assert statuses == {rid: h.status for rid, h in self.holds.items()}


def run_machine(
    machine: Callable[[Database, asyncio.AbstractEventLoop], RuleBasedStateMachine],
    url: str,
    examples: int,
    steps: int,
    **extra: Any,
) -> None:
    """`machine` on a database at `url` migrated to head, `examples` runs of up to
    `steps` rules; `extra`: more hypothesis settings."""
    upgrade(url)
    db, loop = Database(url), asyncio.new_event_loop()
    try:
        run_state_machine_as_test(
            lambda: machine(db, loop),
            settings=settings(
                max_examples=examples,
                stateful_step_count=steps,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                **extra,
            ),
        )
    finally:
        loop.close()
        db.close()


def test_credits_properties_on_sqlite(tmp_path: Path) -> None:
    run_machine(CreditsMachine, f"sqlite:///{tmp_path}/props.db", examples=25, steps=30)


@pytest.mark.postgres
def test_credits_properties_on_postgresql(migrated_pg_url: str) -> None:
    run_machine(CreditsMachine, migrated_pg_url, examples=12, steps=25)
