"""The silence check across a store outage (issue 11.5). A running stream's
checkpoint stops changing while Redis is away because its edge cannot write it,
not because the edge died: the stream relays on (a stale checkpoint is better than
a broken stream, `stream_edge.checkpoints`). Redis back with its data (``appendonly
yes``, as docs/operations.md asks; here: restarted, then the checkpoint it kept
written back), the first sweep may read that checkpoint before the edge's next
heartbeat lands. Time the sweeper could not see the store must not count as
silence: the stream is settled from its own report, not from its pre-outage
checkpoint, and is not revoked.

A private redis-server (`tests.private_redis`), never the machine's shared one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import httpx
import psycopg
import pytest

from control_plane import background
from control_plane.db_threads import DatabaseTimeout
from control_plane.liveness import SilenceWatch
from control_plane.sweeper import sweep_silent_streams
from shared.checkpoints import UsageCheckpoint, checkpoint_key, silent_after
from shared.pricing import MICRO, cost_micro
from shared.revocations import revocation_key
from tests.polling import wait_until
from tests.private_redis import PrivateRedis, private_redis
from tests.test_control_plane import (
    CP,
    _settings,
    assert_books_balance,
    credits_of,
    data_of,
    micro,
    serve_cp,
    usage_event,
)
from tests.token_claims import claims_of

__all__ = ["private_redis"]  # the fixture, used by name


@pytest.fixture
def cp(migrated_pg_url: str, private_redis: PrivateRedis) -> Iterator[CP]:
    # The app's own sweeper stays out of the way: the test drives the sweeps.
    env = {
        "LLMGW_REDIS_URL": private_redis.url,
        "LLMGW_REDIS_PREFIX": "t:",
        "LLMGW_SWEEP_INTERVAL_SECONDS": "3600",
    }
    with serve_cp(_settings(migrated_pg_url, env)) as handle:
        yield handle


@pytest.fixture
def cp_bounded(migrated_pg_url: str, private_redis: PrivateRedis) -> Iterator[CP]:
    """`cp` whose database calls give up after a second."""
    env = {
        "LLMGW_REDIS_URL": private_redis.url,
        "LLMGW_REDIS_PREFIX": "t:",
        "LLMGW_SWEEP_INTERVAL_SECONDS": "3600",
        "LLMGW_DATABASE_TIMEOUT_SECONDS": "1",
    }
    with serve_cp(_settings(migrated_pg_url, env)) as handle:
        yield handle


@dataclass
class Running:
    """A stream under way: its grant, its last checkpoint in the store (beat 5, 12 +
    70 tokens), and a silence watch on a clock the test moves."""

    client: httpx.Client
    company_id: str
    grant: dict[str, Any]
    jti: str
    reservation_id: str
    checkpoint: bytes
    clock: list[float]
    watch: SilenceWatch

    def revoked(self, cp: CP) -> bytes | None:
        store = cp.app.state.store
        return cast(
            "bytes | None",
            cp.on_loop(lambda: store.get(revocation_key("jti", self.jti, self.company_id))),
        )

    def billed_whole_once(self, cp: CP) -> None:
        """The stream ran on and its edge reports it: the whole answer billed, once."""
        report = usage_event(self.grant, self.company_id, input_tokens=12, output_tokens=300)
        assert data_of(cp.webhook(report))["settled"] is True
        price = cp.settings.catalog.models[self.grant["model"]].price
        balance = micro(credits_of(self.client)["balance"])
        assert balance == 10 * MICRO - cost_micro(12, 300, price)
        assert credits_of(self.client)["held"] == "0.000000"
        assert_books_balance(cp, self.company_id, self.client)


def running(cp: CP) -> Running:
    client, company_id = cp.owner_client("10")
    grant = data_of(client.post("/v1/chat/init", json={"query": "hi", "max_tokens": 400}), 201)
    jti = claims_of(grant["stream_token"])["jti"]
    reservation_id = grant["reservation_id"]
    checkpoint = UsageCheckpoint(
        jti, reservation_id, 12, 70, datetime.now(UTC).isoformat(), beat=5
    ).dumps()
    store = cp.app.state.store
    cp.on_loop(lambda: store.set(checkpoint_key(reservation_id), checkpoint, 600))
    clock = [0.0]
    watch = SilenceWatch(silent_after(cp.settings.resume_grace_seconds), lambda: clock[0])
    return Running(client, company_id, grant, jti, reservation_id, checkpoint, clock, watch)


def test_a_store_outage_is_not_silence_the_running_stream_bills_its_report(
    cp: CP, private_redis: PrivateRedis
) -> None:
    stream = running(cp)
    state = cp.app.state

    def sweep() -> Any:
        return cp.on_loop(
            lambda: sweep_silent_streams(
                state.db, state.store, state.metrics, stream.watch, revoke_ttl=600
            )
        )

    assert sweep().settled == 0  # the checkpoint, first seen
    private_redis.stop()
    # Redis away longer than the silence limit: every sweep meanwhile is blind.
    for _ in range(3):
        stream.clock[0] += stream.watch.silent_after / 2
        assert sweep().settled == 0
    private_redis.start()
    # Back with what it kept (AOF), before the edge's next heartbeat is written.
    key = checkpoint_key(stream.reservation_id)
    cp.on_loop(lambda: state.store.set(key, stream.checkpoint, 600))
    assert sweep().settled == 0, "a live stream settled from its pre-outage checkpoint"
    assert stream.revoked(cp) is None
    stream.billed_whole_once(cp)


def test_a_read_answered_late_by_a_frozen_store_is_not_silence(
    cp: CP, private_redis: PrivateRedis
) -> None:
    """Redis frozen (SIGSTOP, a stalled host) for longer than the silence limit but
    less than the store client's 20 s timeout: the sweep's read does not fail, it
    is answered late, before the edge's heartbeat queued behind it. Counted from when
    the answer came back, the pre-freeze checkpoint would look silent and the live
    stream be settled from it and revoked. A reading is as old as its request."""
    stream = running(cp)
    state = cp.app.state

    def sweep() -> Any:
        return sweep_silent_streams(
            state.db, state.store, state.metrics, stream.watch, revoke_ttl=600
        )

    assert cp.on_loop(sweep).settled == 0  # the checkpoint, first seen
    assert private_redis.unread_bytes() == 0
    private_redis.freeze()
    try:
        assert cp.group.loop is not None
        under_way = asyncio.run_coroutine_threadsafe(sweep(), cp.group.loop)
        # The sweep's read is in the frozen server's socket, unanswered ...
        wait_until(lambda: private_redis.unread_bytes() > 0, "the sweep never read the store")
        # ... and answered past the silence limit, before the edge's next heartbeat.
        stream.clock[0] += stream.watch.silent_after + 1
    finally:
        private_redis.thaw()
    settled = under_way.result(30).settled
    assert settled == 0, "a live stream settled from its pre-freeze checkpoint"
    assert stream.revoked(cp) is None
    # The edge's heartbeat lands, the stream runs on and its edge reports it whole.
    after_freeze = UsageCheckpoint(
        stream.jti, stream.reservation_id, 12, 150, datetime.now(UTC).isoformat(), beat=6
    ).dumps()
    key = checkpoint_key(stream.reservation_id)
    cp.on_loop(lambda: state.store.set(key, after_freeze, 600))
    assert cp.on_loop(sweep).settled == 0
    stream.billed_whole_once(cp)


def test_a_silent_stream_settled_after_its_sweep_gave_up_is_counted_and_revoked(
    cp_bounded: CP, migrated_pg_url: str
) -> None:
    """The silent-stream sweep settles a stream whose checkpoint stopped, then revokes
    its token (its edge may only be cut off). Its settlement waited on a lock past
    the database's bound (the sweep gave up), then committed: before, neither the
    credit counters nor the revocation followed, and the next sweep found it settled;
    the stream's edge, if alive, relayed on unbilled. Now the database job's own
    success counts it and revokes the token, once."""
    cp = cp_bounded
    stream = running(cp)
    state = cp.app.state
    assert cp.group.loop is not None

    def sweep() -> Any:
        return asyncio.run_coroutine_threadsafe(
            sweep_silent_streams(
                state.db, state.store, state.metrics, stream.watch, revoke_ttl=600
            ),
            cp.group.loop,
        ).result(30)

    def counted() -> float:
        return float(state.metrics.credits_charged._value.get())

    assert sweep().settled == 0  # the checkpoint, first seen
    stream.clock[0] += stream.watch.silent_after + 1
    before = counted()
    # Another connection holds the company's row: the settlement waits on it past
    # the bound (the sweep gives up), then commits when the lock goes.
    dsn = migrated_pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as locker:
        locker.execute("BEGIN")
        locker.execute("SELECT 1 FROM companies WHERE id = %s FOR UPDATE", (stream.company_id,))
        with pytest.raises(DatabaseTimeout):
            sweep()
        locker.execute("ROLLBACK")
    wait_until(lambda: stream.revoked(cp) is not None, "the late settlement was never revoked")
    assert credits_of(stream.client)["held"] == "0.000000"
    charged = 10 * MICRO - micro(credits_of(stream.client)["balance"])
    assert charged > 0  # from its checkpoint: 12 + 70 tokens
    wait_until(
        lambda: round(counted() - before, 6) == round(charged / MICRO, 6),
        "the late settlement was never counted",
    )
    assert sweep().settled == 0  # already settled: nothing more


class GatedSets:
    """The app's store, whose writes wait at a gate once they have begun: a sweep
    stopped there is stopped mid-revocation."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        self.entered.set()
        await self.gate.wait()
        await self._store.set(key, value, ttl_seconds)


