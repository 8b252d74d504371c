"""A request cut off while its transaction runs (the server's shutdown cancels it
past its grace; not a timeout) whose transaction commits anyway: what that commit
implies is done as for one that committed after its 503 (`db_threads`' ``late``).
In-process (ASGITransport: cancelling the client's task cancels the handler, as
uvicorn's shutdown does), on PostgreSQL for a row lock another connection holds."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select, text
from sqlmodel import col

from control_plane import pending_inits
from control_plane.tables import Reservation
from shared.webhooks import sign
from tests.asgi_cp import pg_app_client
from tests.inproc import eventually
from tests.test_control_plane import pg_settings, usage_event
from tests.test_credits_batch import _owner, _served

__all__ = ["pg_app_client"]  # the fixture, used by name


async def test_an_init_cancelled_while_its_hold_commits_releases_it(
    pg_app_client: tuple[Any, httpx.AsyncClient],
) -> None:
    """Init's hold waits on a lock; its request is cancelled meanwhile; the hold
    commits once the lock goes, for a client that has no token. Before, the
    cancelled call's result was dropped: the hold stayed until the sweeper reached
    its deadline (~22 minutes), as one past its 503 did not. Now it is released at
    once, by the same `late` as that one."""
    app, client = pg_app_client
    auth, company_id = await _owner(client)
    before = (await client.get("/v1/credits", headers=auth)).json()["data"]
    db = app.state.db

    def waiting_on_a_lock(session: Any) -> bool:
        return bool(
            session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        )

    def statuses(session: Any) -> list[str]:
        return list(
            session.scalars(
                select(col(Reservation.status)).where(col(Reservation.company_id) == company_id)
            )
        )

    with db.engine.connect() as locker:
        locker.execute(
            text("SELECT 1 FROM companies WHERE id = :id FOR UPDATE"), {"id": company_id}
        )
        init = asyncio.create_task(
            client.post("/v1/chat/init", json={"query": "cut off"}, headers=auth)
        )
        await eventually(
            lambda: db.transaction(waiting_on_a_lock), "init never waited on the lock", 30
        )
        init.cancel()
        with pytest.raises(asyncio.CancelledError):
            await init
        locker.rollback()
    await eventually(
        lambda: _is(db.transaction(statuses), ["released"]),
        "the hold a cancelled init committed was never released",
        30,
    )
    after = (await client.get("/v1/credits", headers=auth)).json()["data"]
    assert (after["balance"], after["held"]) == (before["balance"], before["held"])


async def _is(got: Any, expected: Any) -> bool:
    return bool(await got == expected)


async def _statuses(db: Any, company_id: str) -> list[str]:
    return [r.status for r in await _reservations(db, company_id)]


class _Stuck:
    """A store call that answers only once released, and says when it was reached."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.released = asyncio.Event()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.reached.set()
        await self.released.wait()  # or until cancelled


async def _reservations(db: Any, company_id: str) -> list[Reservation]:
    return list(
        await db.transaction(
            lambda s: list(
                s.scalars(select(Reservation).where(col(Reservation.company_id) == company_id))
            )
        )
    )


