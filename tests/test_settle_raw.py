"""Settlement on the psycopg connection (issue 14.2, second round): what a lone
webhook sends, that nothing of it is prepared behind PgBouncer, and that a failed
transcript still rolls back to its plain savepoint and keeps the charge."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from control_plane import (
    chat_sessions,
    hot_statements,
    raw_pg,
    settlement,
    webhook_settlement,
)
from control_plane.books import check_books
from control_plane.db import create_sync_engine
from control_plane.errors import AppError
from control_plane.migrate import upgrade
from tests.ledger_db import migrated_sessions
from tests.lone_webhooks import (
    assert_charged_without_the_reply,
    held_turn,
    settle_each_id_once,
    through_sqlalchemy,
    usage_delivery,
)
from tests.test_init_writes import LIMITS, Tenant


def _settle(tenant: Tenant, delivery: webhook_settlement.Delivery) -> settlement.Outcome:
    """A lone delivery as the webhook route settles it (`settle_delivery`): a batch
    of one in its own transaction, its refusal raised once that has ended."""
    one = replace(delivery, session_limits=LIMITS)
    [result] = tenant.tx(lambda s: webhook_settlement.settle_webhooks(s, [one]))
    if isinstance(result, AppError):
        raise result
    return result


@pytest.fixture
def tenant(migrated_pg_url: str) -> Iterator[Tenant]:
    with migrated_sessions(migrated_pg_url) as sessions:
        yield Tenant(sessions)


@pytest.mark.parametrize("content", [None, "Hello there!"])
def test_a_lone_webhook_sends_its_statements_on_the_driver(
    tenant: Tenant, content: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No budget, no transcript: two statements (the reservation; the webhook id
    with the flip, the money and the rows), none through SQLAlchemy's execution; a
    transcript adds its savepoint, the counters' UPDATE and the message."""
    reservation = held_turn(tenant)
    sent: list[str] = []
    real_run = raw_pg.run

    def run(driver: Any, sql: str, params: Any) -> list[Any]:
        sent.append(sql.split(" ", 1)[0])
        return real_run(driver, sql, params)

    monkeypatch.setattr(raw_pg, "run", run)
    with through_sqlalchemy(tenant.sessions.kw["bind"]) as elsewhere:
        outcome = _settle(tenant, usage_delivery(reservation, content))
    assert not outcome.duplicate and outcome.charged_micro > 0
    expected = ["SELECT", "WITH"]
    assert sent == (expected if content is None else [*expected, "SAVEPOINT", "UPDATE", "INSERT"])
    assert elsewhere == []
    messages = tenant.rows(hot_statements.MESSAGES, session_id=reservation.session_id)
    assert sorted((m["seq"], m["role"]) for m in messages) == (
        [(1, "user")] if content is None else [(1, "user"), (2, "assistant")]
    )
    assert tenant.tx(lambda s: check_books(s, tenant.company_id)) == []


def test_a_lone_webhook_claims_its_id_in_the_flip_and_settles_only_a_new_id(
    tenant: Tenant,
) -> None:
    """The lone webhook's one statement records its id and settles only if the id is
    new: a redelivery is DUPLICATE, the id reused for another reservation is 409 and
    leaves that one held (its own id then settles it), an id arriving after the
    hold was released is recorded and DUPLICATE; nothing is charged twice."""
    settle_each_id_once(tenant, lambda delivery: _settle(tenant, delivery), None)


