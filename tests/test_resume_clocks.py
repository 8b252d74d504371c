"""A stream that ended may be resumed (`Last-Event-ID`) for `LLMGW_RESUME_GRACE_SECONDS`
after its end, on any edge: the edge that served it writes the end's time in the
store, and the one the reconnect reaches judges it. Edges whose host clocks disagree
(no time sync, a VM resumed from a pause) must still agree on when the grace ends.

In process (`tests.inproc.Gateway`) on PostgreSQL; the edges share one store, whose
clock is the real one, and the second edge's host clock is 10 minutes off."""

from __future__ import annotations

import time
from typing import Any

from shared.sse import ServerSentEvent
from tests.inproc import Gateway, events, opened
from tests.stack import base_env

SKEW = 600.0


async def clock_off_by(gw: Gateway, name: str, skew: float) -> None:
    """Edge `name`, its host's clock `skew` off, once it has read the store's clock."""
    app = await gw.add_edge(name, clock=lambda: time.time() + skew)
    assert await app.state.store_clock.sync(gw.store)


async def finished_stream(gw: Gateway) -> tuple[dict[str, Any], list[ServerSentEvent]]:
    grant = await gw.init_ok(await gw.new_user("5"), {"query": "q [[mock tokens=6]]"})
    async with opened(await gw.get(grant["stream_url"])) as response:
        assert response.status_code == 200
        seen = await events(response)
    assert seen[-1].event == "complete"
    return grant, seen


async def test_a_reconnect_within_the_grace_resumes_on_an_edge_whose_clock_runs_ahead(
    migrated_pg_url: str,
) -> None:
    env = {**base_env(migrated_pg_url), "LLMGW_RESUME_GRACE_SECONDS": "120"}
    async with Gateway(env) as gw:
        await clock_off_by(gw, "ahead", +SKEW)
        grant, seen = await finished_stream(gw)
        # The client lost the answer after its second event; its reconnect reaches
        # the other edge, within the grace.
        headers = {"Last-Event-ID": str(seen[1].id)}
        async with opened(await gw.get(grant["stream_url"], headers, edge="ahead")) as response:
            assert response.status_code == 200
            tail = await events(response)
        assert [(e.id, e.event, e.data) for e in tail] == [
            (e.id, e.event, e.data) for e in seen[2:]
        ]


async def test_an_edge_whose_clock_is_behind_refuses_a_reconnect_past_the_grace(
    migrated_pg_url: str,
) -> None:
    env = {**base_env(migrated_pg_url), "LLMGW_RESUME_GRACE_SECONDS": "0"}
    async with Gateway(env) as gw:
        await clock_off_by(gw, "behind", -SKEW)
        grant, seen = await finished_stream(gw)
        headers = {"Last-Event-ID": str(seen[1].id)}
        for edge in ("edge", "behind"):  # no grace: ended is ended, on every edge
            async with opened(await gw.get(grant["stream_url"], headers, edge=edge)) as response:
                assert (edge, response.status_code) == (edge, 204)
