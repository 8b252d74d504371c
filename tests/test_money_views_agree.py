"""Every view of the money agrees with the ledger (DESIGN §8, §9, §11): a mix of
streams settled every way there is (webhooks alone and in a batch, a duplicate, the
sweeper from a checkpoint and at the deadline, a fallback, cache-priced tokens,
failures before and after the first token, a whole answer billed as failed) through
a real control plane (SQLite + memory store, PostgreSQL + Redis); then the usage
records, the ledger, the balance, the budget's `spent`, the console's aggregates and
the Prometheus counters must all tell the same sum."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlmodel import col

from control_plane import abandoned_holds
from control_plane.sweeper import sweep_expired_holds
from control_plane.tables import LedgerEntry, Reservation, UsageRecord
from shared.checkpoints import UsageCheckpoint, checkpoint_key
from shared.pricing import MICRO
from tests.hold_sweeps import expire_hold as _expire
from tests.test_control_plane import CP, assert_books_balance, cp, credits_of, data_of, micro
from tests.test_control_plane import usage_event as event_of
from tests.token_claims import claims_of

__all__ = ["cp"]

COUNTERS = ("charged", "reserved", "released")


def _counters(cp: CP) -> dict[str, float]:
    text = httpx.get(f"{cp.url}/metrics").text
    found: dict[str, float] = {}
    for name in COUNTERS:
        match = re.search(rf"^llmgw_cp_credits_{name}_total (\S+)$", text, re.M)
        found[name] = float(match.group(1)) if match else 0.0
    holds = re.search(r"^llmgw_cp_holds_active (\S+)$", text, re.M)
    found["holds"] = float(holds.group(1)) if holds else 0.0
    return found


def _init(client: httpx.Client, model: str = "mock-fast") -> dict[str, Any]:
    body = {"model": model, "query": "hello", "max_tokens": 200}
    return dict(data_of(client.post("/v1/chat/init", json=body), 201))


def _checkpoint(cp: CP, init: dict[str, Any], output_tokens: int, model: str | None) -> None:
    point = UsageCheckpoint(
        jti=claims_of(init["stream_token"])["jti"],
        reservation_id=init["reservation_id"],
        input_tokens=12,
        output_tokens=output_tokens,
        updated_at=datetime.now(UTC).isoformat(),
        model=model,
    )
    store = cp.app.state.store
    cp.on_loop(lambda: store.set(checkpoint_key(init["reservation_id"]), point.dumps(), 600))


def _all(client: httpx.Client, path: str, key: str, **params: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = {**params, "limit": "100", **({"cursor": cursor} if cursor else {})}
        data = data_of(client.get(path, params=query))
        items += data[key]
        cursor = data["next_cursor"]
        if cursor is None:
            return items


def test_usage_ledger_balance_budget_summary_and_metrics_agree(cp: CP) -> None:
    company_id = cp.company("10")
    owner = cp.user(company_id, password=None)
    client = cp.client(cp.api_key(owner["id"]))
    chain = {"models": {"mock-fast": {"fallbacks": ["gpt-4o-mini"]}}}
    put = client.put(f"/v1/admin/companies/{company_id}/providers/mock", json=chain)
    assert put.status_code == 200, put.text
    budget = {"scope": "user", "target_id": owner["id"], "amount": "5", "period": "none"}
    made = client.post(f"/v1/admin/companies/{company_id}/budgets", json=budget)
    assert made.status_code == 201, made.text
    before = _counters(cp)

    completed, cancelled, failed_early, failed_late = (_init(client) for _ in range(4))
    whole, fallback, swept, deadline, late_webhook = (_init(client) for _ in range(5))
    cached = _init(client, "mock-vision")
    batch = [_init(client) for _ in range(6)]

    def report(init: dict[str, Any], **changes: Any) -> Any:
        return event_of(init, company_id, **changes)

    events = [
        report(completed, output_tokens=64),
        report(cancelled, status="cancelled", finish_reason=None, output_tokens=5),
        report(failed_early, status="failed", finish_reason=None, output_tokens=0, content=None),
        report(failed_late, status="failed", finish_reason=None, output_tokens=7),
        # A whole answer that failed once generated (`completion.bill_unread`).
        report(
            whole,
            status="failed",
            finish_reason=None,
            output_tokens=33,
            usage_source="estimated",
            content=None,
        ),
        report(
            fallback,
            model="gpt-4o-mini",
            provider="openai",
            fallback_from="mock-fast",
            output_tokens=21,
        ),
        report(
            cached, input_tokens=40, cached_input_tokens=27, cache_write_tokens=3, output_tokens=11
        ),
    ]
    for event in events:
        assert data_of(cp.webhook(event))["settled"] is True
    assert data_of(cp.webhook(events[0])) == {"duplicate": True}

    # A batch: concurrent deliveries the settler takes together, each also twice.
    batch_events = [report(init, output_tokens=3 + i) for i, init in enumerate(batch)]
    barrier = threading.Barrier(len(batch_events) * 2)

    def deliver(event: Any) -> httpx.Response:
        barrier.wait()
        return cp.webhook(event)

    with ThreadPoolExecutor(len(batch_events) * 2) as pool:
        answers = [data_of(r) for r in pool.map(deliver, batch_events * 2)]
    assert sum(1 for a in answers if a.get("settled")) == len(batch_events)

    # The sweeper: one stream from its checkpoint (served by the fallback), one hold
    # released at its deadline, one settled from its checkpoint before its webhook.
    _checkpoint(cp, swept, 17, "gpt-4o-mini")
    _checkpoint(cp, late_webhook, 9, None)
    for init in (swept, deadline, late_webhook):
        _expire(cp, init["reservation_id"])
    state = cp.app.state
    swept_result = cp.on_loop(lambda: sweep_expired_holds(state.db, state.store, state.metrics))
    assert (swept_result.settled, swept_result.released) == (2, 1)
    assert data_of(cp.webhook(report(late_webhook, output_tokens=30))) == {"duplicate": True}

    after = _counters(cp)
    usage = _all(client, "/v1/usage", "items")
    entries = _all(client, "/v1/credits", "entries")
    credits = credits_of(client)
    sums = {
        kind: sum(micro(e["amount"]) for e in entries if e["kind"] == kind)
        for kind in ("grant", "hold", "charge", "release")
    }
    charged = -sums["charge"]

    # Each settled stream once in usage, with the model that served it.
    settled = [completed, cancelled, failed_early, failed_late, whole, fallback, cached,
               *batch, swept, late_webhook]  # fmt: skip
    by_reservation = {r["reservation_id"]: r for r in usage}
    assert len(usage) == len(by_reservation) == len(settled)
    assert set(by_reservation) == {i["reservation_id"] for i in settled}
    assert by_reservation[fallback["reservation_id"]]["model"] == "gpt-4o-mini"
    assert by_reservation[swept["reservation_id"]]["model"] == "gpt-4o-mini"
    assert by_reservation[cached["reservation_id"]]["model"] == "mock-vision"
    assert by_reservation[completed["reservation_id"]]["model"] == "mock-fast"

    # Σ usage cost == Σ charges == the balance's fall == the budget's spent.
    assert sum(micro(r["cost"]) for r in usage) == charged > 0
    assert sums["grant"] - micro(credits["balance"]) == charged
    assert credits["held"] == "0.000000"
    me = data_of(client.get("/v1/me"))["credits"]
    assert (me["balance"], me["held"]) == (credits["balance"], credits["held"])
    [standing] = data_of(cp.admin.get(f"/v1/admin/companies/{company_id}/budgets"))["items"]
    assert micro(standing["spent"]) == charged
    assert standing["held"] == "0.000000"

    # The Prometheus counters moved by exactly the ledger's amounts.
    assert round((after["charged"] - before["charged"]) * MICRO) == charged
    assert round((after["reserved"] - before["reserved"]) * MICRO) == -sums["hold"]
    assert round((after["released"] - before["released"]) * MICRO) == sums["release"]
    assert sums["hold"] + sums["release"] + charged == 0

    # The console's aggregates: the same sum whichever way they are grouped.
    for group_by in ("", "day", "model", "user", "day,model,user", "api_key"):
        items = _all(client, "/v1/usage/summary", "items", group_by=group_by)
        assert sum(micro(i["cost"]) for i in items) == charged, group_by
        assert sum(i["streams"] for i in items) == len(settled), group_by
    per_model = {
        i["model"]: i for i in _all(client, "/v1/usage/summary", "items", group_by="model")
    }
    for model, item in per_model.items():
        records = [r for r in usage if r["model"] == model]
        assert item["streams"] == len(records)
        assert micro(item["cost"]) == sum(micro(r["cost"]) for r in records)
    assert_books_balance(cp, company_id, client)


def test_a_streams_usage_record_is_dated_the_instant_of_its_charge(cp: CP) -> None:
    """The console's days (`GET /v1/usage/summary?group_by=day`) come from the usage
    records, the ledger's from the charge entries: written in one transaction, they
    must carry one instant, or a stream settled across midnight UTC is on one day in
    the summary and on the next (or the day before) in the ledger. Before, the record
    took its own clock reading after the flip and the budgets' statements (measured:
    every record some 100 µs to ms after its charge), alone, in a batch and by the
    sweeper alike."""
    client, company_id = cp.owner_client("10")
    alone = _init(client)
    batch = [_init(client) for _ in range(4)]
    swept = _init(client)
    assert data_of(cp.webhook(event_of(alone, company_id, output_tokens=4)))["settled"]
    barrier = threading.Barrier(len(batch))

    def deliver(init: dict[str, Any]) -> httpx.Response:
        barrier.wait()
        return cp.webhook(event_of(init, company_id, output_tokens=6))

    with ThreadPoolExecutor(len(batch)) as pool:
        assert all(data_of(r)["settled"] for r in pool.map(deliver, batch))
    _checkpoint(cp, swept, 8, None)
    _expire(cp, swept["reservation_id"])
    state = cp.app.state
    assert cp.on_loop(lambda: sweep_expired_holds(state.db, state.store, state.metrics)).settled
    db = cp.app.state.db

    def instants(session: Any) -> list[tuple[Any, Any]]:
        rows = session.execute(
            select(col(UsageRecord.created_at), col(LedgerEntry.created_at))
            .join(LedgerEntry, col(LedgerEntry.reservation_id) == col(UsageRecord.reservation_id))
            .where(col(UsageRecord.company_id) == company_id, col(LedgerEntry.kind) == "charge")
        )
        return [tuple(row) for row in rows]

    pairs = cp.on_loop(lambda: db.transaction(instants))
    assert len(pairs) == 6
    gaps = [(record - charge).total_seconds() for record, charge in pairs]
    assert gaps == [0.0] * len(pairs)


def test_holds_an_init_gives_back_are_counted_as_the_ledger_has_them(
    cp: CP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An init that holds, then fails (its stash: the store is down), gives its hold
    back: the ledger has a hold and a release. Before, ``llmgw_cp_credits_reserved``
    counted a hold only once init answered 201, and none of init's own releases
    (stash failed, 429 ``tpm_exceeded``, a cancelled or abandoned init) counted in
    ``_released``. Both missing, the two cancelled out, until such a give-back
    failed too (the database blinking with the store): the hold then stayed held
    (measured: ``held`` 0.000407 while reserved - charged - released said 0) and
    the sweeper's release at its deadline counted it in ``_released`` (then -0.000407
    against 0 held: credits released that were never reserved). Now each hold counts
    once it commits, each release once it commits: the counters move by exactly the
    ledger's entries at every moment."""
    client, company_id = cp.owner_client("10")
    store, db = cp.app.state.store, cp.app.state.db
    before = _counters(cp)

    async def store_down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("store down")

    def database_blinks(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("UPDATE reservations", {}, Exception("connection reset"))

    body = {"model": "mock-fast", "query": "hello", "max_tokens": 200}
    monkeypatch.setattr(store, "set", store_down)
    refused = client.post("/v1/chat/init", json=body)
    assert refused.status_code == 503, refused.text  # given back at once
    monkeypatch.setattr(abandoned_holds, "release_reservation", database_blinks)
    stuck = client.post("/v1/chat/init", json=body)
    assert stuck.status_code >= 500, stuck.text  # its give-back failed: held
    monkeypatch.undo()

    def ledger(session: Any) -> dict[str, int]:
        rows = session.execute(
            select(col(LedgerEntry.kind), col(LedgerEntry.amount_micro)).where(
                col(LedgerEntry.company_id) == company_id
            )
        )
        sums: dict[str, int] = {"hold": 0, "charge": 0, "release": 0}
        for kind, amount in rows:
            if kind in sums:
                sums[kind] += amount
        return sums

    def agree() -> None:
        now = _counters(cp)
        moved = {k: round((now[k] - before[k]) * MICRO) for k in COUNTERS}
        sums = cp.on_loop(lambda: db.transaction(ledger))
        held = micro(credits_of(client)["held"])
        assert (moved["reserved"], moved["charged"], moved["released"]) == (
            -sums["hold"],
            -sums["charge"],
            sums["release"],
        )
        assert moved["reserved"] - moved["charged"] - moved["released"] == held

    agree()
    [stuck_id] = cp.on_loop(
        lambda: db.transaction(
            lambda s: list(
                s.scalars(
                    select(col(Reservation.id)).where(
                        col(Reservation.company_id) == company_id,
                        col(Reservation.status) == "active",
                    )
                )
            )
        )
    )
    _expire(cp, stuck_id)
    state = cp.app.state
    swept = cp.on_loop(lambda: sweep_expired_holds(state.db, state.store, state.metrics))
    assert swept.released == 1
    assert credits_of(client)["held"] == "0.000000"
    agree()
