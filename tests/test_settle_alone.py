"""A lone webhook on the unit's psycopg connection (issue 14, settlement's fourth
round): `webhook_settlement.settle_delivery` on PostgreSQL sends the statements of
`settle_webhooks` with no ORM session; without a reply to keep, its read and its one
write statement run in autocommit (no BEGIN, no COMMIT); a reply commits with the
charge. Exactly once as before: a redelivery, an id reused for another reservation,
a late id, twins at once; a failed transcript keeps the charge."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest

from control_plane import (
    budgets,
    chat_sessions,
    hot_statements,
    raw_pg,
    settlement,
    webhook_settlement,
)
from control_plane.books import check_books
from control_plane.db import Database
from control_plane.migrate import upgrade
from control_plane.tables import Budget, BudgetPeriod, new_id, utcnow
from tests.lone_webhooks import (
    HOLD,
    assert_charged_without_the_reply,
    held_turn,
    settle_each_id_once,
    through_sqlalchemy,
    usage_delivery,
)
from tests.test_init_writes import LIMITS, Tenant


@pytest.fixture
def db(migrated_pg_url: str) -> Iterator[Database]:
    upgrade(migrated_pg_url)
    database = Database(migrated_pg_url, pool_size=4)
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
def tenant(db: Database) -> Tenant:
    return Tenant(db.sessions)


def _settle(db: Database, delivery: webhook_settlement.Delivery) -> settlement.Outcome:
    """As the route settles a lone webhook: `settle_delivery`, its refusal raised."""
    return asyncio.run(
        webhook_settlement.settle_delivery(db, replace(delivery, session_limits=LIMITS))
    )


def _charges(tenant: Tenant, reservation_id: str) -> int:
    entries = tenant.rows(hot_statements.LEDGER, reservation_id=reservation_id)
    return sum(1 for entry in entries if entry["kind"] == "charge")


@pytest.mark.parametrize("content", [None, "Hello there!"])
def test_a_lone_webhook_runs_on_the_driver_and_begins_only_for_a_reply(
    db: Database, tenant: Tenant, content: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No reply: the reservation's read and the one write statement, each in
    autocommit. A reply: the same two, then its savepoint, the counters and the
    message, all in one transaction. None through SQLAlchemy's execution."""
    reservation = held_turn(tenant)
    sent: list[tuple[str, bool, psycopg.pq.TransactionStatus]] = []
    real_run = raw_pg.run

    def run(driver: psycopg.Connection[Any], sql: str, params: Any) -> list[Any]:
        sent.append((sql.split(" ", 1)[0], driver.autocommit, driver.info.transaction_status))
        return real_run(driver, sql, params)

    monkeypatch.setattr(raw_pg, "run", run)
    with through_sqlalchemy(db.engine) as elsewhere:
        outcome = _settle(db, usage_delivery(reservation, content))
    assert not outcome.duplicate and outcome.charged_micro > 0
    idle, begun = psycopg.pq.TransactionStatus.IDLE, psycopg.pq.TransactionStatus.INTRANS
    if content is None:
        assert sent == [("SELECT", True, idle), ("WITH", True, idle)]
    else:
        statements = ["SELECT", "WITH", "SAVEPOINT", "UPDATE", "INSERT"]
        assert sent == [(s, False, begun) for s in statements]
    assert elsewhere == []
    messages = tenant.rows(hot_statements.MESSAGES, session_id=reservation.session_id)
    assert [m["role"] for m in sorted(messages, key=lambda m: m["seq"])] == (
        ["user"] if content is None else ["user", "assistant"]
    )
    assert tenant.tx(lambda s: check_books(s, tenant.company_id)) == []


@pytest.mark.parametrize("content", [None, "Hello there!"])
def test_a_lone_webhook_settles_once_whatever_its_id(
    db: Database, tenant: Tenant, content: str | None
) -> None:
    """A redelivery is DUPLICATE; the id reused for another reservation is 409 and
    leaves that one held (its own id settles it then: the 409's read ran after the
    write, in autocommit without a reply); an id arriving after the hold was
    released is recorded and DUPLICATE. One charge each, books balanced."""
    first = settle_each_id_once(tenant, lambda delivery: _settle(db, delivery), content)
    replies = len(tenant.rows(hot_statements.MESSAGES, session_id=first.session_id)) - 1
    assert replies == (0 if content is None else 1)
    assert tenant.tx(lambda s: check_books(s, tenant.company_id)) == []