@pytest.mark.parametrize("same_id", [True, False])
def test_concurrent_lone_webhooks_for_one_reservation_charge_once(
    tenant: Tenant, same_id: bool
) -> None:
    """Two lone deliveries of one stream in two transactions at once (the same id,
    or two ids): the one statement of each claims, then flips; the second waits on
    the first's id or row lock and then settles nothing. One charge, books balanced."""
    reservation = held_turn(tenant)
    first = usage_delivery(reservation, None)
    second = (
        first
        if same_id
        else webhook_settlement.Delivery("usage_other", first.event, transcripts=False)
    )
    start = threading.Barrier(2)

    def settle(delivery: webhook_settlement.Delivery) -> settlement.Outcome:
        start.wait()
        return _settle(tenant, delivery)

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(settle, [first, second]))
    assert sorted(o.duplicate for o in outcomes) == [False, True]
    entries = tenant.rows(hot_statements.LEDGER, reservation_id=reservation.id)
    assert sorted(e["kind"] for e in entries) == ["charge", "hold", "release"]
    assert len(tenant.rows(hot_statements.USAGE, reservation_id=reservation.id)) == 1
    assert tenant.tx(lambda s: check_books(s, tenant.company_id)) == []


def test_a_failed_transcript_rolls_back_to_its_savepoint_and_keeps_the_charge(
    tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    reservation = held_turn(tenant)
    real_append = chat_sessions.append_replies

    def failing(session: Session, replies: Any) -> Any:
        real_append(session, replies)  # the counters and the message, then a failure
        driver = raw_pg.driver_connection(session)
        assert driver is not None
        raw_pg.run(driver, "SELECT 1 / 0", {})

    monkeypatch.setattr(chat_sessions, "append_replies", failing)
    outcome = _settle(tenant, usage_delivery(reservation, "Hello there!"))
    assert_charged_without_the_reply(tenant, reservation, outcome)


@pytest.mark.parametrize("pgbouncer", [False, True])
def test_behind_pgbouncer_settlement_is_never_prepared(
    migrated_pg_url: str, pgbouncer: bool
) -> None:
    upgrade(migrated_pg_url)
    engine = create_sync_engine(migrated_pg_url, pool_size=1, pgbouncer=pgbouncer)
    try:
        tenant = Tenant(sessionmaker(engine, expire_on_commit=False))
        for _ in range(7):  # past psycopg's prepare threshold (db.PG_PREPARE_THRESHOLD)
            delivery = usage_delivery(held_turn(tenant), "Hello there!")
            assert not _settle(tenant, delivery).duplicate
        prepared = tenant.tx(
            lambda s: s.execute(
                text(
                    "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE "
                    "'%webhook_events%' OR statement LIKE '%flipped%' "
                    "OR statement LIKE '%chat_sessions AS s%'"
                )
            ).scalar_one()
        )
        assert (prepared == 0) is pgbouncer
    finally:
        engine.dispose()


def test_a_batch_sends_as_many_statements_on_the_driver_whatever_its_size(
    tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of 2 and one of 8 (arrays, not scalars) send the same statements."""
    sent: list[list[str]] = []
    real_run = raw_pg.run

    def run(driver: Any, sql: str, params: Any) -> list[Any]:
        sent[-1].append(sql.split(" ", 1)[0])
        return real_run(driver, sql, params)

    monkeypatch.setattr(raw_pg, "run", run)
    for size in (2, 8):
        deliveries = [usage_delivery(held_turn(tenant), "Hello there!") for _ in range(size)]
        sent.append([])
        outcomes = tenant.tx(lambda s, d=deliveries: webhook_settlement.settle_webhooks(s, d))
        assert all(isinstance(o, settlement.Outcome) and not o.duplicate for o in outcomes)
    assert sent[0] == sent[1]
    assert len(sent[0]) == 7  # as a lone webhook with a transcript
    assert tenant.tx(lambda s: check_books(s, tenant.company_id)) == []


def test_a_statement_derived_from_a_missing_anchor_fails_loudly() -> None:
    # The lone webhook's statement is derived by substitution: a renamed anchor must
    # not silently drop its `EXISTS (claimed)` gate or its rows.
    assert raw_pg.substituted("WHERE a AND b", "a", "a AND c") == "WHERE a AND c AND b"
    with pytest.raises(ValueError, match="lacks"):
        raw_pg.substituted("WHERE a", "r.status = 'active'", "x")
