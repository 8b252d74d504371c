"""Reconciliation (issue point 4, control-plane side): holds past their deadline are
settled from the edge's usage checkpoint, or released when there is none, and a
webhook arriving afterwards is a harmless duplicate.

The checkpoints are written straight into the app's real store (MemoryStore on
SQLite, RedisStore on PostgreSQL), exactly where the edge writes them. The
`fast` fixture runs the app's own background sweeper every 0.1 s on holds whose
deadline the test moved into the past (`_expire`: a grace shorter than the longest
stream is refused at start, issue 11.4); the `cp` fixture (defaults) drives
`sweep_expired_holds` directly for the races and the store outage."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.sweeper import sweep_expired_holds
from shared.checkpoints import ENDED_MARGIN_SECONDS, UsageCheckpoint, checkpoint_key
from shared.pricing import MICRO, cost_micro, format_credits
from shared.revocations import revocation_key
from tests.hold_sweeps import expire_hold as _expire
from tests.hold_sweeps import silence_sweep
from tests.test_control_plane import (
    CP,
    assert_books_balance,
    cp,
    credits_of,
    data_of,
    micro,
    start_cp,
    usage_event,
)
from tests.token_claims import claims_of, jti_of

__all__ = ["cp"]  # the fixture (sqlite, postgres) shared with test_control_plane

FAST = {"LLMGW_SWEEP_INTERVAL_SECONDS": "0.1"}


@pytest.fixture(params=["sqlite", "postgres"])
def fast(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    with start_cp(request, tmp_path, request.param, FAST) as handle:
        yield handle


def _init(client: httpx.Client, max_tokens: int = 200) -> dict[str, Any]:
    r = client.post("/v1/chat/init", json={"query": "hello", "max_tokens": max_tokens})
    return dict(data_of(r, 201))


def _checkpoint(
    cp: CP,
    init: dict[str, Any],
    input_tokens: int,
    output_tokens: int,
    jti: str | None = None,
    ended: bool = False,
) -> None:
    claims = claims_of(init["stream_token"])
    point = UsageCheckpoint(
        jti=jti or claims["jti"],
        reservation_id=init["reservation_id"],
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        updated_at=datetime.now(UTC).isoformat(),
        ended=ended,
    )
    store = cp.app.state.store
    cp.on_loop(lambda: store.set(checkpoint_key(init["reservation_id"]), point.dumps(), 600))


def _wait_until_reconciled(client: httpx.Client, timeout: float = 15) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        credits = credits_of(client)
        if credits["held"] == "0.000000":
            return credits
        time.sleep(0.1)
    raise AssertionError(f"the hold was not reconciled within {timeout} s")


def _cost(cp: CP, init: dict[str, Any], input_tokens: int, output_tokens: int) -> int:
    price = cp.settings.catalog.models[init["model"]].price
    return cost_micro(input_tokens, output_tokens, price)


def _ledger_actors(client: httpx.Client, reservation_id: str) -> dict[str, str]:
    items = data_of(client.get("/v1/admin/audit"))["items"]
    return {i["action"]: i["actor"] for i in items if i["reservation_id"] == reservation_id}


def _user_id(client: httpx.Client) -> str:
    return str(data_of(client.get("/v1/me"))["user"]["id"])


def test_expired_hold_is_settled_from_the_edge_checkpoint(fast: CP) -> None:
    client, company_id = fast.owner_client("10")
    init = _init(client)
    _checkpoint(fast, init, input_tokens=12, output_tokens=70)
    _expire(fast, init["reservation_id"])
    expected = _cost(fast, init, 12, 70)
    assert expected < micro(init["reserved_credits"])
    credits = _wait_until_reconciled(client)
    assert micro(credits["balance"]) == 10 * MICRO - expected
    (item,) = data_of(client.get("/v1/usage"))["items"]
    assert item["reservation_id"] == init["reservation_id"]
    assert (item["status"], item["usage_source"]) == ("failed", "estimated")
    assert (item["input_tokens"], item["output_tokens"]) == (12, 70)
    assert item["cost"] == format_credits(expected)
    assert _ledger_actors(client, init["reservation_id"]) == {
        "hold": _user_id(client),
        "charge": "sweeper",
        "release": "sweeper",
    }
    # The edge comes back and reports: a duplicate, nothing more is charged.
    late = usage_event(init, company_id, input_tokens=12, output_tokens=90)
    assert data_of(fast.webhook(late)) == {"duplicate": True}
    assert micro(credits_of(client)["balance"]) == 10 * MICRO - expected
    assert len(data_of(client.get("/v1/usage"))["items"]) == 1
    metrics = fast.client().get("/metrics").text
    assert "llmgw_cp_reconciliation_lag_seconds_count 1.0" in metrics
    assert_books_balance(fast, company_id, client)


def test_checkpoint_without_output_settles_for_nothing(fast: CP) -> None:
    client, company_id = fast.owner_client("10")
    init = _init(client)
    _checkpoint(fast, init, input_tokens=12, output_tokens=0)
    _expire(fast, init["reservation_id"])
    assert _wait_until_reconciled(client)["balance"] == "10.000000"
    (item,) = data_of(client.get("/v1/usage"))["items"]
    assert item["cost"] == "0.000000" and item["status"] == "failed"
    assert_books_balance(fast, company_id, client)


def test_checkpoint_charge_is_capped_at_the_hold(fast: CP) -> None:
    client, company_id = fast.owner_client("10")
    init = _init(client, max_tokens=5)
    _checkpoint(fast, init, input_tokens=10**6, output_tokens=10**6)
    _expire(fast, init["reservation_id"])
    credits = _wait_until_reconciled(client)
    assert micro(credits["balance"]) == 10 * MICRO - micro(init["reserved_credits"])
    assert_books_balance(fast, company_id, client)


def test_expired_hold_without_checkpoint_is_released(fast: CP) -> None:
    client, company_id = fast.owner_client("10")
    init = _init(client)
    _expire(fast, init["reservation_id"])
    assert _wait_until_reconciled(client) == {
        "balance": "10.000000",
        "held": "0.000000",
        "available": "10.000000",
    }
    assert data_of(client.get("/v1/usage"))["items"] == []
    assert _ledger_actors(client, init["reservation_id"])["release"] == "sweeper"
    late = usage_event(init, company_id, input_tokens=12, output_tokens=64)
    assert data_of(fast.webhook(late)) == {"duplicate": True}
    assert credits_of(client)["balance"] == "10.000000"
    assert_books_balance(fast, company_id, client)


def test_a_checkpoint_of_another_stream_is_not_billed(fast: CP) -> None:
    client, company_id = fast.owner_client("10")
    init = _init(client)
    _checkpoint(fast, init, input_tokens=12, output_tokens=70, jti="someone-elses-jti")
    _expire(fast, init["reservation_id"])
    assert _wait_until_reconciled(client)["balance"] == "10.000000"
    assert data_of(client.get("/v1/usage"))["items"] == []
    assert_books_balance(fast, company_id, client)


# --- direct sweeps: deadlines, races, a store outage ---------------------------------


def _sweep(cp: CP, now: datetime | None = None) -> Any:
    state = cp.app.state
    return cp.on_loop(lambda: sweep_expired_holds(state.db, state.store, state.metrics, now=now))


def test_holds_before_their_deadline_are_left_alone(cp: CP) -> None:
    client, _ = cp.owner_client("10")
    init = _init(client)
    deadline = cp.settings.token_ttl_seconds + cp.settings.hold_grace_seconds
    soon = datetime.now(UTC) + timedelta(seconds=deadline - 5)
    result = _sweep(cp, soon)
    assert (result.settled, result.released) == (0, 0)
    assert credits_of(client)["held"] == init["reserved_credits"]
    later = datetime.now(UTC) + timedelta(seconds=deadline + 5)
    assert _sweep(cp, later).released == 1


def test_an_unreachable_store_postpones_reconciliation(cp: CP) -> None:
    """Without the store we cannot know whether a checkpoint exists; releasing the
    hold would give away recorded usage, so the sweep waits for the next round."""
    client, company_id = cp.owner_client("10")
    init = _init(client)
    _checkpoint(cp, init, input_tokens=12, output_tokens=70)
    _expire(cp, init["reservation_id"])
    store = cp.app.state.store
    original = store.get

    async def down(key: str) -> bytes | None:
        raise ConnectionError("store down")

    store.get = down
    try:
        result = _sweep(cp)
    finally:
        store.get = original
    assert (result.settled, result.released) == (0, 0)
    assert credits_of(client)["held"] == init["reserved_credits"]
    assert _sweep(cp).settled == 1
    expected = _cost(cp, init, 12, 70)
    assert micro(credits_of(client)["balance"]) == 10 * MICRO - expected
    assert_books_balance(cp, company_id, client)


def test_concurrent_sweepers_and_a_late_webhook_settle_once(cp: CP) -> None:
    """Two control planes sweep the same expired hold while the edge's webhook
    arrives: exactly one of them settles it."""
    client, company_id = cp.owner_client("10")
    inits = [_init(client) for _ in range(5)]
    for init in inits:
        _checkpoint(cp, init, input_tokens=12, output_tokens=70)
        _expire(cp, init["reservation_id"])
    state = cp.app.state

    async def sweeps() -> list[Any]:
        return list(
            await asyncio.gather(
                *(sweep_expired_holds(state.db, state.store, state.metrics) for _ in range(3))
            )
        )

    results: list[Any] = []
    sweeper = threading.Thread(target=lambda: results.extend(cp.on_loop(sweeps)))
    sweeper.start()
    webhooks = [
        cp.webhook(usage_event(init, company_id, input_tokens=12, output_tokens=80))
        for init in inits
    ]
    sweeper.join(30)
    swept = sum(r.settled for r in results)
    by_webhook = sum(1 for r in webhooks if r.json()["data"].get("settled"))
    assert swept + by_webhook == len(inits)
    assert {r.status_code for r in webhooks} == {200}
    assert credits_of(client)["held"] == "0.000000"
    assert len(data_of(client.get("/v1/usage"))["items"]) == len(inits)
    assert_books_balance(cp, company_id, client)


# --- silent streams (issue 11.5): settled long before the deadline, once ----------


def test_a_silent_stream_is_settled_from_its_checkpoint_once_and_revoked(cp: CP) -> None:
    """A dead edge's stream (checkpoint unchanged for the silence limit) is settled
    before its deadline; a live one (the checkpoint moves), an ended one (its report
    is coming) and one whose checkpoint is another stream's are left alone. The
    edge's late report is a duplicate, and the token is revoked so a merely stalled
    edge stops relaying."""
    client, company_id = cp.owner_client("10")
    dead, alive, ended, foreign = (_init(client) for _ in range(4))
    _checkpoint(cp, dead, input_tokens=12, output_tokens=70)
    _checkpoint(cp, alive, input_tokens=12, output_tokens=1)
    _checkpoint(cp, foreign, input_tokens=12, output_tokens=70, jti="someone-elses-jti")
    claims = claims_of(ended["stream_token"])
    over = UsageCheckpoint(claims["jti"], ended["reservation_id"], 12, 70, "t", beat=9, ended=True)
    store = cp.app.state.store
    cp.on_loop(lambda: store.set(checkpoint_key(ended["reservation_id"]), over.dumps(), 600))
    clock, watch, sweep = silence_sweep(cp)

    assert sweep().settled == 0  # first sight of every checkpoint
    clock[0] += watch.silent_after - 0.5
    _checkpoint(cp, alive, input_tokens=12, output_tokens=2)
    assert sweep().settled == 0
    clock[0] += 0.5
    _checkpoint(cp, alive, input_tokens=12, output_tokens=3)
    assert sweep().settled == 1
    assert sweep().settled == 0  # settled once

    expected = _cost(cp, dead, 12, 70)
    (item,) = data_of(client.get("/v1/usage"))["items"]
    assert (item["reservation_id"], item["status"]) == (dead["reservation_id"], "failed")
    assert micro(credits_of(client)["balance"]) == 10 * MICRO - expected
    others = [alive, ended, foreign]
    assert micro(credits_of(client)["held"]) == sum(micro(i["reserved_credits"]) for i in others)
    dead_jti = jti_of(dead["stream_token"])
    revoked = cp.on_loop(lambda: store.get(revocation_key("jti", dead_jti, company_id)))
    assert revoked is not None
    # The edge was only slow: its report arrives afterwards and charges nothing more.
    late = usage_event(dead, company_id, input_tokens=12, output_tokens=90)
    assert data_of(cp.webhook(late)) == {"duplicate": True}
    assert micro(credits_of(client)["balance"]) == 10 * MICRO - expected
    assert_books_balance(cp, company_id, client)


def test_an_ended_stream_whose_report_never_came_is_settled_from_its_checkpoint(
    cp: CP,
) -> None:
    """An edge killed after its `ended` checkpoint and before enqueueing the report
    (the client's last events in between): the hold waited for its deadline. Now it
    is settled from the ended checkpoint (the usage the report would bill) once it
    stayed unchanged `ENDED_MARGIN_SECONDS` past the silence limit, with no report in
    the outbox; a report waiting there (a control plane that was down) wins, and the
    dead edge's report, should it come after all, is a duplicate."""
    client, company_id = cp.owner_client("10")
    lost, queued = _init(client), _init(client)
    _checkpoint(cp, lost, input_tokens=12, output_tokens=70, ended=True)
    _checkpoint(cp, queued, input_tokens=12, output_tokens=70, ended=True)
    store = cp.app.state.store
    report = usage_event(queued, company_id, input_tokens=12, output_tokens=70)
    cp.on_loop(lambda: store.outbox_put(report.webhook_id, report.body(), time.time() + 1e6))
    clock, watch, sweep = silence_sweep(cp)

    assert sweep().settled == 0  # first sight
    clock[0] += watch.silent_after + ENDED_MARGIN_SECONDS - 0.5
    assert sweep().settled == 0  # the report may still be on its way
    clock[0] += 0.5
    assert sweep().settled == 1
    clock[0] += 3600
    assert sweep().settled == 0  # the queued report's hold is left to it

    expected = _cost(cp, lost, 12, 70)
    (item,) = data_of(client.get("/v1/usage"))["items"]
    assert (item["reservation_id"], micro(item["cost"])) == (lost["reservation_id"], expected)
    assert micro(credits_of(client)["held"]) == micro(queued["reserved_credits"])
    late = usage_event(lost, company_id, input_tokens=12, output_tokens=70)
    assert data_of(cp.webhook(late)) == {"duplicate": True}
    assert data_of(cp.webhook(report)).get("duplicate") is not True  # the queued one
    assert micro(credits_of(client)["balance"]) == 10 * MICRO - 2 * expected
    assert micro(credits_of(client)["held"]) == 0
    assert_books_balance(cp, company_id, client)
