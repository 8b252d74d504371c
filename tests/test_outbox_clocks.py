"""Edges whose host clocks disagree (no time sync, a VM resumed from a pause) share
one Redis outbox: a sorted set scored by due time, each claim leasing its items for
30 s. What one edge writes there must not be judged by another's clock.

Real Redis (a fresh key prefix); each edge is an `Outbox` wired as the edge's
lifespan wires it, with a host whose clocks the test owns (its wall clock 10 minutes
off, its monotonic clock moved by the test); the control plane's webhook route is a
recording stand-in. The last test runs the edge app itself. No assertion waits on
the wall clock.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.retry import Backoff
from shared.store import Store
from shared.store_clock import StoreClock
from shared.store_factory import open_store
from shared.webhooks import verify
from stream_edge.memory_transport import InMemoryTransport
from stream_edge.metrics import EdgeMetrics
from stream_edge.outbox import Outbox
from tests.conftest import REDIS_URL
from tests.inproc import CP, Gateway, edge_url, eventually
from tests.private_redis import PrivateRedis
from tests.stack import base_env
from tests.test_outbox_linger import NEVER, SECRET, URL, event

SKEW = 600.0
LEASE = 30.0
RETRY = 60.0  # every retry's backoff, exactly


class ControlPlane:
    """The webhook route: counts each report's posts; answers `status`."""

    def __init__(self) -> None:
        self.posts: Counter[str] = Counter()
        self.status = 200

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        verify([SECRET], body, dict(request.headers))
        self.posts[orjson.loads(body)["data"]["jti"]] += 1
        return JSONResponse({"ok": self.status == 200}, status_code=self.status)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/webhooks/usage", self.hook, methods=["POST"])])


class Host:
    """An edge host's clocks: its wall clock `skew` off the real one; both move only
    when the test says (`advance`)."""

    def __init__(self, skew: float) -> None:
        self.start, self.skew, self.elapsed = time.time(), skew, 0.0

    def wall(self) -> float:
        return self.start + self.skew + self.elapsed

    def monotonic(self) -> float:
        return 1_000.0 + self.elapsed

    def advance(self, seconds: float) -> None:
        self.elapsed += seconds


@pytest.fixture
async def store(redis_prefix: str) -> AsyncIterator[Store]:
    shared = open_store(REDIS_URL, prefix=redis_prefix)
    try:
        yield shared
    finally:
        await shared.close()


async def edge(store: Store, cp: ControlPlane, host: Host, *, linger: float = 0) -> Outbox:
    """An edge's outbox as its lifespan builds it: due times and leases on the store's
    clock, read once (the lifespan reads it every 15 s), run on on `host`'s."""
    clock = StoreClock(monotonic=host.monotonic, wall=host.wall)
    assert await clock.sync(store)
    return Outbox(
        store, InMemoryTransport({URL: cp.app()}), URL, SECRET, EdgeMetrics(),
        lease_seconds=LEASE, linger=linger, backoff=Backoff(base=RETRY, cap=RETRY, floor=RETRY),
        store_clock=clock.now, monotonic=host.monotonic,
    )  # fmt: skip


async def waited_until_claimed(box: Outbox, host: Host, *, step: float = 5.0) -> float:
    """How far `host`'s clocks moved before `box`'s deliverer claimed something."""
    waited = 0.0
    while not await box.deliver_due():
        assert waited <= 3 * SKEW, "never claimed"
        host.advance(step)
        waited += step
    return waited


async def test_an_edge_whose_clock_runs_ahead_leaves_the_reports_another_edge_posts_alone(
    store: Store,
) -> None:
    cp = ControlPlane()
    # The reports of ten streams just ended, leased to their edge, which posts them
    # together (the linger: as a slow control plane keeps posts in flight).
    posting = await edge(store, cp, Host(0), linger=NEVER)
    for i in range(10):
        await posting.enqueue(event(f"r{i}"))
    ahead = await edge(store, cp, Host(+SKEW))
    stolen = await ahead.deliver_due()
    assert await posting.flush(timeout=30) == 0
    assert stolen == 0
    assert cp.posts == Counter({f"r{i}": 1 for i in range(10)})  # each posted once


@pytest.mark.parametrize("skew", [+SKEW, -SKEW], ids=["ahead", "behind"])
async def test_a_dead_edges_report_waits_its_lease_for_an_edge_whose_clock_is_off(
    store: Store, skew: float
) -> None:
    cp = ControlPlane()
    dead = await edge(store, cp, Host(0), linger=NEVER)
    await dead.enqueue(event("orphan"))  # stored, leased to it; then it dies (SIGKILL)
    host = Host(skew)
    waited = await waited_until_claimed(await edge(store, cp, host), host)
    assert LEASE <= waited <= LEASE + 5
    assert cp.posts == Counter({"orphan": 1})


