"""Credit APIs (issue point 6): grants and adjustments with ``Idempotency-Key``,
``GET /v1/credits``, and the audit log of every money movement, on SQLite + memory
and PostgreSQL + Redis."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

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


def test_grants_are_idempotent(cp: CP) -> None:
    client, company_id = cp.owner_client("1")
    path = f"/v1/admin/companies/{company_id}/credits"
    headers = {"Idempotency-Key": "grant-42"}
    body = {"amount": "10.5", "reason": "promo"}
    first = data_of(cp.admin.post(path, json=body, headers=headers), 201)
    assert first["kind"] == "grant" and first["amount"] == "10.500000"
    assert first["reason"] == "promo" and first["company_id"] == company_id
    again = cp.admin.post(path, json=body, headers=headers)
    assert data_of(again, 201) == first
    assert again.json()["meta"]["replayed"] is True
    assert credits_of(client)["balance"] == "11.500000"
    # The same key with another body is a conflict, not a second grant.
    for other in ({"amount": "3"}, {"amount": "10.5", "reason": "other"}):
        error_of(cp.admin.post(path, json=other, headers=headers), 409, "idempotency_key_reused")
    for amount in ("1.0000001", 1.5, "abc", "0", None, "-1.5", True):
        error_of(cp.admin.post(path, json={"amount": amount}), 422, "validation_error")
    error_of(
        cp.admin.post(path, json={"amount": "1"}, headers={"Idempotency-Key": "has space"}),
        422,
        "validation_error",
    )
    error_of(
        cp.admin.post("/v1/admin/companies/nope/credits", json={"amount": "1"}), 404, "not_found"
    )
    error_of(client.post(path, json={"amount": "1"}), 403, "forbidden")  # an owner
    assert credits_of(client)["balance"] == "11.500000"

    # Concurrent twins with one key grant once.
    key = {"Idempotency-Key": "race"}
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda _: cp.admin.post(path, json={"amount": "1"}, headers=key), range(8))
        )
    assert {r.status_code for r in results} == {201}
    assert len({r.json()["data"]["id"] for r in results}) == 1
    assert sum(1 for r in results if not r.json()["meta"]["replayed"]) == 1
    assert credits_of(client)["balance"] == "12.500000"
    assert_books_balance(cp, company_id, client)


def test_adjustments_need_a_reason_and_cannot_overdraw(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    path = f"/v1/admin/companies/{company_id}/adjustments"
    up = data_of(cp.admin.post(path, json={"amount": "2.5", "reason": "goodwill"}), 201)
    assert up["kind"] == "adjustment" and up["amount"] == "2.500000"
    down = data_of(cp.admin.post(path, json={"amount": "-1.25", "reason": "double grant"}), 201)
    assert down["kind"] == "adjustment" and down["amount"] == "-1.250000"
    assert down["reason"] == "double grant" and down["company_id"] == company_id
    assert credits_of(client)["balance"] == "11.250000"

    for bad in (
        {"amount": "-1"},  # no reason
        {"amount": "-1", "reason": "   "},
        {"amount": "-1", "reason": 5},
        {"amount": "0", "reason": "nothing"},
        {"amount": "-0.0000001", "reason": "too precise"},
        {"reason": "no amount"},
    ):
        error_of(cp.admin.post(path, json=bad), 422, "validation_error")

    # A hold is taken; a debit may take what is available, never the hold itself.
    init = data_of(client.post("/v1/chat/init", json={"query": "hi", "max_tokens": 100}), 201)
    available = micro(credits_of(client)["available"])
    message = error_of(
        cp.admin.post(path, json={"amount": "-11.25", "reason": "wipe"}),
        409,
        "available_credits_exceeded",
    )
    assert "below zero" in message
    before = credits_of(client)
    assert micro(before["available"]) == available
    everything = f"-{available // 1_000_000}.{available % 1_000_000:06d}"
    data_of(cp.admin.post(path, json={"amount": everything, "reason": "wipe"}), 201)
    assert credits_of(client)["available"] == "0.000000"
    assert credits_of(client)["held"] == init["reserved_credits"]
    # The hold still settles normally afterwards.
    assert data_of(cp.webhook(usage_event(init, company_id, output_tokens=10)))["settled"]

    error_of(
        cp.admin.post("/v1/admin/companies/nope/adjustments", json={"amount": "1", "reason": "x"}),
        404,
        "not_found",
    )
    error_of(client.post(path, json={"amount": "1", "reason": "self-service"}), 403, "forbidden")
    assert_books_balance(cp, company_id, client)


def test_adjustments_honour_idempotency_keys(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    path = f"/v1/admin/companies/{company_id}/adjustments"
    key = {"Idempotency-Key": "adj-7"}
    body = {"amount": "-3", "reason": "chargeback"}
    first = cp.admin.post(path, json=body, headers=key)
    again = cp.admin.post(path, json=body, headers=key)
    assert data_of(first, 201) == data_of(again, 201)
    assert (first.json()["meta"]["replayed"], again.json()["meta"]["replayed"]) == (False, True)
    assert credits_of(client)["balance"] == "7.000000"
    error_of(
        cp.admin.post(path, json={"amount": "-4", "reason": "chargeback"}, headers=key),
        409,
        "idempotency_key_reused",
    )
    # A key belongs to one entry: the grant endpoint cannot reuse it either.
    grant_path = f"/v1/admin/companies/{company_id}/credits"
    error_of(
        cp.admin.post(grant_path, json={"amount": "3", "reason": "chargeback"}, headers=key),
        409,
        "idempotency_key_reused",
    )
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda _: cp.admin.post(
                    path, json={"amount": "-1", "reason": "race"}, headers={"Idempotency-Key": "r"}
                ),
                range(8),
            )
        )
    assert {r.status_code for r in results} == {201}
    assert len({r.json()["data"]["id"] for r in results}) == 1
    assert credits_of(client)["balance"] == "6.000000"
    assert_books_balance(cp, company_id, client)


def _audit(client: Any, **params: Any) -> dict[str, Any]:
    return dict(data_of(client.get("/v1/admin/audit", params=params)))


def test_every_money_movement_is_audited_with_actor_and_request_id(cp: CP) -> None:
    company_id = cp.company("0")
    owner = cp.user(company_id, role="owner", password=None)
    client = cp.client(cp.api_key(owner["id"]))
    base = f"/v1/admin/companies/{company_id}"
    cp.admin.post(
        f"{base}/credits",
        json={"amount": "5", "reason": "welcome"},
        headers={"X-Request-Id": "req-grant", "Idempotency-Key": "g1"},
    )
    init = data_of(
        client.post(
            "/v1/chat/init",
            json={"query": "hi", "max_tokens": 50},
            headers={"X-Request-Id": "req-init"},
        ),
        201,
    )
    event = usage_event(init, company_id, input_tokens=5, output_tokens=7)
    assert data_of(cp.webhook(event))["settled"] is True
    cp.admin.post(
        f"{base}/adjustments",
        json={"amount": "-1", "reason": "correction"},
        headers={"X-Request-Id": "req-adjust"},
    )

    # The money movements (the admin actions that set the company up are `admin.*`).
    items = [
        i
        for i in _audit(cp.admin, company_id=company_id)["items"]
        if not i["action"].startswith("admin.")
    ]
    # Newest first: the adjustment, the settlement (charge + release), the hold, the grant.
    assert items[0]["action"] == "adjustment"
    assert sorted(i["action"] for i in items[1:3]) == ["charge", "release"]
    assert [i["action"] for i in items[3:]] == ["hold", "grant"]
    stamps = [i["created_at"] for i in items]
    assert stamps == sorted(stamps, reverse=True)
    by_action = {i["action"]: i for i in items}
    assert by_action["grant"]["actor"] == "admin-token"
    assert by_action["grant"]["request_id"] == "req-grant"
    assert by_action["grant"]["details"]["idempotency_key"] == "g1"
    assert by_action["grant"]["amount"] == "5.000000"
    assert by_action["hold"]["actor"] == owner["id"]
    assert by_action["hold"]["request_id"] == "req-init"
    assert by_action["hold"]["reservation_id"] == init["reservation_id"]
    assert by_action["hold"]["amount"] == "-" + init["reserved_credits"]
    for action in ("charge", "release"):
        assert by_action[action]["actor"] == "edge-webhook"
        assert by_action[action]["request_id"] == "req-init"  # the stream's request
        assert by_action[action]["details"]["webhook_id"] == event.webhook_id
        assert by_action[action]["details"]["output_tokens"] == 7
    assert by_action["adjustment"]["actor"] == "admin-token"
    assert by_action["adjustment"]["request_id"] == "req-adjust"
    assert by_action["adjustment"]["details"]["reason"] == "correction"
    assert all(i["company_id"] == company_id for i in items)
    # Every ledger entry has its audit event, and nothing else moved money.
    entries = data_of(client.get("/v1/credits"))["entries"]
    assert sorted(e["id"] for e in entries) == sorted(
        i["details"]["ledger_entry_id"] for i in items
    )

    # Pagination, over everything (money and admin.* events).
    everything = _audit(cp.admin, company_id=company_id)["items"]
    paged: list[dict[str, Any]] = []
    cursor = None
    for _ in range(len(everything)):
        page = _audit(cp.admin, company_id=company_id, limit=2, cursor=cursor)
        paged += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert cursor is None and [i["id"] for i in paged] == [i["id"] for i in everything]

    # Who may read: the owner (its own company, by default), the admin (any or all).
    assert _audit(client)["items"] == everything
    assert _audit(client, company_id=company_id)["items"] == everything
    other_company = cp.company("1")
    error_of(client.get("/v1/admin/audit", params={"company_id": other_company}), 403, "forbidden")
    everything = _audit(cp.admin, limit=200)["items"]
    assert {i["company_id"] for i in everything} >= {company_id, other_company}
    member = cp.client(cp.api_key(cp.user(company_id, role="member", password=None)["id"]))
    error_of(member.get("/v1/admin/audit"), 403, "forbidden")
    error_of(cp.client().get("/v1/admin/audit"), 401, "unauthenticated")
    error_of(cp.admin.get("/v1/admin/audit", params={"limit": 0}), 422, "validation_error")
    error_of(cp.admin.get("/v1/admin/audit", params={"cursor": "junk!"}), 422, "validation_error")
    assert_books_balance(cp, company_id, client)


def test_grants_and_adjustments_are_admin_audit_events(cp: CP) -> None:
    """DESIGN §11: admin audit events are `admin.*`. A platform admin's grant and
    adjustment are admin actions: `GET /v1/admin/audit?kind=admin.*` shows them (once,
    a replay adds none), beside the ledger's own `grant` / `adjustment` events."""
    company_id = cp.company("0")
    base = f"/v1/admin/companies/{company_id}"
    grant_headers = {"X-Request-Id": "req-g", "Idempotency-Key": "g-admin"}
    for _ in range(2):  # the second is a replay
        grant = data_of(
            cp.admin.post(
                f"{base}/credits", json={"amount": "7", "reason": "p"}, headers=grant_headers
            ),
            201,
        )
    adjust = data_of(
        cp.admin.post(
            f"{base}/adjustments",
            json={"amount": "-2", "reason": "fix"},
            headers={"X-Request-Id": "req-a"},
        ),
        201,
    )
    admin_events = _audit(cp.admin, company_id=company_id, kind="admin.credits.*")["items"]
    by_kind = {e["kind"]: e for e in admin_events}
    assert sorted(e["kind"] for e in admin_events) == [
        "admin.credits.adjustment",
        "admin.credits.grant",
    ]
    for kind, entry, rid, amount, reason in (
        ("admin.credits.grant", grant, "req-g", "7.000000", "p"),
        ("admin.credits.adjustment", adjust, "req-a", "-2.000000", "fix"),
    ):
        event = by_kind[kind]
        assert event["actor"] == "admin-token" and event["request_id"] == rid
        assert event["target"] == f"ledger_entry:{entry['id']}"
        assert event["details"]["after"] == {"amount": amount, "reason": reason}
    # The ledger's own events stay as they were.
    ledger_kinds = [e["kind"] for e in _audit(cp.admin, company_id=company_id)["items"]]
    assert ledger_kinds.count("grant") == 1 and ledger_kinds.count("adjustment") == 1


def test_credits_endpoint_shows_balance_held_available_and_recent_ledger(cp: CP) -> None:
    client, company_id = cp.owner_client("3")
    init = data_of(client.post("/v1/chat/init", json={"query": "hi", "max_tokens": 10}), 201)
    data = data_of(client.get("/v1/credits"))
    assert set(data) == {"balance", "held", "available", "entries", "next_cursor"}
    assert data["balance"] == "3.000000" and data["held"] == init["reserved_credits"]
    assert micro(data["available"]) == 3_000_000 - micro(init["reserved_credits"])
    assert [e["kind"] for e in data["entries"]] == ["hold", "grant"]
    assert set(data["entries"][0]) == {
        "id",
        "kind",
        "amount",
        "reservation_id",
        "reason",
        "created_at",
    }
    assert data["entries"][0]["reservation_id"] == init["reservation_id"]
    assert_books_balance(cp, company_id, client)
