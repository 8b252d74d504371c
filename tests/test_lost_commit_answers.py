"""Writes that commit while their connection dies before the answer (a lost
acknowledgement: a network cut, a proxy or PostgreSQL's backend killed right after
the commit). An init's client gets 503 and no token: nobody can stream on that hold,
so it must not stay held until the sweeper's deadline (the token's lifetime plus the
hold grace, ~22 minutes by default), during which the client's retry finds the
credits gone (402). A usage webhook's sender gets 503 and retries: the retry is a
duplicate, charged once. In-process (ASGITransport) on PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import init_writes, late_settlements, settlement_batch, webhook_settlement
from control_plane.books import check_books
from control_plane.tables import LedgerEntry, Reservation
from control_plane.usage_events import parse_usage_event
from shared.pricing import format_credits
from shared.webhooks import UsageEvent, sign
from tests.asgi_cp import new_owner as _member
from tests.asgi_cp import served as _served
from tests.inproc import eventually
from tests.lost_commits import lose_the_answer_of as _lose_the_answer_of
from tests.lost_commits import lose_the_transaction_answer_of as _lose_the_transaction_answer_of
from tests.test_control_plane import ADMIN_TOKEN, pg_settings, usage_event

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BODY = {"query": "hello", "max_tokens": 50}


@pytest.fixture(scope="module")
def settings(pg_server: str) -> Iterator[Any]:
    with pg_settings(pg_server) as value:
        yield value


def _micro(credits: str) -> int:
    whole, _, frac = credits.partition(".")
    return int(whole) * 1_000_000 + int(frac.ljust(6, "0"))


async def _new_inits(
    client: httpx.AsyncClient, count: int, credits: str = "10"
) -> tuple[dict[str, str], str, list[dict[str, Any]]]:
    """A new company with `credits`, its owner's headers, and `count` inits of theirs
    (each granted)."""
    auth, company_id = await _member(client, credits)
    inits = []
    for _ in range(count):
        r = await client.post("/v1/chat/init", json=BODY, headers=auth)
        assert r.status_code == 201, r.text
        inits.append(r.json()["data"])
    return auth, company_id, inits


async def _new_init(
    client: httpx.AsyncClient, credits: str = "10"
) -> tuple[dict[str, str], str, dict[str, Any]]:
    """A new company with `credits`, its owner's headers, and an init of theirs (granted)."""
    auth, company_id, [init] = await _new_inits(client, 1, credits)
    return auth, company_id, init


def _signed(app: Any, event: UsageEvent) -> tuple[bytes, dict[str, str]]:
    """`event`'s body and the headers signing it with the app's webhook secret."""
    body = event.body()
    return body, sign(app.state.settings.webhook_secret.reveal(), event.webhook_id, body)


async def _webhook_losing_its_answer(
    monkeypatch: pytest.MonkeyPatch,
    client: httpx.AsyncClient,
    body: bytes,
    headers: dict[str, str],
    *,
    commits: bool = True,
) -> list[str]:
    """Posts a usage webhook whose lone settlement commits (or, not `commits`, rolls
    back) and whose answer is lost (`lose_the_answer_of`): a 503. Returns what the
    cut noted."""
    cut: list[str] = []
    _lose_the_answer_of(monkeypatch, webhook_settlement, "settle_alone", cut, commits=commits)
    r = await client.post("/v1/webhooks/usage", content=body, headers=headers)
    assert r.status_code == 503, r.text
    monkeypatch.undo()
    return cut


@pytest.mark.parametrize("warm", [False, True], ids=["in-a-transaction", "autocommit"])
async def test_a_hold_committed_whose_answer_was_lost_is_given_back_at_once(
    settings: Any, monkeypatch: pytest.MonkeyPatch, warm: bool
) -> None:
    """`warm`: the company's LLM configuration is cached by an init before, so the
    lost init's one write runs alone in autocommit (no session, no COMMIT); else it
    reads the configuration through a session and its COMMIT is what is lost."""
    async with _served(settings) as (app, client):
        # The hold this body takes (deterministic), from a company of its own.
        _, _, probe = await _new_init(client)
        hold = _micro(probe["reserved_credits"])
        # Room for one such hold and a half (beside the warm-up's): the retry fits
        # only if the lost one is gone.
        credits = hold + hold // 2 + (hold if warm else 0)
        auth, company_id = await _member(client, format_credits(credits))
        if warm:
            r = await client.post("/v1/chat/init", json=BODY, headers=auth)
            assert r.status_code == 201, r.text

        counted = _money_counters(app)
        # The lost acknowledgement: init's unit commits (its one autocommit statement,
        # or its COMMIT when a session was needed), then its caller hears what a cut
        # connection says.
        cut: list[str] = []
        _lose_the_answer_of(monkeypatch, init_writes, "hold", cut)
        r = await client.post("/v1/chat/init", json=BODY, headers=auth)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "database_unavailable"
        assert cut == ["after the commit"]
        monkeypatch.undo()

        db = app.state.deps.db

        def reservations(session: Any) -> list[str]:
            stmt = select(col(Reservation.status)).where(col(Reservation.company_id) == company_id)
            return sorted(session.scalars(stmt))

        # The hold did commit: the lost answer is what is tested, not a rollback.
        assert len(await db.transaction(reservations)) == 1 + warm

        async def given_back() -> bool:
            return await db.transaction(reservations) == ["active"] * warm + ["released"]

        await eventually(given_back, "the hold whose answer was lost is released")
        r = await client.get("/v1/credits", headers=auth)
        assert _micro(r.json()["data"]["held"]) == hold * warm
        # The client's retry gets its grant (402 while the lost hold stayed held).
        r = await client.post("/v1/chat/init", json=BODY, headers=auth)
        assert r.status_code == 201, r.text

        def books(session: Any) -> tuple[list[str], list[str]]:
            kinds = session.scalars(
                select(col(LedgerEntry.kind))
                .where(col(LedgerEntry.company_id) == company_id)
                .where(col(LedgerEntry.kind).in_(["hold", "release"]))
            )
            return check_books(session, company_id), sorted(kinds)

        problems, kinds = await db.transaction(books)
        assert problems == []
        assert kinds == ["hold"] * (2 + warm) + ["release"]
        # The counters moved by the lost hold and its release, and the retry's hold:
        # reserved - charged - released is what is held.
        now = _money_counters(app)
        moved = {k: now[k] - counted[k] for k in now}
        assert moved == {"reserved": 2 * hold, "charged": 0, "released": hold}