@pytest.mark.parametrize("skew", [+SKEW, -SKEW], ids=["ahead", "behind"])
async def test_a_retry_scheduled_by_an_edge_whose_clock_is_off_keeps_its_backoff(
    store: Store, skew: float
) -> None:
    """The report fails on the skewed edge and backs off RETRY seconds; another edge
    (its clock right) takes the retry."""
    cp = ControlPlane()
    cp.status = 503
    skewed = await edge(store, cp, Host(skew))
    await skewed.enqueue(event("r"))
    assert await skewed.flush(timeout=5) == 1  # posted, refused, rescheduled
    assert cp.posts == Counter({"r": 1})
    cp.status = 200
    host = Host(0)
    waited = await waited_until_claimed(await edge(store, cp, host), host)
    assert RETRY - 5 <= waited <= RETRY + 5
    assert cp.posts == Counter({"r": 2})


async def test_the_edge_app_claims_on_the_stores_clock(
    migrated_pg_url: str, redis_prefix: str
) -> None:
    """The edge's lifespan gives its outbox the store's clock, from its deliverer's
    first pass on: an edge starting with its host 10 minutes ahead leaves another
    edge's leased report to its lease."""
    async with Gateway(base_env(migrated_pg_url), open_store(REDIS_URL, prefix=redis_prefix)) as gw:
        item = {"id": "usage_left", "body": event("left").body().decode(), "attempt": 0}
        leased = await gw.store.server_time() + LEASE  # another edge is posting it
        await gw.store.outbox_put("usage_left", orjson.dumps(item), leased)
        app = await gw.add_edge("ahead", clock=lambda: time.time() + SKEW)
        pending = app.state.edge.metrics.registry.get_sample_value

        def first_pass_done() -> bool:  # its gauge is set at the end of each pass
            return bool(pending("llmgw_edge_outbox_pending") == 1)

        await eventually(first_pass_done, "the deliverer's first pass")
        assert await app.state.edge.outbox.deliver_due() == 0
        assert await gw.store.outbox_size() == 1


async def test_an_edge_started_while_the_store_is_down_claims_on_the_stores_clock(
    migrated_pg_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """The edge starts while its store refuses connections (its first reading of the
    store's clock fails), then the store answers: its deliverer leaves another edge's
    leased report to its lease, as when the store answered from the start."""
    store = PrivateRedis(tmp_path)  # not started yet: its port refuses connections
    edge_store = open_store(store.url, prefix=redis_prefix)
    read_clock = edge_store.server_time
    unanswered = 0

    async def counted() -> float:  # the edge's readings of the store's clock, counted
        nonlocal unanswered
        try:
            return await read_clock()
        except Exception:
            unanswered += 1
            raise

    edge_store.server_time = counted  # type: ignore[method-assign]
    try:
        async with Gateway(
            base_env(migrated_pg_url), open_store(REDIS_URL, prefix=redis_prefix)
        ) as gw:
            app = await gw.add_edge("ahead", clock=lambda: time.time() + SKEW, store=edge_store)
            # Two readings refused: the deliverer's first pass (or its wait) is past.
            await eventually(lambda: unanswered >= 2, "two readings on no store")
            store.start()
            other = open_store(store.url, prefix=redis_prefix)
            try:
                item = {"id": "usage_left", "body": event("left").body().decode(), "attempt": 0}
                leased = await other.server_time() + LEASE  # another edge is posting it
                await other.outbox_put("usage_left", orjson.dumps(item), leased)
            finally:
                await other.close()
            pending = app.state.edge.metrics.registry.get_sample_value
            webhook = f"{CP}/v1/webhooks/usage"

            def pass_done() -> bool:  # its gauge is set at the end of each pass
                posted = ("POST", webhook) in gw.backends.sent
                return posted or pending("llmgw_edge_outbox_pending") == 1

            await eventually(pass_done, "the deliverer's first pass with the store")
            assert ("POST", webhook) not in gw.backends.sent
            assert await app.state.edge.outbox.deliver_due() == 0
    finally:
        store.stop()


async def test_an_edge_whose_store_refuses_time_is_not_ready(
    migrated_pg_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """A store that answers everything but `TIME` (an ACL, a managed Redis that
    renames it): the edge's clock is never read, its deliverer waits for it and its
    times stay its host's, so it must not be taken for ready; once `TIME` answers,
    it is."""
    store = PrivateRedis(tmp_path)
    store.start()
    admin = redis.Redis.from_url(store.url)
    try:
        admin.acl_setuser("default", enabled=True, nopass=True, commands=["-time"], reset=False)
        async with Gateway(
            base_env(migrated_pg_url), open_store(REDIS_URL, prefix=redis_prefix)
        ) as gw:
            app = await gw.add_edge("ahead", store=open_store(store.url, prefix=redis_prefix))
            ready = await gw.clients.send("GET", edge_url("ahead") + "/readyz", {}, b"")
            body = orjson.loads(await ready.aread())
            assert (ready.status_code, body.get("failing")) == (503, ["store"]), body
            admin.acl_setuser("default", commands=["+time"], reset=False)
            await eventually(lambda: app.state.store_clock.has_reading, "a first reading")
            ready = await gw.clients.send("GET", edge_url("ahead") + "/readyz", {}, b"")
            assert ready.status_code == 200, await ready.aread()
    finally:
        admin.close()
        store.stop()
