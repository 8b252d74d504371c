"""A lone usage webhook settled on PostgreSQL, the two ways the control plane has
settled it (`settle_webhooks` in a transaction, test_settle_raw.py;
`settle_delivery` in autocommit, test_settle_alone.py): the reservations init
writes, the deliveries the edge sends, and the scenarios both ways must pass."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy import event as sa_event

from control_plane import hot_statements, init_writes, ledger, settlement, webhook_settlement
from control_plane.books import check_books
from control_plane.errors import Conflict
from control_plane.tables import utcnow
from shared.webhooks import UsageEvent
from tests.test_init_writes import LIMITS, Tenant

HOLD = 1_000


def held_turn(tenant: Tenant) -> init_writes.NewReservation:
    """A reservation and its new session with the user's message, as init writes them."""
    reservation = tenant.reservation(HOLD)
    turn = init_writes.first_turn(
        reservation.session_id,
        tenant.company_id,
        tenant.user_id,
        [{"role": "user", "content": "hi"}],
        LIMITS,
        utcnow(),
    )
    assert tenant.tx(lambda s: init_writes.hold(s, reservation, turn))
    return reservation


def usage_delivery(
    reservation: init_writes.NewReservation, content: str | None
) -> webhook_settlement.Delivery:
    now = datetime.now(UTC)
    event = UsageEvent(
        jti=reservation.jti,
        reservation_id=reservation.id,
        company_id=reservation.company_id,
        user_id=reservation.user_id,
        session_id=reservation.session_id,
        request_id=reservation.request_id,
        model=reservation.model,
        provider=reservation.provider,
        status="completed",
        finish_reason="stop",
        input_tokens=100,
        output_tokens=200,
        usage_source="upstream",
        started_at=(now - timedelta(seconds=1)).isoformat(),
        first_token_at=None,
        ended_at=now.isoformat(),
        content=content,
    )
    return webhook_settlement.Delivery(event.webhook_id, event, transcripts=content is not None)


@contextlib.contextmanager
def through_sqlalchemy(engine: Engine) -> Iterator[list[str]]:
    """The statements `engine` runs through SQLAlchemy's execution within the block."""
    sent: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    sa_event.listen(engine, "before_cursor_execute", count)
    try:
        yield sent
    finally:
        sa_event.remove(engine, "before_cursor_execute", count)


def settle_each_id_once(
    tenant: Tenant,
    settle: Callable[[webhook_settlement.Delivery], settlement.Outcome],
    content: str | None,
) -> init_writes.NewReservation:
    """Three held turns settled by `settle` (a refusal raised): a redelivery is
    DUPLICATE; the id reused for another reservation is 409 and leaves that one
    held (its own id then settles it); an id arriving after the hold was released
    is recorded and DUPLICATE. Checks one charge and one usage row for each settled
    reservation, none for the released one, and balanced books; returns the first."""
    first, second, released = held_turn(tenant), held_turn(tenant), held_turn(tenant)
    delivery = usage_delivery(first, content)
    settled = settle(delivery)
    assert not settled.duplicate and settled.charged_micro > 0
    assert settle(delivery) == settlement.DUPLICATE

    reused = replace(usage_delivery(second, content), webhook_id=delivery.webhook_id)
    with pytest.raises(Conflict):
        settle(reused)
    [row] = tenant.rows(hot_statements.RESERVATIONS, id=second.id)
    assert row["status"] == "active"
    assert not settle(usage_delivery(second, content)).duplicate

    assert tenant.tx(lambda s: ledger.release_reservation(s, released.id, "expired", actor="t"))
    late = usage_delivery(released, content)
    assert settle(late) == settlement.DUPLICATE
    [claimed] = tenant.rows(hot_statements.WEBHOOK_EVENTS, webhook_id=late.webhook_id)
    assert claimed["reservation_id"] == released.id
    for reservation, settles in ((first, 1), (second, 1), (released, 0)):
        entries = tenant.rows(hot_statements.LEDGER, reservation_id=reservation.id)
        assert sum(1 for entry in entries if entry["kind"] == "charge") == settles
        assert len(tenant.rows(hot_statements.USAGE, reservation_id=reservation.id)) == settles
    assert tenant.tx(lambda s: check_books(s, tenant.company_id)) == []
    return first


def assert_charged_without_the_reply(
    tenant: Tenant, reservation: init_writes.NewReservation, outcome: settlement.Outcome
) -> None:
    """The reservation settled and charged (balanced books) though its reply failed to
    be written: the session as the user left it, with only the user's message."""
    assert not outcome.duplicate and outcome.charged_micro > 0
    [row] = tenant.rows(hot_statements.RESERVATIONS, id=reservation.id)
    assert row["status"] == "settled" and row["charged_micro"] == outcome.charged_micro
    [chat] = tenant.rows(hot_statements.SESSIONS, id=reservation.session_id)
    assert (chat["message_count"], chat["content_bytes"]) == (1, 6)  # the user's "hi" and its role
    messages = tenant.rows(hot_statements.MESSAGES, session_id=reservation.session_id)
    assert [m["role"] for m in messages] == ["user"]
    assert tenant.tx(lambda s: check_books(s, tenant.company_id)) == []