@pytest.mark.parametrize("same_id", [True, False])
def test_lone_webhooks_of_one_stream_at_once_charge_once(
    db: Database, tenant: Tenant, same_id: bool
) -> None:
    """Twins in two autocommit statements at once (the same id, or two ids): the
    second waits on the first's id or row lock, then settles nothing."""
    reservation = held_turn(tenant)
    first = usage_delivery(reservation, None)
    second = first if same_id else replace(first, webhook_id="usage_other")

    async def both() -> list[settlement.Outcome]:
        return await asyncio.gather(
            *(
                webhook_settlement.settle_delivery(db, replace(d, session_limits=LIMITS))
                for d in (first, second)
            )
        )

    outcomes = asyncio.run(both())
    assert sorted(o.duplicate for o in outcomes) == [False, True]
    assert _charges(tenant, reservation.id) == 1
    assert len(tenant.rows(hot_statements.USAGE, reservation_id=reservation.id)) == 1
    assert tenant.tx(lambda s: check_books(s, tenant.company_id)) == []


def test_a_failed_reply_on_the_driver_keeps_the_charge(
    db: Database, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reply's writes then a failure: rolled back to the savepoint, the charge
    and the books committed, the session as the user left it."""
    reservation = held_turn(tenant)
    real_append = chat_sessions.append_reply

    def failing(driver: psycopg.Connection[Any], *args: Any) -> Any:
        real_append(driver, *args)  # the counters and the message, then a failure
        raw_pg.run(driver, "SELECT 1 / 0", {})

    monkeypatch.setattr(chat_sessions, "append_reply", failing)
    outcome = _settle(db, usage_delivery(reservation, "Hello there!"))
    assert_charged_without_the_reply(tenant, reservation, outcome)


def test_a_reply_to_a_full_or_gone_session_is_dropped_and_the_charge_kept(
    db: Database, tenant: Tenant
) -> None:
    full, gone = held_turn(tenant), held_turn(tenant)
    tiny = chat_sessions.SessionLimits(max_messages=1, max_bytes=1_000)
    outcome = asyncio.run(
        webhook_settlement.settle_delivery(
            db, replace(usage_delivery(full, "Hello there!"), session_limits=tiny)
        )
    )
    assert not outcome.duplicate
    kept = tenant.rows(hot_statements.MESSAGES, session_id=full.session_id)
    assert [m["role"] for m in kept] == ["user"]
    tenant.tx(lambda s: chat_sessions.delete_session(s, gone.session_id))
    assert not _settle(db, usage_delivery(gone, "Hello there!")).duplicate
    assert _charges(tenant, full.id) == _charges(tenant, gone.id) == 1
    assert tenant.tx(lambda s: check_books(s, tenant.company_id)) == []


@pytest.mark.parametrize("content", [None, "Hello there!"])
def test_a_lone_webhook_counted_against_a_budget_moves_it_once(
    db: Database, tenant: Tenant, content: str | None
) -> None:
    """A reservation counted against a budget settles alone through the ORM session
    on the same connection (its budgets' statements), in one transaction, whether or
    not the unit had begun: the hold leaves the budget, the charge is spent once."""
    budget_id = new_id()
    tenant.tx(
        lambda s: s.add(
            Budget(
                id=budget_id,
                company_id=tenant.company_id,
                scope="user",
                target_id=tenant.user_id,
                amount_micro=100 * HOLD,
                period="none",
                created_at=utcnow(),
                updated_at=utcnow(),
            )
        )
    )
    reservation = held_turn(tenant)
    tenant.tx(
        lambda s: budgets.hold(
            s,
            reservation_id=reservation.id,
            company_id=tenant.company_id,
            user_id=tenant.user_id,
            api_key_id=None,
            hold_micro=reservation.hold_micro,
            now=utcnow(),
        )
    )
    delivery = usage_delivery(reservation, content)
    outcome = _settle(db, delivery)
    assert not outcome.duplicate and outcome.charged_micro > 0
    assert _settle(db, replace(delivery, webhook_id="usage_again")) == settlement.DUPLICATE
    [period] = tenant.rows(BudgetPeriod.__table__, budget_id=budget_id)  # type: ignore[attr-defined]
    assert (period["held_micro"], period["spent_micro"]) == (0, outcome.charged_micro)
    assert _charges(tenant, reservation.id) == 1
    replies = len(tenant.rows(hot_statements.MESSAGES, session_id=reservation.session_id)) - 1
    assert replies == (0 if content is None else 1)
    assert tenant.tx(lambda s: budgets.check(s, tenant.company_id)) == []
    assert tenant.tx(lambda s: check_books(s, tenant.company_id)) == []
