"""Settlement happens exactly once per reservation, whatever arrives (issue point 3):
one test per delivery pattern, each on SQLite + memory and on PostgreSQL + Redis,
over real HTTP with correctly signed webhooks."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select
from sqlmodel import col

from control_plane.sweeper import sweep_expired_holds
from control_plane.tables import AuditEvent, LedgerEntry
from shared.pricing import MICRO, cost_micro, format_credits
from tests.hold_sweeps import expire_hold as _expire
from tests.test_control_plane import (
    CP,
    assert_books_balance,
    cp,
    credits_of,
    data_of,
    error_of,
    micro,
    usage_event,
)

__all__ = ["cp"]  # the fixture (sqlite, postgres) shared with test_control_plane


def _init(client: httpx.Client, query: str = "hello", max_tokens: int = 200) -> dict[str, Any]:
    return dict(
        data_of(client.post("/v1/chat/init", json={"query": query, "max_tokens": max_tokens}), 201)
    )


def _cost(cp: CP, init: dict[str, Any], input_tokens: int, output_tokens: int) -> int:
    price = cp.settings.catalog.models[init["model"]].price
    return cost_micro(input_tokens, output_tokens, price)


def _rows(cp: CP, reservation_id: str) -> tuple[list[LedgerEntry], list[AuditEvent]]:
    db = cp.app.state.db

    def read(session: Any) -> tuple[list[LedgerEntry], list[AuditEvent]]:
        entries = session.scalars(
            select(LedgerEntry).where(col(LedgerEntry.reservation_id) == reservation_id)
        )
        events = session.scalars(
            select(AuditEvent).where(col(AuditEvent.reservation_id) == reservation_id)
        )
        return list(entries), list(events)

    rows: tuple[list[LedgerEntry], list[AuditEvent]] = cp.on_loop(lambda: db.transaction(read))
    return rows


def _kinds(cp: CP, reservation_id: str) -> list[str]:
    return sorted(e.kind for e in _rows(cp, reservation_id)[0])


def _sweep(cp: CP) -> Any:
    state = cp.app.state
    return cp.on_loop(lambda: sweep_expired_holds(state.db, state.store, state.metrics))


def _deliver_concurrently(
    cp: CP, event: Any, webhook_ids: list[str | None]
) -> list[httpx.Response]:
    barrier = threading.Barrier(len(webhook_ids))

    def deliver(webhook_id: str | None) -> httpx.Response:
        barrier.wait()
        return cp.webhook(event, webhook_id=webhook_id)

    with ThreadPoolExecutor(len(webhook_ids)) as pool:
        return list(pool.map(deliver, webhook_ids))


def _assert_charged_once(
    cp: CP, client: httpx.Client, company_id: str, init: dict[str, Any], cost: int
) -> None:
    credits = credits_of(client)
    assert credits["held"] == "0.000000"
    assert micro(credits["balance"]) == 10 * MICRO - cost
    assert _kinds(cp, init["reservation_id"]) == ["charge", "hold", "release"]
    assert len(data_of(client.get("/v1/usage"))["items"]) == 1
    assert_books_balance(cp, company_id, client)


def test_sequential_duplicate_webhook_charges_once(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    init = _init(client)
    event = usage_event(init, company_id, input_tokens=12, output_tokens=64)
    cost = _cost(cp, init, 12, 64)
    assert data_of(cp.webhook(event)) == {"settled": True, "charged": format_credits(cost)}
    for _ in range(3):
        assert data_of(cp.webhook(event)) == {"duplicate": True}
    _assert_charged_once(cp, client, company_id, init, cost)
    # Charge and release landed together (one transaction, one instant), by the webhook.
    entries, events = _rows(cp, init["reservation_id"])
    amounts = {e.kind: e.amount_micro for e in entries}
    hold = micro(init["reserved_credits"])
    assert amounts == {"hold": -hold, "charge": -cost, "release": hold - cost}
    assert len({e.created_at for e in entries if e.kind != "hold"}) == 1
    by_action = {e.action: e for e in events}
    assert by_action["charge"].actor == "edge-webhook"
    assert by_action["charge"].details["webhook_id"] == event.webhook_id
    assert by_action["charge"].request_id == event.request_id
    assert by_action["hold"].actor == event.user_id


def test_concurrent_duplicates_with_the_same_webhook_id_charge_once(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    init = _init(client)
    event = usage_event(init, company_id, input_tokens=100, output_tokens=150)
    results = _deliver_concurrently(cp, event, [None] * 20)
    assert {r.status_code for r in results} == {200}, [r.text for r in results]
    assert sum(1 for r in results if r.json()["data"].get("settled")) == 1
    _assert_charged_once(cp, client, company_id, init, _cost(cp, init, 100, 150))


def test_concurrent_duplicates_with_different_webhook_ids_charge_once(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    init = _init(client)
    event = usage_event(init, company_id, input_tokens=100, output_tokens=150)
    results = _deliver_concurrently(cp, event, [f"usage_twin_{i}" for i in range(20)])
    assert {r.status_code for r in results} == {200}, [r.text for r in results]
    assert sum(1 for r in results if r.json()["data"].get("settled")) == 1
    _assert_charged_once(cp, client, company_id, init, _cost(cp, init, 100, 150))


def test_two_different_webhook_ids_for_one_reservation_charge_once(cp: CP) -> None:
    """E.g. the edge and the LLM service both report the stream: the first report
    wins; the second, even with other token counts, is a duplicate."""
    client, company_id = cp.owner_client("10")
    init = _init(client)
    first = usage_event(init, company_id, input_tokens=12, output_tokens=64)
    second = replace(first, output_tokens=100, usage_source="estimated")
    assert data_of(cp.webhook(first, webhook_id="usage_from_edge"))["settled"] is True
    assert data_of(cp.webhook(second, webhook_id="usage_from_llm_service")) == {"duplicate": True}
    _assert_charged_once(cp, client, company_id, init, _cost(cp, init, 12, 64))


def test_webhook_for_an_expired_hold_not_yet_swept_settles_it(cp: CP) -> None:
    """Past its deadline but still active: the real report beats any checkpoint."""
    client, company_id = cp.owner_client("10")
    init = _init(client)
    _expire(cp, init["reservation_id"])
    event = usage_event(init, company_id, input_tokens=12, output_tokens=64)
    assert data_of(cp.webhook(event))["settled"] is True
    assert _sweep(cp).settled == _sweep(cp).released == 0
    _assert_charged_once(cp, client, company_id, init, _cost(cp, init, 12, 64))


def test_webhook_after_the_expired_hold_was_released_is_a_duplicate(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    init = _init(client)
    _expire(cp, init["reservation_id"])
    assert _sweep(cp).released == 1
    assert credits_of(client) == {
        "balance": "10.000000",
        "held": "0.000000",
        "available": "10.000000",
    }
    late = usage_event(init, company_id, input_tokens=12, output_tokens=64)
    assert data_of(cp.webhook(late)) == {"duplicate": True}
    assert data_of(cp.webhook(late, webhook_id="usage_retry")) == {"duplicate": True}
    assert credits_of(client)["balance"] == "10.000000"
    assert _kinds(cp, init["reservation_id"]) == ["hold", "release"]
    assert data_of(client.get("/v1/usage"))["items"] == []
    assert_books_balance(cp, company_id, client)


def test_out_of_order_webhooks_for_two_reservations_each_settle_once(cp: CP) -> None:
    """A's stream ended first but its webhook arrives last (an outbox retry), and
    then both are redelivered: each reservation is charged its own cost, once."""
    client, company_id = cp.owner_client("10")
    a, b = _init(client, "first"), _init(client, "second")
    now = datetime.now(UTC)
    earlier = (now - timedelta(seconds=5)).isoformat()
    event_a = usage_event(a, company_id, input_tokens=10, output_tokens=20, ended_at=earlier)
    event_b = usage_event(
        b, company_id, input_tokens=30, output_tokens=40, ended_at=now.isoformat()
    )
    cost_a, cost_b = _cost(cp, a, 10, 20), _cost(cp, b, 30, 40)
    assert data_of(cp.webhook(event_b))["charged"] == format_credits(cost_b)
    assert data_of(cp.webhook(event_a))["charged"] == format_credits(cost_a)
    for event in (event_b, event_a):
        assert data_of(cp.webhook(event)) == {"duplicate": True}
    assert micro(credits_of(client)["balance"]) == 10 * MICRO - cost_a - cost_b
    assert credits_of(client)["held"] == "0.000000"
    costs = {i["reservation_id"]: i["cost"] for i in data_of(client.get("/v1/usage"))["items"]}
    assert costs == {
        a["reservation_id"]: format_credits(cost_a),
        b["reservation_id"]: format_credits(cost_b),
    }
    assert_books_balance(cp, company_id, client)


def test_cancelled_webhook_after_the_completed_one_is_a_duplicate(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    init = _init(client)
    completed = usage_event(init, company_id, input_tokens=12, output_tokens=64)
    cancelled = replace(completed, status="cancelled", finish_reason=None, output_tokens=30)
    assert data_of(cp.webhook(completed))["settled"] is True
    # The stable id (usage_<jti>) and another id: both find the stream settled.
    assert data_of(cp.webhook(cancelled)) == {"duplicate": True}
    assert data_of(cp.webhook(cancelled, webhook_id="usage_cancel")) == {"duplicate": True}
    (item,) = data_of(client.get("/v1/usage"))["items"]
    assert item["status"] == "completed" and item["output_tokens"] == 64
    _assert_charged_once(cp, client, company_id, init, _cost(cp, init, 12, 64))


def test_a_webhook_id_reused_for_another_reservation_is_refused(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    a, b = _init(client, "a"), _init(client, "b")
    assert data_of(cp.webhook(usage_event(a, company_id), webhook_id="usage_x"))["settled"]
    error_of(cp.webhook(usage_event(b, company_id), webhook_id="usage_x"), 409, "conflict")
    assert credits_of(client)["held"] == b["reserved_credits"]
    assert data_of(cp.webhook(usage_event(b, company_id)))["settled"] is True
    assert_books_balance(cp, company_id, client)
