"""An init whose hold committed, then whose store refuses its writes (the stash, the
tokens-per-minute count) and whose database refuses connections as it gives the
hold back: both failures real (a private redis-server out of memory, a database
that accepts no connection), in-process (ASGITransport) on PostgreSQL. The client
must get a clear 503, no token may exist for the hold, and the hold must come back
at the sweeper's deadline with the books and the counters agreeing."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy import select, update
from sqlmodel import col

from control_plane import abandoned_holds, chat_init, pending_inits
from control_plane.app import create_app
from control_plane.books import check_books
from control_plane.sweeper import sweep_expired_holds
from control_plane.tables import LedgerEntry, Reservation
from shared.stash import stash_key
from tests.inproc import eventually
from tests.private_redis import PrivateRedis, private_redis
from tests.test_control_plane import pg_settings
from tests.test_lost_commit_answers import BODY, _micro, _money_counters, _new_init
from tests.test_lost_late_commits import (
    _commits_wait,
    _conninfo,
    _cut_while_blocked,
    _looks,
    _refusing,
)

__all__ = ["private_redis"]  # the fixture, used by name


@contextlib.asynccontextmanager
async def _served(
    pg_server: str, redis_url: str, tpm: bool
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    extra = {"LLMGW_REDIS_URL": redis_url, "LLMGW_SWEEP_INTERVAL_SECONDS": "3600"}
    if tpm:  # the hold's tokens are then counted in the store before the stash
        extra["LLMGW_TPM_PER_USER"] = "100000000"
    with pg_settings(pg_server, extra) as settings:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://cp.test") as client:
                yield app, client


@pytest.mark.parametrize("tpm", [True, False], ids=["tokens-counted", "stash"])
async def test_an_init_whose_store_and_database_fail_after_its_hold_is_a_503_and_mints_nothing(
    pg_server: str,
    private_redis: PrivateRedis,
    monkeypatch: pytest.MonkeyPatch,
    tpm: bool,
) -> None:
    async with _served(pg_server, private_redis.url, tpm) as (app, client):
        deps = app.state.deps
        auth, company_id, init = await _new_init(client)
        hold = _micro(init["reserved_credits"])
        pending = pending_inits.company_pending_key(company_id)
        before = set(await deps.store.bounded_members(pending))
        money = _money_counters(app)
        server = aioredis.Redis.from_url(private_redis.url)
        real_count = chat_init.count_tokens
        with _refusing(_conninfo(deps.settings)) as refuse:

            async def then_both_fail(*args: Any, **kwargs: Any) -> None:
                # The hold has committed: the store now refuses every write (out of
                # memory), the database every connection.
                await server.config_set("maxmemory", "1")
                refuse()
                await real_count(*args, **kwargs)

            monkeypatch.setattr(chat_init, "count_tokens", then_both_fail)
            r = await client.post("/v1/chat/init", json=BODY, headers=auth)
            monkeypatch.setattr(chat_init, "count_tokens", real_count)
        await server.config_set("maxmemory", "0")
        await server.aclose()
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "database_unavailable"
        assert "stream_token" not in r.text

        def active(session: Any) -> list[str]:
            stmt = select(col(Reservation.id)).where(
                col(Reservation.company_id) == company_id, col(Reservation.status) == "active"
            )
            return sorted(session.scalars(stmt))

        held_ids = await deps.db.transaction(active)
        assert len(held_ids) == 2  # the first init's, and the failed one's: still held
        # Its grant stays pending (its hold is there), with no stashed request: a token
        # for it, had one been minted, could never start (`token_unknown`).
        [jti] = set(await deps.store.bounded_members(pending)) - before
        assert await deps.store.get(stash_key(company_id, jti)) is None
        r = await client.get("/v1/credits", headers=auth)
        credits = r.json()["data"]
        assert _micro(credits["held"]) == 2 * hold
        assert await deps.db.transaction(lambda s: check_books(s, company_id)) == []

        def moved() -> dict[str, int]:
            now = _money_counters(app)
            return {k: now[k] - money[k] for k in now}

        # Counted reserved once it committed; not released: reserved - released is held.
        assert moved() == {"reserved": hold, "charged": 0, "released": 0}

        # At its deadline the sweeper gives it back, counted.
        def expire(session: Any) -> None:
            session.execute(
                update(Reservation)
                .where(col(Reservation.id).in_(held_ids))
                .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )

        await deps.db.transaction(expire)
        swept = await sweep_expired_holds(deps.db, deps.store, deps.metrics)
        assert swept.released == 2
        r = await client.get("/v1/credits", headers=auth)
        assert r.json()["data"]["held"] == "0.000000"
        assert r.json()["data"]["balance"] == "10.000000"
        assert moved() == {"reserved": hold, "charged": 0, "released": 2 * hold}
        assert await deps.db.transaction(lambda s: check_books(s, company_id)) == []


async def test_an_inits_give_back_whose_answer_was_lost_is_counted_released(
    pg_server: str, private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stash fails (the store out of memory) and init gives its hold back; that
    release's COMMIT waits and its connection is cut (503 to the client), then
    PostgreSQL commits it. The ledger has the release: the counters must too, or
    reserved - charged - released says the hold is still held (and the sweeper,
    finding it released, never counts it)."""
    async with _served(pg_server, private_redis.url, False) as (app, client):
        deps = app.state.deps
        auth, company_id, init = await _new_init(client)
        hold = _micro(init["reserved_credits"])
        money = _money_counters(app)
        looked = _looks(monkeypatch, abandoned_holds, "released_by")
        server = aioredis.Redis.from_url(private_redis.url)
        real_count = chat_init.count_tokens

        async def then_the_store_fails(*args: Any, **kwargs: Any) -> None:
            await server.config_set("maxmemory", "1")
            await real_count(*args, **kwargs)

        monkeypatch.setattr(chat_init, "count_tokens", then_the_store_fails)
        conninfo = _conninfo(deps.settings)
        async with _cut_while_blocked(
            conninfo,
            _commits_wait(conninfo, released_of=company_id),
            lambda: client.post("/v1/chat/init", json=BODY, headers=auth),
            "the release's COMMIT waits",
            "advisory",
        ) as (sent, let_commit):
            r = await sent
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "database_unavailable"
            # (Before `released_by` there was no look to wait for.)
            await eventually(
                lambda: bool(looked) or not hasattr(abandoned_holds, "released_by"),
                "the lost release is looked for",
            )
            let_commit()
        monkeypatch.setattr(chat_init, "count_tokens", real_count)
        await server.config_set("maxmemory", "0")
        await server.aclose()

        def kinds(session: Any) -> list[str]:
            stmt = select(col(LedgerEntry.kind)).where(col(LedgerEntry.company_id) == company_id)
            return sorted(session.scalars(stmt))

        async def released() -> bool:
            found: list[str] = await deps.db.transaction(kinds)
            return found.count("release") == 1

        await eventually(released, "the release commits once its COMMIT may")
        r = await client.get("/v1/credits", headers=auth)
        assert _micro(r.json()["data"]["held"]) == hold  # the first init's only

        def moved() -> dict[str, int]:
            now = _money_counters(app)
            return {k: now[k] - money[k] for k in now}

        expected = {"reserved": hold, "charged": 0, "released": hold}
        await eventually(lambda: moved() == expected, f"counted: {moved()} vs {expected}", 5)
        assert await deps.db.transaction(lambda s: check_books(s, company_id)) == []
