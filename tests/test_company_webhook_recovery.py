"""A company's receiver that was down, then back (`company_webhooks`), on SQLite and
PostgreSQL, on a fake clock (`company_webhooks.utcnow`: no wall-clock waits).

Before: an event was given up after `MAX_ATTEMPTS` (20) whatever the time they took
(backoff capped at an hour): after a 6-hour outage 84 % of events were never
delivered, though the product promises at least once. And each backed-off event
waited out its own backoff once the receiver was back (after 30 min down: median
13.5 min, p90 38 min). Now an event is given up by age (`GIVE_UP_AFTER`), backs off
to at most 15 min, and a post that passes makes its company's other events that
are backing off due at once, never one another pass or process has leased."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet, MultiFernet
from sqlalchemy import select
from sqlmodel import col

from control_plane import budgets, company_webhooks
from control_plane.company_webhooks import claim_due, deliver_due
from control_plane.db import Database
from control_plane.tables import BudgetEvent, Company, CompanyWebhook, new_id, utcnow
from shared.webhooks import generate_secret
from tests.conftest import fresh_pg_database, migrated_sqlite


class _Middle(random.Random):
    """Jitter drawn at the middle of its range: the schedule's expected pace, the
    same on every run."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


@dataclasses.dataclass
class World:
    db: Database
    fernet: MultiFernet
    clock: list[datetime]

    def company(self) -> str:
        company_id, now = new_id(), self.clock[0]

        def seed(session: Any) -> None:
            session.add(Company(id=company_id, name=company_id, balance_micro=0, held_micro=0,
                                created_at=now))  # fmt: skip
            session.flush()
            session.add(
                CompanyWebhook(
                    company_id=company_id, url=f"http://127.0.0.1:9/{company_id}",
                    secret_encrypted=self.fernet.encrypt(generate_secret().encode()).decode(),
                    created_at=now, updated_at=now,
                )
            )  # fmt: skip

        self.tx(seed)
        return company_id

    def event(self, company_id: str, attempts: int = 0) -> str:
        """A `budget.threshold` event of `company_id`, created and due now."""
        event_id, now = new_id(), self.clock[0]
        self.tx(
            lambda s: s.add(
                BudgetEvent(
                    id=event_id, company_id=company_id, budget_id=new_id(), period_start=now,
                    percent=80, payload={"type": "budget.threshold"}, attempts=attempts,
                    created_at=now, next_attempt_at=now,
                )
            )
        )  # fmt: skip
        return event_id

    def row(self, event_id: str) -> BudgetEvent:
        event = self.tx(lambda s: s.get(BudgetEvent, event_id))
        assert event is not None
        return event

    def tx(self, fn: Any) -> Any:
        return asyncio.run(self.db.transaction(fn))

    def deliver(self, status: int, seen: list[str] | None = None) -> int:
        """One pass at the clock's time, every post answered `status`."""

        def handle(request: httpx.Request) -> httpx.Response:
            if seen is not None:
                seen.append(request.headers["webhook-id"])
            return httpx.Response(status)

        async def run() -> int:
            async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
                return await deliver_due(self.db, self.fernet, client, allow_private=True)

        return asyncio.run(run())