async def test_an_init_cancelled_after_its_hold_gives_back_the_hold_and_the_pending_grant(
    pg_app_client: tuple[Any, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Init holds, then stashes its request in the store; the server's shutdown
    cancels it meanwhile. Before, its clean-up caught `Exception` only: the hold
    stayed until the sweeper's deadline (~22 minutes) and the grant in the user's
    pending set (`LLMGW_MAX_PENDING_INITS_PER_USER`) as long, for a token nobody has.
    Now the clean-up runs on cancellation too, in the background, and the
    cancellation still goes up."""
    app, client = pg_app_client
    auth, company_id = await _owner(client)
    before = (await client.get("/v1/credits", headers=auth)).json()["data"]
    store, db = app.state.store, app.state.db
    stashing = _Stuck()
    monkeypatch.setattr(store, "set", stashing)
    init = asyncio.create_task(client.post("/v1/chat/init", json={"query": "cut"}, headers=auth))
    await stashing.reached.wait()
    (held,) = await _reservations(db, company_id)
    assert held.status == "active"
    sets = pending_inits.keys(held.user_id, company_id)  # the user's and the company's

    async def pending() -> list[list[str]]:
        return [await store.bounded_members(key) for key in sets]

    assert await pending() == [[held.jti], [held.jti]]
    init.cancel()
    with pytest.raises(asyncio.CancelledError):
        await init
    await eventually(
        lambda: _is(_statuses(db, company_id), ["released"]),
        "the hold of a cancelled init was never released",
        30,
    )
    await eventually(
        lambda: _is(pending(), [[], []]),
        "the grant of a cancelled init stayed pending",
        30,
    )
    monkeypatch.undo()
    after = (await client.get("/v1/credits", headers=auth)).json()["data"]
    assert (after["balance"], after["held"]) == (before["balance"], before["held"])


async def test_a_webhook_cancelled_after_its_commit_still_counts_it(
    pg_app_client: tuple[Any, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A settlement commits; the route then removes the pending grant (a store
    call) and the server's shutdown cancels it there. Before, the count in
    ``llmgw_cp_credits_charged_total`` and the tokens-per-minute correction came
    after that call and were lost (the redelivery is a duplicate, which counts
    nothing). Now the money is counted first and the rest runs to its end."""
    app, client = pg_app_client
    auth, company_id = await _owner(client)
    r = await client.post("/v1/chat/init", json={"query": "q", "max_tokens": 50}, headers=auth)
    assert r.status_code == 201, r.text
    init = r.json()["data"]
    metrics, store = app.state.metrics, app.state.store
    charged = metrics.credits_charged._value.get()
    forgetting = _Stuck()
    monkeypatch.setattr(store, "bounded_remove", forgetting)
    event = usage_event(init, company_id)
    body = event.body()
    headers = sign(app.state.settings.webhook_secret.reveal(), event.webhook_id, body)
    post = asyncio.create_task(client.post("/v1/webhooks/usage", content=body, headers=headers))
    await forgetting.reached.wait()
    post.cancel()
    with pytest.raises(asyncio.CancelledError):
        await post
    assert await _statuses(app.state.db, company_id) == ["settled"]
    assert metrics.credits_charged._value.get() > charged
    # Otherwise the lifespan's shutdown waits out its drain bound (5 s) for it.
    forgetting.released.set()


async def test_a_late_release_started_during_shutdown_completes(
    pg_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An init's hold waits on a lock; its request is cancelled; the server shuts
    down and the lock goes meanwhile, so the hold commits and `late` starts its
    release. Before, the lifespan closed the database without waiting for either:
    the release found it closed and the hold stayed until a sweeper reached its
    deadline. Now the lifespan waits (bounded) for running calls and background
    work before it closes the store and the database."""
    with pg_settings(pg_server) as settings:
        served = _served(settings)
        app, client = await served.__aenter__()
        auth, company_id = await _owner(client)
        db = app.state.db
        shutting_down = asyncio.Event()
        locker = db.engine.connect()
        locker.execute(
            text("SELECT 1 FROM companies WHERE id = :id FOR UPDATE"), {"id": company_id}
        )
        settler = app.state.deps.settler
        close_settler = settler.close

        async def closing() -> None:  # the lifespan's first steps of shutdown
            shutting_down.set()
            locker.rollback()  # the hold commits now, its caller long gone
            locker.close()  # back to the pool before the lifespan disposes of it
            await close_settler()

        monkeypatch.setattr(settler, "close", closing)
        init = asyncio.create_task(client.post("/v1/chat/init", json={"query": "x"}, headers=auth))
        await eventually(
            lambda: db.transaction(_waiting_on_a_lock), "init never waited on the lock", 30
        )
        init.cancel()
        with pytest.raises(asyncio.CancelledError):
            await init
        await served.__aexit__(None, None, None)
        assert shutting_down.is_set()
        after = await asyncio.to_thread(_statuses_now, settings.database_url, company_id)
        assert after == ["released"]


def _waiting_on_a_lock(session: Any) -> bool:
    return bool(
        session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    )


def _statuses_now(database_url: str, company_id: str) -> list[str]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(col(Reservation.status)).where(col(Reservation.company_id) == company_id)
            )
            return [r[0] for r in rows]
    finally:
        engine.dispose()
