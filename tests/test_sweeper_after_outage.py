"""Holds whose deadline passed during a long outage (PostgreSQL, or the control plane
itself, away for over an hour). A stream's checkpoint lives until about an hour past
its hold's deadline (`shared.checkpoints.KEPT_PAST_DEADLINE_SECONDS`); the report of
a stream that ended during the outage waits in its edge's outbox, retried with
backoff. Once the database answers again the sweeper's first pass (5 s) comes before
those reports: a hold past its deadline by more than the checkpoint's life, with no
checkpoint, is no proof that no stream ran. Released at once, it made the report
that came a minute later a duplicate, and the stream went unbilled.

Driven on the app's real store and database (SQLite, PostgreSQL); no stream runs,
the report is posted as the edge posts it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from control_plane import sweeper as sweeper_module
from control_plane.reports_wait import ReportsWait
from control_plane.sweeper import sweep_expired_holds
from shared.checkpoints import UsageCheckpoint, checkpoint_key
from shared.pricing import MICRO, cost_micro
from tests.hold_sweeps import expire_hold
from tests.test_control_plane import (
    CP,
    assert_books_balance,
    cp,
    credits_of,
    data_of,
    micro,
    usage_event,
)
from tests.token_claims import claims_of

__all__ = ["cp"]


class Recovered:
    """The sweeper just regained its database, on a clock the test moves."""

    def __init__(self, cp: CP) -> None:
        self.cp = cp
        self.clock = [0.0]
        self.reports = ReportsWait(clock=lambda: self.clock[0])

    def sweep(self) -> Any:
        state = self.cp.app.state
        return self.cp.on_loop(
            lambda: sweep_expired_holds(state.db, state.store, state.metrics, reports=self.reports)
        )


LONG_PAST = 2 * 3600  # the deadline passed during a two-hour outage


def test_a_report_that_comes_after_a_long_outage_bills_its_stream(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    grant = data_of(client.post("/v1/chat/init", json={"query": "hi", "max_tokens": 400}), 201)
    expire_hold(cp, grant["reservation_id"], timedelta(seconds=LONG_PAST))
    sweeper = Recovered(cp)
    assert sweeper.sweep().released == 0  # the first pass after the outage
    sweeper.clock[0] += 60
    assert sweeper.sweep().released == 0
    assert micro(credits_of(client)["held"]) > 0

    # The edge's outbox retries the report a minute after the database is back.
    report = usage_event(grant, company_id, input_tokens=12, output_tokens=300)
    assert data_of(cp.webhook(report))["settled"] is True
    price = cp.settings.catalog.models[grant["model"]].price
    assert micro(credits_of(client)["balance"]) == 10 * MICRO - cost_micro(12, 300, price)
    assert credits_of(client)["held"] == "0.000000"
    assert_books_balance(cp, company_id, client)


def test_a_long_past_hold_whose_report_never_comes_is_released_after_the_wait(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    grant = data_of(client.post("/v1/chat/init", json={"query": "hi", "max_tokens": 400}), 201)
    expire_hold(cp, grant["reservation_id"], timedelta(seconds=LONG_PAST))
    sweeper = Recovered(cp)
    assert sweeper.sweep().released == 0
    sweeper.clock[0] += sweeper.reports.wait
    assert sweeper.sweep().released == 1
    assert credits_of(client) == {
        "balance": "10.000000",
        "held": "0.000000",
        "available": "10.000000",
    }
    assert_books_balance(cp, company_id, client)


def test_a_hold_within_its_checkpoints_life_is_released_at_once(cp: CP) -> None:
    """No checkpoint for a hold whose checkpoint would still be there: no stream ran.
    Released by the first pass, outage or not, as before."""
    client, _ = cp.owner_client("10")
    grant = data_of(client.post("/v1/chat/init", json={"query": "hi", "max_tokens": 400}), 201)
    expire_hold(cp, grant["reservation_id"], timedelta(seconds=60))
    assert Recovered(cp).sweep().released == 1
    assert credits_of(client)["held"] == "0.000000"


def test_holds_waiting_for_their_reports_do_not_starve_younger_ones(
    cp: CP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Oldest deadline first, the holds left waiting for their reports filled the
    pass's pages (5,000 holds here scaled to 2): a younger dead stream's hold, whose
    checkpoint still lives, went unread until its checkpoint expired, then was
    released unbilled. The pass now starts after the waiting ones."""
    monkeypatch.setattr(sweeper_module, "BATCH", 2)
    monkeypatch.setattr(sweeper_module, "MAX_BATCHES", 1)
    client, _ = cp.owner_client("10")
    for _ in range(3):  # a long outage's leftovers
        old = data_of(client.post("/v1/chat/init", json={"query": "hi", "max_tokens": 400}), 201)
        expire_hold(cp, old["reservation_id"], timedelta(seconds=LONG_PAST))
    young = data_of(client.post("/v1/chat/init", json={"query": "hi", "max_tokens": 400}), 201)
    expire_hold(cp, young["reservation_id"], timedelta(seconds=60))
    point = UsageCheckpoint(
        str(claims_of(young["stream_token"])["jti"]), young["reservation_id"], 12, 70, "t", beat=3
    )
    store = cp.app.state.store
    cp.on_loop(lambda: store.set(checkpoint_key(young["reservation_id"]), point.dumps(), 600))
    sweeper = Recovered(cp)
    result = sweeper.sweep()
    assert (result.settled, result.released) == (1, 0)  # the young one, from its checkpoint
    sweeper.clock[0] += sweeper.reports.wait
    assert sweeper.sweep().released == 2  # the wait over: the old ones, a page at a time
    assert sweeper.sweep().released == 1


def test_the_wait_starts_again_after_each_outage() -> None:
    clock = [0.0]
    reports = ReportsWait(wait=600, clock=lambda: clock[0])
    assert not reports.over()  # the process just started: as after an outage
    reports.seen()
    clock[0] += 599
    reports.seen()  # seen again: the wait counts from the first
    assert not reports.over()
    clock[0] += 1
    assert reports.over()
    reports.lost()  # the database (or the store) away again
    assert not reports.over()
    clock[0] += 1000
    reports.seen()
    assert not reports.over()
    clock[0] += 600
    assert reports.over()
