"""Usage webhooks settled in batches (issue 14.2) stay exactly once: duplicates
inside one batch charge once, an event refused on its own fails only itself, and a
batch is one transaction. In-process (ASGITransport), on SQLite + memory and on
PostgreSQL + Redis, one app per module."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text
from sqlmodel import col

from control_plane.books import check_books
from control_plane.db import Database, DatabaseTimeout
from control_plane.errors import (
    Conflict,
    ModelNotInChain,
    ReservationMismatch,
    ReservationNotFound,
)
from control_plane.ledger import charge_for, release_reservation, reservation_price
from control_plane.settlement import Outcome
from control_plane.settlement_batch import SettlementBatcher
from control_plane.tables import LedgerEntry, Reservation
from control_plane.webhook_settlement import Delivery
from shared.webhooks import sign
from tests.asgi_cp import new_owner as _owner
from tests.asgi_cp import pg_app_client
from tests.asgi_cp import served as _served
from tests.inproc import eventually
from tests.test_control_plane import _settings, pg_settings, usage_event

__all__ = ["pg_app_client"]  # the fixture, used by name


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def settings_env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    if request.param == "sqlite":
        yield _settings(f"sqlite:///{tmp_path_factory.mktemp('batch')}/cp.db")
        return
    with pg_settings(request.getfixturevalue("pg_server")) as settings:
        yield settings


class Counting:
    """The app's `Database`, counting the transactions it runs; everything else
    (a lone delivery's `unit`, `postgres`) is the database's own, so the settlement
    takes the path it takes in production."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.transactions = 0

    async def transaction(self, fn: Any, **kwargs: Any) -> Any:
        self.transactions += 1
        return await self.db.transaction(fn, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


async def _company_rows(
    app: Any, company_id: str
) -> tuple[dict[str, Reservation], list[LedgerEntry], list[str]]:
    """The company's reservations by id, its ledger entries, and `check_books`' problems."""

    def read(session: Any) -> tuple[dict[str, Reservation], list[LedgerEntry], list[str]]:
        rows = session.scalars(select(Reservation).where(col(Reservation.company_id) == company_id))
        entries = session.scalars(
            select(LedgerEntry).where(col(LedgerEntry.company_id) == company_id)
        )
        return {r.id: r for r in rows}, list(entries), check_books(session, company_id)

    rows: tuple[dict[str, Reservation], list[LedgerEntry], list[str]]
    rows = await app.state.db.transaction(read)
    return rows


@pytest.fixture
async def app_client(settings_env: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    async with _served(settings_env) as served:
        yield served


async def _inits(
    client: httpx.AsyncClient, auth: dict[str, str], n: int, session_id: str | None = None
) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        body: dict[str, Any] = {"query": f"q{i}", "max_tokens": 50}
        if session_id is not None:
            body["session_id"] = session_id
        r = await client.post("/v1/chat/init", json=body, headers=auth)
        assert r.status_code == 201, r.text
        out.append(r.json()["data"])
    return out


async def test_duplicates_inside_one_batch_charge_once(
    app_client: tuple[Any, httpx.AsyncClient],
) -> None:
    app, client = app_client
    auth, company_id = await _owner(client)
    a, b, c, d = await _inits(client, auth, 4)
    ea, eb, ec, ed = (usage_event(x, company_id) for x in (a, b, c, d))
    jobs = [
        Delivery(ea.webhook_id, ea, transcripts=True),
        Delivery(ea.webhook_id, ea, transcripts=True),  # the same delivery twice
        Delivery("first-for-b", eb, transcripts=True),
        # A second id for the same stream, claiming less: must not charge again.
        Delivery("second-for-b", replace(eb, status="failed", output_tokens=0), transcripts=True),
        Delivery(ec.webhook_id, ec, transcripts=True),
        Delivery(ec.webhook_id, replace(ec, input_tokens=1), transcripts=True),
    ]
    db = Counting(app.state.db)
    batcher = SettlementBatcher(db)  # type: ignore[arg-type]
    results = await asyncio.gather(*(batcher.settle(j) for j in jobs))
    assert db.transactions == 1  # all of them in one batch, one transaction
    assert [r.duplicate for r in results] == [False, True, False, True, False, True]

    # One refused event in a batch rolls the batch back; each is then settled alone:
    # the refused ones answer their errors, the others settle (or stay duplicates).
    refused = [
        Delivery("wrong-jti", replace(ed, jti="not-the-jti"), transcripts=True),
        Delivery("nowhere", replace(ed, reservation_id="no-such"), transcripts=True),
        Delivery(ea.webhook_id, ea, transcripts=True),  # still a duplicate
        Delivery(ed.webhook_id, ed, transcripts=True),  # settles despite its neighbours
    ]
    mixed = await asyncio.gather(*(batcher.settle(j) for j in refused), return_exceptions=True)
    assert isinstance(mixed[0], ReservationMismatch)
    assert isinstance(mixed[1], ReservationNotFound)
    assert isinstance(mixed[2], Outcome) and mixed[2].duplicate
    assert isinstance(mixed[3], Outcome) and not mixed[3].duplicate
    reservations, entries, problems = await _company_rows(app, company_id)
    assert problems == []
    for init, event in ((a, ea), (b, eb), (c, ec), (d, ed)):
        row = reservations[init["reservation_id"]]
        assert row.status == "settled"
        expected = charge_for(
            "completed",
            event.input_tokens,
            event.output_tokens,
            reservation_price(row),
            row.hold_micro,
        )
        assert row.charged_micro == expected > 0  # the first event's usage, once
        charges = [e for e in entries if e.kind == "charge" and e.reservation_id == row.id]
        assert len(charges) == 1 and charges[0].amount_micro == -expected


async def test_a_batch_through_the_route_answers_each_webhook_once(
    app_client: tuple[Any, httpx.AsyncClient],
) -> None:
    """Concurrent deliveries through POST /v1/webhooks/usage, twins included, for
    turns of one chat session: each reservation charged once, each reply kept once."""
    app, client = app_client
    auth, company_id = await _owner(client)
    first = (await _inits(client, auth, 1))[0]
    inits = [first, *await _inits(client, auth, 4, first["session_id"])]
    settings = app.state.settings

    async def post(init: dict[str, Any]) -> dict[str, Any]:
        event = usage_event(init, company_id)
        body = event.body()
        headers = sign(settings.webhook_secret.reveal(), event.webhook_id, body)
        r = await client.post("/v1/webhooks/usage", content=body, headers=headers)
        assert r.status_code == 200, r.text
        return dict(r.json()["data"])

    answers = await asyncio.gather(*(post(i) for i in inits * 2))
    assert sum(1 for x in answers if x.get("settled")) == len(inits)
    assert sum(1 for x in answers if x.get("duplicate")) == len(inits)
    r = await client.get(f"/v1/sessions/{first['session_id']}", headers=auth)
    roles = [m["role"] for m in r.json()["data"]["messages"]]
    assert roles.count("assistant") == len(inits) and roles.count("user") == len(inits)
    problems = await app.state.db.transaction(lambda s: check_books(s, company_id))
    assert problems == []


async def test_a_batch_mixing_duplicates_and_refusals_is_one_transaction(
    app_client: tuple[Any, httpx.AsyncClient],
) -> None:
    """Twins, a redelivery of an earlier batch's webhook, a webhook after the sweeper
    released the hold, an id reused for another reservation and refused events, all
    in ONE batch: one transaction, and each delivery answered as it would be alone."""
    app, client = app_client
    auth, company_id = await _owner(client)
    first = (await _inits(client, auth, 1))[0]
    a, b, c, d, e, f = [first, *await _inits(client, auth, 5, first["session_id"])]
    ea, eb, ec, ed, ee, ef = (usage_event(x, company_id) for x in (a, b, c, d, e, f))
    db = Counting(app.state.db)
    batcher = SettlementBatcher(db)  # type: ignore[arg-type]
    assert not (await batcher.settle(Delivery(ee.webhook_id, ee, transcripts=True))).duplicate
    released = await app.state.db.transaction(
        lambda s: release_reservation(s, f["reservation_id"], "expired", actor="sweeper")
    )
    assert released is not None
    db.transactions = 0
    jobs = [
        Delivery(ea.webhook_id, ea, transcripts=True),  # settles
        Delivery(ea.webhook_id, ea, transcripts=True),  # its twin: duplicate
        Delivery(ea.webhook_id, eb, transcripts=True),  # a's id for b: 409
        Delivery(eb.webhook_id, eb, transcripts=True),  # settles
        Delivery("another-id-for-b", replace(eb, output_tokens=1), transcripts=True),  # duplicate
        Delivery(ee.webhook_id, ee, transcripts=True),  # settled by the earlier batch: duplicate
        Delivery(ef.webhook_id, ef, transcripts=True),  # released by the sweeper: duplicate
        Delivery(ec.webhook_id, replace(ec, jti="not-the-jti"), transcripts=True),  # 422
        Delivery(ec.webhook_id, ec, transcripts=True),  # the id the refused one did not take
        Delivery(ed.webhook_id, replace(ed, model="not-in-its-chain"), transcripts=True),  # 422
    ]
    results = await asyncio.gather(*(batcher.settle(j) for j in jobs), return_exceptions=True)
    assert db.transactions == 1
    outcomes = [r.duplicate if isinstance(r, Outcome) else type(r) for r in results]
    assert outcomes == [
        False,
        True,
        Conflict,
        False,
        True,
        True,
        True,
        ReservationMismatch,
        False,
        ModelNotInChain,
    ]
    reservations, entries, problems = await _company_rows(app, company_id)
    assert problems == []
    for init in (a, b, c, e):
        row = reservations[init["reservation_id"]]
        charges = [x for x in entries if x.kind == "charge" and x.reservation_id == row.id]
        assert row.status == "settled" and len(charges) == 1
        assert charges[0].amount_micro == -(row.charged_micro or 0) < 0
    assert reservations[d["reservation_id"]].status == "active"
    assert reservations[f["reservation_id"]].status == "released"
    assert not [
        x for x in entries if x.kind == "charge" and x.reservation_id == f["reservation_id"]
    ]
    r = await client.get(f"/v1/sessions/{first['session_id']}", headers=auth)
    roles = [m["role"] for m in r.json()["data"]["messages"]]
    # Six turns asked, f's taken back with its released hold (it never streamed, as
    # far as the sweeper knew); the replies of a, b, c and e kept once each.
    assert roles.count("user") == 5 and roles.count("assistant") == 4


class Held:
    """The app's `Database`, each settlement held before it starts until the test's
    gate opens (it never does here); the statements are the database's own."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def transaction(self, fn: Any, **kwargs: Any) -> Any:
        self.entered.set()
        await self.gate.wait()
        return await self.db.transaction(fn, **kwargs)

    async def unit(self, fn: Any, **kwargs: Any) -> Any:
        self.entered.set()
        await self.gate.wait()
        return await self.db.unit(fn, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


async def test_a_settlement_cut_off_is_the_databases_503_to_retry_and_settles_once_after(
    app_client: tuple[Any, httpx.AsyncClient],
) -> None:
    """The settlement under way is cut off (its drain cancelled, as at shutdown): the
    webhook gets what any database outage gets, 503 `database_unavailable` with
    `Retry-After: 1`, nothing kept; the edge's redelivery settles it once."""
    app, client = app_client
    auth, company_id = await _owner(client)
    (init,) = await _inits(client, auth, 1)
    deps = app.state.deps
    held = Held(app.state.db)
    own, deps.settler = deps.settler, SettlementBatcher(held)
    event = usage_event(init, company_id)
    body = event.body()
    headers = sign(app.state.settings.webhook_secret.reveal(), event.webhook_id, body)
    try:
        posting = asyncio.create_task(
            client.post("/v1/webhooks/usage", content=body, headers=headers)
        )
        await held.entered.wait()
        (drain,) = [t for t in asyncio.all_tasks() if t.get_name() == "settlement-batch"]
        drain.cancel()
        cut = await posting
    finally:
        deps.settler = own
    assert cut.status_code == 503, cut.text
    assert cut.json()["error"]["code"] == "database_unavailable"
    assert cut.headers["retry-after"] == "1"
    again = await client.post("/v1/webhooks/usage", content=body, headers=headers)
    assert again.status_code == 200, again.text
    assert again.json()["data"]["settled"] is True
    twice = await client.post("/v1/webhooks/usage", content=body, headers=headers)
    assert twice.json()["data"] == {"duplicate": True}
    problems = await app.state.db.transaction(lambda s: check_books(s, company_id))
    assert problems == []


async def test_a_webhook_cancelled_while_its_batch_settles_hands_the_settlement_to_late(
    app_client: tuple[Any, httpx.AsyncClient],
) -> None:
    """A webhook's request is cut off (the server's shutdown cancels it) while its
    batch settles: the settlement goes on (shielded) and commits. Before, its Outcome
    went to a future nobody awaited: the route never counted it nor corrected the
    TPM window, and the edge's redelivery is a duplicate, which counts nothing. Now
    it goes to the delivery's `late`, once, as a settlement past its 503 does; one
    the caller waited for goes nowhere."""
    app, client = app_client
    auth, company_id = await _owner(client)
    a, b = await _inits(client, auth, 2)
    cut, waited = (
        Delivery(event.webhook_id, event, transcripts=False)
        for event in (usage_event(a, company_id), usage_event(b, company_id))
    )
    held = Held(app.state.db)
    batcher = SettlementBatcher(held)  # type: ignore[arg-type]
    late: list[tuple[str, Outcome]] = []

    def hook(webhook_id: str) -> Any:
        return lambda outcome: late.append((webhook_id, outcome))

    try:
        leaving = asyncio.create_task(batcher.settle(cut, hook(cut.webhook_id)))
        staying = asyncio.create_task(batcher.settle(waited, hook(waited.webhook_id)))
        await held.entered.wait()
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        held.gate.set()
        outcome = await staying
        await eventually(lambda: len(late) == 1, "the cut-off settlement never went to late", 30)
    finally:
        held.gate.set()
        await batcher.close()
    assert not outcome.duplicate
    ((webhook_id, settled),) = late
    assert webhook_id == cut.webhook_id
    assert not settled.duplicate and settled.charged_micro > 0
    problems = await app.state.db.transaction(lambda s: check_books(s, company_id))
    assert problems == []


async def test_a_batch_that_commits_after_its_503_hands_each_settlement_to_late_once(
    pg_app_client: tuple[Any, httpx.AsyncClient],
) -> None:
    """A batch's transaction waits on a lock past the database's bound: its webhooks
    are answered 503, then it commits. Before, nothing learnt of that commit (the
    route counts money and corrects the TPM window only for an answer it got), so
    these settlements were never counted (the batcher took no hook for it). Now
    each settlement of the batch goes to its delivery's `late` once, with what the
    ledger has; the redeliveries are duplicates and go nowhere."""
    app, client = pg_app_client
    auth, company_id = await _owner(client)
    a, b = await _inits(client, auth, 2)
    deliveries = [
        Delivery(event.webhook_id, event, transcripts=False)
        for event in (usage_event(a, company_id), usage_event(b, company_id))
    ]
    # The same database, with a bound this test's lock outlasts.
    quick = Database(app.state.settings.database_url, pool_size=2, timeout=0.5)
    db = Counting(quick)
    # Lock waits bounded by the database's bound only: a batch's wait past it, a
    # silent database's (a lock fails a batcher's before: test_settlement_poison).
    batcher = SettlementBatcher(db, lock_wait=None)  # type: ignore[arg-type]
    late: list[tuple[str, Outcome]] = []

    def hook(webhook_id: str) -> Any:
        return lambda outcome: late.append((webhook_id, outcome))

    try:
        with app.state.db.engine.connect() as locker:
            locker.execute(
                text("SELECT 1 FROM reservations WHERE id = :id FOR UPDATE"),
                {"id": a["reservation_id"]},
            )
            answers = await asyncio.gather(
                *(batcher.settle(d, hook(d.webhook_id)) for d in deliveries),
                return_exceptions=True,
            )
            locker.rollback()
        assert db.transactions == 1  # one batch, one transaction
        assert all(isinstance(x, DatabaseTimeout) for x in answers), answers
        # The commit, once the lock is gone.
        await eventually(lambda: len(late) == len(deliveries), "the late batch never committed", 30)
        assert sorted(w for w, _ in late) == sorted(d.webhook_id for d in deliveries)

        def charges(session: Any) -> dict[str, int]:
            rows = session.scalars(
                select(LedgerEntry).where(
                    col(LedgerEntry.company_id) == company_id, col(LedgerEntry.kind) == "charge"
                )
            )
            return {str(e.reservation_id): -e.amount_micro for e in rows}

        charged = await app.state.db.transaction(charges)
        by_id = {d.webhook_id: d.event.reservation_id for d in deliveries}
        assert {by_id[w]: o.charged_micro for w, o in late} == charged
        # The edge's redeliveries: duplicates, handed to nobody.
        again = await asyncio.gather(*(batcher.settle(d, hook(d.webhook_id)) for d in deliveries))
        assert [x.duplicate for x in again] == [True, True]
        assert len(late) == len(deliveries)
    finally:
        await batcher.close()
        quick.close()
    problems = await app.state.db.transaction(lambda s: check_books(s, company_id))
    assert problems == []


async def test_a_batch_racing_the_sweepers_release_of_one_of_its_holds_charges_nothing_for_it(
    pg_app_client: tuple[Any, httpx.AsyncClient],
) -> None:
    """The sweeper's release of a hold has flipped it and not yet committed when a
    batch arrives with two reports of that stream (two webhook ids) and another
    company's report: the batch waits on the row, then finds it released (both
    duplicates, nothing charged), and settles the other company's."""
    app, client = pg_app_client
    (auth, company_id), (other_auth, other_id) = [await _owner(client) for _ in range(2)]
    [raced] = await _inits(client, auth, 1)
    [other] = await _inits(client, other_auth, 1)
    event = usage_event(raced, company_id)
    deliveries = [
        Delivery(event.webhook_id, event, transcripts=True),
        Delivery("a-second-id", replace(event, output_tokens=7), transcripts=True),
        Delivery(
            f"usage_{other['reservation_id']}", usage_event(other, other_id), transcripts=True
        ),
    ]
    db = app.state.db
    flipped, commit = threading.Event(), threading.Event()

    def sweeper_release() -> None:
        with db.sessions.begin() as session:
            released = release_reservation(
                session, raced["reservation_id"], "expired", actor="sweeper"
            )
            assert released is not None
            flipped.set()
            assert commit.wait(30)

    releasing = threading.Thread(target=sweeper_release)
    releasing.start()
    try:
        assert await asyncio.to_thread(flipped.wait, 30)
        batcher = SettlementBatcher(db)
        settling = asyncio.gather(*(batcher.settle(d) for d in deliveries), return_exceptions=True)

        def batch_waits_on_the_row(session: Any) -> bool:
            waiting = session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"
                )
            )
            return bool(waiting)

        async def waits() -> bool:
            return bool(await db.transaction(batch_waits_on_the_row))

        await eventually(waits, "the batch waits on the row the release holds")
    finally:
        commit.set()
        await asyncio.to_thread(releasing.join, 30)
    answers = await settling
    await batcher.close()
    assert [a.duplicate if isinstance(a, Outcome) else a for a in answers] == [True, True, False]

    def read(session: Any) -> tuple[list[str], list[str], list[str]]:
        kinds = session.scalars(
            select(col(LedgerEntry.kind)).where(
                col(LedgerEntry.reservation_id) == raced["reservation_id"]
            )
        )
        return sorted(kinds), check_books(session, company_id), check_books(session, other_id)

    kinds, problems, other_problems = await db.transaction(read)
    assert kinds == ["hold", "release"]
    assert problems == other_problems == []
