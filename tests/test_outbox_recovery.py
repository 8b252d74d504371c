"""After a control-plane outage, the edge's backlog of usage reports is settled at the
pace the control plane answers, not over as long again as the outage lasted.

Before: each report that failed backed off on its own (full jitter, doubling up to
300 s), so once the control plane was back, reports trickled in until their own due
times: after a 5-minute outage, some holds stayed unsettled (credits unavailable to
their users) for minutes more; after a 40 s outage in `test_e2e_outbox.py`, some of
fifty reports were still waiting 30 s after the restart. Now the first post that passes
after the receiver was unavailable makes every report still backing off due at once.

In process: a memory store, the control plane's webhook route as a Starlette app whose
answer the test sets, a fake monotonic clock. No assertion waits on the wall clock.
"""

from __future__ import annotations

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.retry import Backoff
from shared.store_memory import MemoryStore
from shared.webhooks import verify
from stream_edge.memory_transport import InMemoryTransport
from stream_edge.metrics import EdgeMetrics
from stream_edge.outbox import EXPEDITE_INTERVAL, Outbox
from tests.test_outbox_linger import SECRET, URL, event, settle_loop

HOUR = 3600.0


class ControlPlane:
    """The webhook route; `status` is what it answers, `failing` the reports it
    fails whatever `status` says (a report it cannot settle)."""

    def __init__(self) -> None:
        self.status = 200
        self.failing: set[str] = set()
        self.settled: list[str] = []
        self.posts = 0

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        verify([SECRET], body, dict(request.headers))
        jti = orjson.loads(body)["data"]["jti"]
        self.posts += 1
        if jti in self.failing:
            return JSONResponse({"error": "busy"}, status_code=503)
        if self.status != 200:
            return JSONResponse({"error": "down"}, status_code=self.status)
        self.settled.append(jti)
        return JSONResponse({"ok": True})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def edge(cp: ControlPlane, store: MemoryStore, clock: Clock) -> tuple[Outbox, InMemoryTransport]:
    transport = InMemoryTransport(
        {URL: Starlette(routes=[Route("/v1/webhooks/usage", cp.hook, methods=["POST"])])}
    )
    # Every retry an hour away at least: only an expedite can bring one forward.
    box = Outbox(
        store, transport, URL, SECRET, EdgeMetrics(), linger=0,
        backoff=Backoff(base=HOUR, cap=HOUR, floor=HOUR), monotonic=clock,
    )  # fmt: skip
    return box, transport


async def pending(box: Outbox) -> int:
    """Reports still in the store, once the acknowledgements waiting to share a round
    trip are written (a flush with no time left to post anything)."""
    return await box.flush(timeout=0)


async def stream_ends(box: Outbox, jti: str) -> None:
    await box.enqueue(event(jti))
    await settle_loop()


async def test_the_first_report_through_after_an_outage_brings_the_backlog_forward() -> None:
    cp, store, clock = ControlPlane(), MemoryStore(), Clock()
    box, transport = edge(cp, store, clock)
    await stream_ends(box, "warm")  # the receiver is known to answer
    cp.status = 503  # the control plane's database is down
    for jti in ("a", "b"):
        await stream_ends(box, jti)
    transport.faults_for(URL).refuse = 2  # then the control plane itself
    for jti in ("c", "d"):
        await stream_ends(box, jti)
    assert cp.settled == ["warm"]
    assert await pending(box) == 4
    assert await box.deliver_due() == 0  # each backs off for an hour

    cp.status = 200
    clock.now += EXPEDITE_INTERVAL
    await stream_ends(box, "e")  # the first report after the outage passes
    assert await box.deliver_due() == 4  # the backlog is due now, not in an hour
    assert sorted(cp.settled) == ["a", "b", "c", "d", "e", "warm"]
    assert await box.flush(timeout=30) == 0


async def test_a_fresh_edge_brings_another_edges_backlog_forward() -> None:
    """An edge replaced during the outage: the new process does not know there was
    one, so its first report through brings every report still backing off forward."""
    cp, store, clock = ControlPlane(), MemoryStore(), Clock()
    old, _ = edge(cp, store, clock)
    cp.status = 502  # the control plane's proxy, no control plane behind it
    for jti in ("a", "b", "c"):
        await stream_ends(old, jti)
    assert cp.settled == [] and await pending(old) == 3

    cp.status = 200
    new, _ = edge(cp, store, Clock())
    await stream_ends(new, "d")
    assert await new.deliver_due() == 3
    assert sorted(cp.settled) == ["a", "b", "c", "d"]


async def test_a_throttling_control_plane_keeps_its_backoff() -> None:
    """429 asks the edge to slow down: a post passing afterwards does not bring the
    throttled reports forward (and a 4xx refusal is no outage either)."""
    cp, store, clock = ControlPlane(), MemoryStore(), Clock()
    box, _ = edge(cp, store, clock)
    await stream_ends(box, "warm")  # the new process's first post: nothing to bring forward
    cp.status = 429
    await stream_ends(box, "a")
    cp.status = 200
    clock.now += EXPEDITE_INTERVAL
    await stream_ends(box, "b")
    assert await box.deliver_due() == 0
    assert cp.settled == ["warm", "b"]
    assert await pending(box) == 1  # "a" waits out its backoff


async def test_a_report_the_control_plane_keeps_failing_is_not_brought_forward() -> None:
    """One report fails (503, or a timeout every time) while the others pass: that is
    the report's trouble, not an outage. It waits out its own backoff, and is not
    brought forward by the posts that pass, even past `EXPEDITE_INTERVAL`."""
    cp, store, clock = ControlPlane(), MemoryStore(), Clock()
    box, _ = edge(cp, store, clock)
    await stream_ends(box, "warm")  # the new process's first post brings nothing forward
    cp.failing.add("poison")
    await stream_ends(box, "poison")
    for i in range(5):
        clock.now += EXPEDITE_INTERVAL
        await stream_ends(box, f"ok{i}")
        assert await box.deliver_due() == 0
    assert cp.posts == 7  # the poison was posted once
    assert "poison" not in cp.settled and await pending(box) == 1


async def test_an_outage_is_posts_failing_in_a_row_and_comes_forward_at_most_every_interval() -> (
    None
):
    """Two reports failing in a row are an outage: the next post that passes brings
    them forward, but no sooner than `EXPEDITE_INTERVAL` after the last time."""
    cp, store, clock = ControlPlane(), MemoryStore(), Clock()
    box, _ = edge(cp, store, clock)
    await stream_ends(box, "warm")  # an expedite at 0 (a new process)
    cp.status = 503
    await stream_ends(box, "a")
    await stream_ends(box, "b")
    cp.status = 200
    clock.now += EXPEDITE_INTERVAL / 2
    await stream_ends(box, "c")
    assert await box.deliver_due() == 0  # too soon after the last
    clock.now += EXPEDITE_INTERVAL / 2
    await stream_ends(box, "d")
    assert await box.deliver_due() == 2
    assert sorted(cp.settled) == ["a", "b", "c", "d", "warm"]
