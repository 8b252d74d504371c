"""What a `/v1/chat/init` sends PostgreSQL (issue 14), read off the wire by the
counting proxy of `bench/pg_round_trips.py`: the common init (a new session, no
budgets) is three statements in autocommit (the caller's lookup, the company's read,
the one hold statement) with no BEGIN or COMMIT; an init that must write more with
its hold (here: a turn on an existing session) runs in one transaction."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import httpx
from sqlalchemy.engine import make_url

from bench.cp_cpu import bench_settings, provision, throwaway_state
from bench.pg_round_trips import Counts, counting_proxy
from control_plane.app import create_app
from shared.webhooks import generate_secret


def test_the_common_init_sends_three_statements_and_no_transaction() -> None:
    async def go() -> list[tuple[int, int, collections.Counter[str]]]:
        counts = Counts()
        seen: list[tuple[int, int, collections.Counter[str]]] = []
        with throwaway_state() as (database_url, prefix):
            url = make_url(database_url)
            with counting_proxy(url.host or "127.0.0.1", url.port or 5432, counts) as port:
                proxied = url.set(host="127.0.0.1", port=port, query={"sslmode": "disable"})
                dsn = proxied.render_as_string(hide_password=False)
                app = create_app(bench_settings(dsn, prefix, generate_secret()))
                async with app.router.lifespan_context(app):
                    transport = httpx.ASGITransport(app=app)
                    async with httpx.AsyncClient(
                        transport=transport, base_url="http://cp.test", timeout=60
                    ) as client:
                        auth = {"Authorization": f"Bearer {(await provision(client, 1))[0]}"}

                        async def init(body: dict[str, Any]) -> dict[str, Any]:
                            r = await client.post("/v1/chat/init", json=body, headers=auth)
                            assert r.status_code == 201, r.text
                            return dict(r.json()["data"])

                        for i in range(3):  # the pool's connections made, caches filled
                            first = await init({"query": f"warm {i}"})
                        for body in ({"query": "hi"}, {"query": "again", **_on(first)}):
                            before = counts.snapshot()
                            await init(body)
                            after = counts.snapshot()
                            seen.append(
                                (after[0] - before[0], after[1] - before[1], after[2] - before[2])
                            )
        return seen

    (writes, executes, simple), (_, _, on_a_session) = asyncio.run(go())
    assert simple == collections.Counter()  # no BEGIN, no COMMIT, no ping
    assert (writes, executes) == (3, 3)
    assert on_a_session["BEGIN"] == 1 and on_a_session["COMMIT"] == 1


def _on(init: dict[str, Any]) -> dict[str, str]:
    return {"session_id": init["session_id"]}