async def test_a_settlement_committed_whose_answer_was_lost_is_a_duplicate_when_retried(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lone webhook's unit (its charge and its reply, one transaction) commits
    and its answer is lost: 503, and the edge's retry is a duplicate, charged once,
    its reply kept once."""
    async with _served(settings) as (app, client):
        auth, company_id, init = await _new_init(client)
        event = usage_event(init, company_id)
        body, headers = _signed(app, event)
        cut = await _webhook_losing_its_answer(monkeypatch, client, body, headers)
        assert cut == ["after the commit"]
        r = await client.post("/v1/webhooks/usage", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["data"] == {"duplicate": True}

        def books(session: Any) -> tuple[list[str], list[str]]:
            kinds = session.scalars(
                select(col(LedgerEntry.kind)).where(
                    col(LedgerEntry.reservation_id) == init["reservation_id"]
                )
            )
            return check_books(session, company_id), sorted(kinds)

        problems, kinds = await app.state.deps.db.transaction(books)
        assert problems == []
        assert kinds == ["charge", "hold", "release"]
        r = await client.get(f"/v1/sessions/{init['session_id']}", headers=auth)
        roles = [m["role"] for m in r.json()["data"]["messages"]]
        assert roles == ["user", "assistant"]


def _money_counters(app: Any) -> dict[str, int]:
    registry = app.state.deps.metrics.registry
    return {
        name: round(
            (registry.get_sample_value(f"llmgw_cp_credits_{name}_total") or 0.0) * 1_000_000
        )
        for name in ("reserved", "charged", "released")
    }


async def _counted_once(
    app: Any, before: dict[str, int], expected: dict[str, int], within: float = 3
) -> None:
    """The money counters moved by `expected` since `before` (within `within` s), and
    nothing more comes of it."""

    def moved() -> dict[str, int]:
        now = _money_counters(app)
        return {k: now[k] - before[k] for k in ("charged", "released")}

    await eventually(lambda: moved() == expected, f"counted: {moved()} vs {expected}", within)
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert moved() == expected


def _ledger_of(
    session: Session, company_id: str, reservation_ids: list[str]
) -> tuple[list[str], dict[str, int]]:
    """The company's books' problems (`check_books`), and the sums of the charges and
    releases on `reservation_ids` (0 where there is none)."""
    rows = session.execute(
        select(col(LedgerEntry.kind), col(LedgerEntry.amount_micro)).where(
            col(LedgerEntry.reservation_id).in_(reservation_ids),
            col(LedgerEntry.kind).in_(["charge", "release"]),
        )
    )
    sums = {"charge": 0, "release": 0}
    for kind, amount in rows:
        sums[kind] += amount
    return check_books(session, company_id), sums


async def _ledger_counted_once(
    app: Any,
    company_id: str,
    reservation_ids: list[str],
    before: dict[str, int],
    within: float = 3,
) -> None:
    """The books agree, `reservation_ids` were charged, and the money counters moved
    since `before` by what the ledger has charged and released on them, once
    (`_counted_once`)."""
    problems, ledger = await app.state.deps.db.transaction(
        lambda s: _ledger_of(s, company_id, reservation_ids)
    )
    assert problems == []
    expected = {"charged": -ledger["charge"], "released": ledger["release"]}
    assert expected["charged"] > 0
    await _counted_once(app, before, expected, within)


@pytest.mark.parametrize("commits", [True, False], ids=["committed", "rolled-back"])
async def test_a_settlement_whose_answer_was_lost_is_counted_once(
    settings: Any, monkeypatch: pytest.MonkeyPatch, commits: bool
) -> None:
    """The lone webhook's settlement commits and its answer is lost: the edge's retry
    is a duplicate, which counts nothing, and the route heard an error, so nothing
    counted its money. Before: `llmgw_cp_credits_charged_total` and `_released_total`
    moved by 0 while the ledger had the charge and the release (measured: 0 and 0
    against 18 and 89 micro-credits). Now what the lost commit settled is read back
    (its own mark, never a later delivery's) and counted once; one that rolled back
    is settled and counted by the retry alone."""
    async with _served(settings) as (app, client):
        _, company_id, init = await _new_init(client)
        event = usage_event(init, company_id, output_tokens=3)  # a charge and a release
        body, headers = _signed(app, event)
        before = _money_counters(app)
        cut = await _webhook_losing_its_answer(monkeypatch, client, body, headers, commits=commits)
        assert cut == ["after the commit" if commits else "before the commit"]
        r = await client.post("/v1/webhooks/usage", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert ("duplicate" in r.json()["data"]) is commits

        await _ledger_counted_once(app, company_id, [init["reservation_id"]], before)


async def test_a_batch_whose_answer_was_lost_is_counted_once(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two webhooks settled in one batch whose COMMIT's answer was lost: the batcher
    took it for rolled back and settled each on its own, each a duplicate then, so
    neither was counted (measured: 0 of the two settlements' charges and releases in
    the counters). Now each is counted once, from the batch's own mark."""
    async with _served(settings) as (app, client):
        deps = app.state.deps
        _, company_id, inits = await _new_inits(client, 2)
        events = [usage_event(init, company_id, output_tokens=3) for init in inits]
        deliveries = [
            webhook_settlement.Delivery(
                e.webhook_id, parse_usage_event(orjson.loads(e.body())), False
            )
            for e in events
        ]
        before = _money_counters(app)
        settled_before = _webhook_counts(app)["settled"]
        cut: list[str] = []
        _lose_the_transaction_answer_of(monkeypatch, settlement_batch, "settle_webhooks", cut)
        results = await asyncio.gather(
            *(
                deps.settler.settle(d, functools.partial(late_settlements.late, deps, d.event))
                for d in deliveries
            )
        )
        monkeypatch.undo()
        assert cut == ["after the commit"]
        assert [r.duplicate for r in results] == [True, True]  # the batch had settled them

        ids = [i["reservation_id"] for i in inits]
        await _ledger_counted_once(app, company_id, ids, before)
        # Each settlement counted `settled` once (its request, answered a duplicate
        # by the settlement alone after the batch, counts that answer).
        assert _webhook_counts(app)["settled"] - settled_before == 2


def _webhook_counts(app: Any) -> dict[str, int]:
    """The webhooks' outcomes, and how many settlements' lags were observed."""
    registry = app.state.deps.metrics.registry
    counts = {
        outcome: round(
            registry.get_sample_value("llmgw_cp_webhooks_total", {"outcome": outcome}) or 0.0
        )
        for outcome in ("settled", "duplicate", "error")
    }
    lags = registry.get_sample_value("llmgw_cp_reconciliation_lag_seconds_count") or 0.0
    return {**counts, "lags": round(lags)}


@pytest.mark.parametrize("commits", [True, False], ids=["committed", "rolled-back"])
async def test_a_settlement_whose_answer_was_lost_is_counted_settled_once(
    settings: Any, monkeypatch: pytest.MonkeyPatch, commits: bool
) -> None:
    """`llmgw_cp_webhooks_total{outcome="settled"}` counts each settlement the ledger
    has once, whether its answer reached the route or was lost. Before: a lost
    answer counted `error` and its retry `duplicate`, and `settled` never moved
    (measured: settled 0, duplicate 1, error 1 against one charge in the ledger).
    The 503 the edge heard stays counted (`error`), as the answers are."""
    async with _served(settings) as (app, client):
        _, company_id, init = await _new_init(client)
        event = usage_event(init, company_id, output_tokens=3)
        body, headers = _signed(app, event)
        before = _webhook_counts(app)
        await _webhook_losing_its_answer(monkeypatch, client, body, headers, commits=commits)
        r = await client.post("/v1/webhooks/usage", content=body, headers=headers)
        assert r.status_code == 200, r.text

        def charges(session: Any) -> int:
            stmt = select(col(LedgerEntry.id)).where(
                col(LedgerEntry.reservation_id) == init["reservation_id"],
                col(LedgerEntry.kind) == "charge",
            )
            return len(session.scalars(stmt).all())

        assert await app.state.deps.db.transaction(charges) == 1
        # Its lag observed once too: one per settlement, as `settled`.
        expected = {"settled": 1, "duplicate": 1 if commits else 0, "error": 1, "lags": 1}

        def moved() -> dict[str, int]:
            now = _webhook_counts(app)
            return {k: now[k] - before[k] for k in now}

        await eventually(lambda: moved() == expected, f"counted: {moved()} vs {expected}", 3)
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert moved() == expected
