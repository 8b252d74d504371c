"""One company's webhook in a settlement batch must not hold up the other companies'
(attack review: poison pills in shared queues). PostgreSQL, in-process.

A batch settles every company's webhooks in one transaction. Before, when one
company's row was held by another transaction (a long admin transaction, an
operator's psql), the batch waited on it past the database's bound: every webhook of
the batch was answered 503 (the edge retries them all, and they batch together
again), and the batch's statement, still waiting, kept the rows of the other
companies it had already updated, so their inits waited on them too."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from control_plane.books import check_books
from control_plane.db import Database
from control_plane.settlement import Outcome
from control_plane.settlement_batch import SettlementBatcher
from control_plane.webhook_settlement import Delivery
from tests.asgi_cp import pg_app_client
from tests.test_control_plane import usage_event
from tests.test_credits_batch import _inits, _owner

# The bound of the database the batcher uses: the lock below outlasts it.
BOUND_SECONDS = 2.0

__all__ = ["pg_app_client"]  # the fixture, used by name


async def test_a_company_row_held_by_a_long_transaction_fails_only_its_own_webhooks(
    pg_app_client: tuple[Any, httpx.AsyncClient],
) -> None:
    app, client = pg_app_client
    owners = [await _owner(client) for _ in range(2)]
    # The victim's row comes first in the batch's key order: before, the batch held
    # it while it waited on the locked company's.
    (victim_auth, victim), (locked_auth, locked) = sorted(owners, key=lambda o: o[1])
    [v] = await _inits(client, victim_auth, 1)
    [k] = await _inits(client, locked_auth, 1)
    deliveries = [
        Delivery(event.webhook_id, event, transcripts=False)
        for event in (usage_event(k, locked), usage_event(v, victim))
    ]
    quick = Database(app.state.settings.database_url, pool_size=4, timeout=BOUND_SECONDS)
    batcher = SettlementBatcher(quick)
    try:
        with app.state.db.engine.connect() as locker, app.state.db.engine.connect() as probe:
            locker.execute(
                text("SELECT 1 FROM companies WHERE id = :id FOR UPDATE"), {"id": locked}
            )
            answers = await asyncio.gather(
                *(batcher.settle(d) for d in deliveries), return_exceptions=True
            )
            stuck, settled = answers
            assert isinstance(settled, Outcome) and not settled.duplicate, answers
            # The database's 503 (`database_unavailable`), which the edge retries.
            assert isinstance(stuck, OperationalError), answers
            # Nothing of the batch still holds the victim's row: its next init can hold.
            probe.execute(
                text("SELECT 1 FROM companies WHERE id = :id FOR UPDATE NOWAIT"), {"id": victim}
            )
            probe.rollback()
            locker.rollback()
        # The lock gone, the edge's retry settles the locked company's webhook once.
        again = await asyncio.gather(*(batcher.settle(d) for d in deliveries))
        assert [a.duplicate for a in again] == [False, True]
    finally:
        await batcher.close()
        quick.close()
    for company_id in (victim, locked):
        problems = await app.state.db.transaction(lambda s, c=company_id: check_books(s, c))
        assert problems == []