def test_a_sweeper_stopped_while_it_revokes_a_settled_silent_stream_still_revokes_it(
    cp: CP,
) -> None:
    """A rolling deploy stops the control plane (the lifespan cancels its sweeper)
    just after a silent stream's settlement committed, while its token's revocation
    is on its way to Redis. The settlement stands (from the checkpoint): unrevoked,
    an edge that was only cut off relays on, unbilled past the checkpoint."""
    stream = running(cp)
    state = cp.app.state

    async def sweep(store: Any) -> Any:
        return await sweep_silent_streams(
            state.db, store, state.metrics, stream.watch, revoke_ttl=600
        )

    assert cp.on_loop(lambda: sweep(state.store)).settled == 0  # the checkpoint, first seen
    stream.clock[0] += stream.watch.silent_after + 1

    async def stopped_mid_revocation() -> bytes | None:
        gated = GatedSets(state.store)
        sweeper = asyncio.create_task(sweep(gated))
        await gated.entered.wait()  # settled; the revocation is under way
        sweeper.cancel()  # the lifespan stops the sweeper ...
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        gated.gate.set()
        # ... then waits for the background work before it closes the store.
        await background.drain(state.db.busy, 5.0)
        key = revocation_key("jti", stream.jti, stream.company_id)
        return cast("bytes | None", await state.store.get(key))

    assert cp.on_loop(stopped_mid_revocation) is not None, "settled, never revoked"
    assert credits_of(stream.client)["held"] == "0.000000"  # settled from its checkpoint
