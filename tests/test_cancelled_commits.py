"""A request cut off while its transaction runs (the server's shutdown cancels it
past its grace; not a timeout) whose transaction commits anyway: what that commit
implies is done as for one that committed after its 503 (`db_threads`' ``late``).
In-process (ASGITransport: cancelling the client's task cancels the handler, as
uvicorn's shutdown does), on PostgreSQL for a row lock another connection holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text
from sqlmodel import col

from control_plane.tables import Reservation
from tests.inproc import eventually
from tests.test_control_plane import pg_settings
from tests.test_credits_batch import _owner, _served


@pytest.fixture
async def pg_app_client(pg_server: str) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    with pg_settings(pg_server) as settings:
        async with _served(settings) as served:
            yield served


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