@pytest.fixture(params=["sqlite", "postgres"])
def world(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[World]:
    clock = [utcnow()]
    monkeypatch.setattr(company_webhooks, "utcnow", lambda: clock[0])
    backoff = dataclasses.replace(company_webhooks.BACKOFF, rng=_Middle())
    monkeypatch.setattr(company_webhooks, "BACKOFF", backoff)
    fernet = MultiFernet([Fernet(Fernet.generate_key())])
    if request.param == "sqlite":
        db = Database(migrated_sqlite(tmp_path / "cp.db"))
        try:
            yield World(db, fernet, clock)
        finally:
            db.close()
        return
    with fresh_pg_database(request.getfixturevalue("pg_server"), migrated=True) as url:
        db = Database(url)
        try:
            yield World(db, fernet, clock)
        finally:
            db.close()


def test_an_event_whose_receiver_was_down_six_hours_is_delivered_once_it_is_back(
    world: World,
) -> None:
    """The receiver is down for 6 hours; every attempt the schedule makes fails. At
    the middle of each jitter range, the 20 attempts allowed took 5.1 hours: the
    event was never claimed again and never delivered, then pruned as given up."""
    company = world.company()
    event_id = world.event(company)
    created = world.clock[0]
    back = created + timedelta(hours=6)
    while (due := world.row(event_id).next_attempt_at) < back:
        world.clock[0] = max(world.clock[0], due)
        attempts = world.row(event_id).attempts
        world.deliver(503)
        if world.row(event_id).attempts == attempts:
            break  # no longer claimed
    world.clock[0] = max(world.clock[0], back, world.row(event_id).next_attempt_at)
    seen: list[str] = []
    assert world.deliver(204, seen) == 1, "given up after a 6-hour outage"
    assert seen == [event_id]
    event = world.row(event_id)
    assert event.delivered_at == world.clock[0]
    # At most one capped backoff after the receiver came back.
    assert world.clock[0] - back <= timedelta(seconds=company_webhooks.BACKOFF.cap)
    assert company_webhooks.BACKOFF.cap <= 15 * 60


def test_an_event_is_given_up_by_age_and_only_then_pruned(world: World) -> None:
    """Past `GIVE_UP_AFTER` since its creation an undelivered event is claimed no
    more, and the retention sweep counts it as done with."""
    company = world.company()
    event_id = world.event(company, attempts=3)
    created = world.clock[0]
    give_up = company_webhooks.GIVE_UP_AFTER
    world.clock[0] = created + give_up - timedelta(seconds=1)
    world.tx(lambda s: claim_due(s, world.fernet, world.clock[0], 9))  # still claimed
    assert world.row(event_id).next_attempt_at > world.clock[0]
    world.tx(lambda s: s.get(BudgetEvent, event_id).__setattr__("next_attempt_at", created))
    world.clock[0] = created + give_up + timedelta(seconds=1)
    assert world.tx(lambda s: claim_due(s, world.fernet, world.clock[0], 9)) == []
    after_retention = created + budgets.EVENT_RETENTION + timedelta(days=1)
    prune = budgets.prune_events
    assert world.tx(lambda s: prune(s, after_retention, 9, give_up)) == 1


def test_one_passing_post_brings_the_companys_backed_off_events_forward(
    world: World,
) -> None:
    """Company A's receiver was down: two events back off (7.5 min at the middle of
    the range), a third is leased by another process, which is posting it right now.
    Company B's receiver is still down, its events backing off too. A's receiver
    comes back and a new event of A passes: A's two are due for the next pass, which
    posts them; the leased one is not posted a second time (its lease stands), and
    B's keep their backoff."""
    a, b = world.company(), world.company()
    backed_off = [world.event(a, attempts=8) for _ in range(2)]
    leased = world.event(a)
    b_events = [world.event(b, attempts=8) for _ in range(2)]
    start = world.clock[0]
    for _ in range(3):  # two of a company a pass
        world.deliver(503)
    for event_id in (*backed_off, *b_events):
        assert world.row(event_id).next_attempt_at >= start + timedelta(minutes=7)
    # The leased event's short backoff ran out: another process claims it.
    world.clock[0] = start + timedelta(seconds=10)
    assert world.row(leased).next_attempt_at <= world.clock[0]
    other = world.tx(lambda s: claim_due(s, world.fernet, world.clock[0], 9))
    assert [d.event_id for d in other] == [leased]
    lease_end = world.row(leased).next_attempt_at
    b_due = {e: world.row(e).next_attempt_at for e in b_events}

    world.clock[0] = start + timedelta(seconds=12)
    fresh = world.event(a)
    seen: list[str] = []
    assert world.deliver(204, seen) == 1
    assert seen == [fresh]

    world.clock[0] = start + timedelta(seconds=14)
    assert world.deliver(204, seen) == 2
    assert sorted(seen[1:]) == sorted(backed_off)  # not the leased one
    assert world.row(leased).next_attempt_at == lease_end
    assert world.row(leased).delivered_at is None
    assert {e: world.row(e).next_attempt_at for e in b_events} == b_due
    assert all(world.row(e).delivered_at is None for e in b_events)


def test_bringing_the_backlog_forward_is_bounded_per_success(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One statement per passing post, at most `EXPEDITE_LIMIT` events, the longest
    waiting first; the next passing post brings the rest."""
    monkeypatch.setattr(company_webhooks, "EXPEDITE_LIMIT", 3)
    monkeypatch.setattr(company_webhooks, "PER_COMPANY", 10)
    a = world.company()
    waiting = [world.event(a, attempts=8) for _ in range(5)]
    start = world.clock[0]
    world.deliver(503)
    world.clock[0] = start + timedelta(seconds=5)
    world.event(a)
    assert world.deliver(204) == 1
    due = select(col(BudgetEvent.id)).where(
        col(BudgetEvent.id).in_(waiting), col(BudgetEvent.next_attempt_at) <= world.clock[0]
    )
    assert len(world.tx(lambda s: list(s.scalars(due)))) == 3


def test_a_failure_recorded_after_its_lease_ran_out_leaves_the_new_claim_alone(
    world: World,
) -> None:
    """A pass whose record of a failed post came after its lease ran out (a database
    that stalled it): another process has claimed the event since. The late record
    overwrote that claim with a backoff, which a passing post could then bring forward
    while the other process was posting it. Now only the claim that stands records."""
    company = world.company()
    event_id = world.event(company)
    late = world.tx(lambda s: claim_due(s, world.fernet, world.clock[0], 10))
    world.clock[0] += timedelta(seconds=company_webhooks.LEASE_SECONDS + 1)
    fresh = world.tx(lambda s: claim_due(s, world.fernet, world.clock[0], 10))
    assert [d.event_id for d in late] == [d.event_id for d in fresh] == [event_id]
    world.tx(lambda s: company_webhooks.record_outcome(s, late[0], False, world.clock[0]))
    row = world.row(event_id)
    assert (row.attempts, row.backoff_until) == (0, None)  # the fresh claim stands
    world.tx(lambda s: company_webhooks.record_outcome(s, fresh[0], False, world.clock[0]))
    row = world.row(event_id)
    assert row.attempts == 1 and row.backoff_until is not None
