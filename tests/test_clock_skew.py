"""Hosts whose wall clocks disagree: an edge minutes ahead of (or behind) the control
plane. Standard Webhooks refuses a signature dated more than 5 minutes off the
receiver's clock (DESIGN §7: 401), and the edge's outbox takes a 401 as permanent.

In process (`tests.inproc.Gateway`) on PostgreSQL: the edge's wall clock is skewed,
the control plane's is the real one."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from control_plane.deps import Deps
from control_plane.liveness import SilenceWatch
from control_plane.sweeper import sweep_round
from control_plane.tables import utcnow
from shared.checkpoints import UsageCheckpoint, checkpoint_key, silent_after
from shared.revocations import revocation_key
from shared.webhooks import generate_secret, sign
from tests.inproc import Gateway, events, eventually, opened
from tests.stack import base_env, micro
from tests.test_outbox_linger import event
from tests.token_claims import claims_of

TOKENS = 7


@pytest.mark.parametrize("skew", [360.0, -360.0], ids=["ahead", "behind"])
async def test_an_edge_whose_clock_is_minutes_off_still_settles_each_stream_once(
    migrated_pg_url: str, skew: float
) -> None:
    async with Gateway(base_env(migrated_pg_url)) as gw:
        await gw.add_edge("skewed", clock=lambda: time.time() + skew)
        access = await gw.new_user("5")
        before = micro((await gw.credits(access))["balance"])
        grants = [
            await gw.init_ok(access, {"query": f"q{i} [[mock tokens={TOKENS}]]"}) for i in range(2)
        ]
        for grant in grants:
            async with opened(await gw.get(grant["stream_url"], edge="skewed")) as response:
                assert response.status_code == 200
                assert (await events(response))[-1].event == "complete"
        # Each report settles (the first teaches the edge the control plane's clock;
        # the second is dated by it at once), and none waits in the dead letters for
        # an operator while its hold stays taken until the sweeper's deadline.
        records = [await gw.wait_usage(access, g["reservation_id"]) for g in grants]
        assert [(r["status"], r["output_tokens"]) for r in records] == [("completed", TOKENS)] * 2
        assert await gw.store.dead_letter_count() == 0
        after = await gw.credits(access)
        assert before - micro(after["balance"]) == sum(micro(r["cost"]) for r in records) > 0
        assert after["held"] == "0.000000"
        # The answer reached the session too (the sweeper's settlement carries none).
        session = await gw.http.get(
            f"/v1/sessions/{grants[0]['session_id']}",
            headers={"Authorization": f"Bearer {access}"},
        )
        assert session.status_code == 200, session.text
        assert [m["role"] for m in session.json()["data"]["messages"]][-1] == "assistant"


async def test_a_webhook_dated_out_of_the_window_is_refused_and_only_its_signer_learns_why(
    migrated_pg_url: str,
) -> None:
    async with Gateway(base_env(migrated_pg_url)) as gw:
        body = event("late").body()
        late = datetime.now(UTC) - timedelta(minutes=6)
        ours = sign(gw.env["LLMGW_WEBHOOK_SECRET"], "usage_late", body, late)
        # Our secret, 6 minutes old (a replay, or a clock behind): still refused, and
        # the signer is told our time to date a retry by.
        refused = await gw.http.post("/v1/webhooks/usage", content=body, headers=ours)
        assert refused.status_code == 401, refused.text
        error = refused.json()["error"]
        assert error["code"] == "timestamp_out_of_window"
        assert abs(error["details"]["server_time"] - time.time()) < 60
        # Anyone else's signature, dated the same: a bad signature, and no time told.
        other = sign(generate_secret(), "usage_late", body, late)
        ours_redated = {**ours, "webhook-timestamp": str(int(time.time()))}
        for forged in (other, ours_redated):  # another secret; ours moved into the window
            refused = await gw.http.post("/v1/webhooks/usage", content=body, headers=forged)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "invalid_signature"
            assert "details" not in refused.json()["error"]


# Long enough (~5 s) for the edge's 2 s heartbeat to rewrite its checkpoint mid-stream.
STREAM_TOKENS = 100


async def sweep_round_ahead(deps: Deps, watch: SilenceWatch, ahead: timedelta) -> None:
    """One round of `run_sweeper`'s loop, its wall clock `ahead` of the real one."""
    await sweep_round(deps.db, deps.store, deps.metrics, deps.settings, watch, now=utcnow() + ahead)


async def test_a_sweeper_whose_clock_is_ahead_leaves_a_running_stream_to_its_report(
    migrated_pg_url: str,
) -> None:
    # A hold's deadline is its token's expiry (the minting process's clock) plus the
    # grace; here the grace is the least the settings allow, so a sweeper 6 minutes
    # ahead of that clock finds a stream just begun already past its deadline.
    env = {
        **base_env(migrated_pg_url),
        "LLMGW_SWEEP_INTERVAL_SECONDS": "3600",  # the test runs the sweeper's round
        "LLMGW_MAX_STREAM_SECONDS": "60",
        "LLMGW_RESUME_GRACE_SECONDS": "0",
        "LLMGW_HOLD_GRACE_SECONDS": "200",
    }
    async with Gateway(env) as gw:
        deps = gw.cp.state.deps
        access = await gw.new_user("5")
        before = micro((await gw.credits(access))["balance"])
        grant = await gw.init_ok(
            access, {"query": f"long [[mock tokens={STREAM_TOKENS} delay_ms=50]]"}
        )
        async with opened(await gw.get(grant["stream_url"])) as response:
            assert len(await events(response, stop_after=5)) == 5
            # The sweeper's rounds see the stream's checkpoint, then see it change...
            key = checkpoint_key(grant["reservation_id"])
            await eventually(lambda: gw.store.get(key), "the stream's checkpoint")
            first = await gw.store.get(key)
            watch = SilenceWatch(silent_after(deps.settings.resume_grace_seconds))
            await sweep_round_ahead(deps, watch, ahead=timedelta(0))

            async def rewritten() -> bool:
                return await gw.store.get(key) != first

            await eventually(rewritten, "the edge's next checkpoint")
            # ...and the next round runs on a clock 6 minutes ahead: past the deadline.
            await sweep_round_ahead(deps, watch, ahead=timedelta(minutes=6))
            rest = await events(response)
        assert rest[-1].event == "complete"
        # Billed once, from the stream's own report: every token it relayed.
        record = await gw.wait_usage(access, grant["reservation_id"])
        assert (record["status"], record["output_tokens"]) == ("completed", STREAM_TOKENS)
        after = await gw.credits(access)
        assert before - micro(after["balance"]) == micro(record["cost"])
        assert after["held"] == "0.000000"


@contextlib.asynccontextmanager
async def _a_stream_swept_by_the_test(
    database_url: str,
) -> AsyncIterator[tuple[Gateway, str, dict[str, Any]]]:
    """A gateway whose sweeper waits for the test (an hour between rounds), a new
    user and its grant for a 50-token stream: the gateway, the user's token, the grant."""
    env = {**base_env(database_url), "LLMGW_SWEEP_INTERVAL_SECONDS": "3600"}
    async with Gateway(env) as gw:
        access = await gw.new_user("5")
        yield gw, access, await gw.init_ok(access, {"query": "dies [[mock tokens=50]]"})


async def test_a_dead_streams_hold_past_its_deadline_is_still_settled_once_silent(
    migrated_pg_url: str,
) -> None:
    async with _a_stream_swept_by_the_test(migrated_pg_url) as (gw, access, grant):
        deps = gw.cp.state.deps
        jti, key = claims_of(grant["stream_token"])["jti"], checkpoint_key(grant["reservation_id"])

        async def edge_writes(beat: int) -> None:  # an edge's checkpoint of the stream
            checkpoint = UsageCheckpoint(
                jti=jti,
                reservation_id=grant["reservation_id"],
                input_tokens=10,
                output_tokens=12 + beat,
                updated_at="2026-01-01T00:00:00.000Z",
                beat=beat,
            )
            await gw.store.set(key, checkpoint.dumps(), 3600)

        # The sweeper's rounds, on a monotonic clock the test moves: the first before
        # the deadline, the others on a wall clock far past it.
        moments = [0.0]
        watch = SilenceWatch(silent_after(deps.settings.resume_grace_seconds), lambda: moments[0])
        args = (deps.db, deps.store, deps.metrics, deps.settings, watch)
        later = utcnow() + timedelta(hours=2)
        await edge_writes(1)
        await sweep_round(*args)
        await edge_writes(2)  # alive... then its edge dies (SIGKILL)
        await sweep_round(*args, now=later)
        assert (await gw.credits(access))["held"] != "0.000000"  # seen alive: waited for
        moments[0] += watch.silent_after
        await sweep_round(*args, now=later)  # silent: settled from it, and revoked
        record = await gw.wait_usage(access, grant["reservation_id"])
        assert (record["status"], record["output_tokens"]) == ("failed", 14)
        assert (await gw.credits(access))["held"] == "0.000000"
        revoked = revocation_key("jti", jti, claims_of(grant["stream_token"])["company_id"])
        await eventually(lambda: gw.store.get(revoked), "the stream's revocation")


async def test_a_hold_past_its_deadline_whose_checkpoint_never_changed_is_settled_at_once(
    migrated_pg_url: str,
) -> None:
    async with _a_stream_swept_by_the_test(migrated_pg_url) as (gw, access, grant):
        deps = gw.cp.state.deps
        checkpoint = UsageCheckpoint(
            jti=claims_of(grant["stream_token"])["jti"],
            reservation_id=grant["reservation_id"],
            input_tokens=10,
            output_tokens=12,
            updated_at="2026-01-01T00:00:00.000Z",
        )
        await gw.store.set(checkpoint_key(grant["reservation_id"]), checkpoint.dumps(), 3600)
        watch = SilenceWatch(silent_after(deps.settings.resume_grace_seconds))
        later = utcnow() + timedelta(hours=2)
        await sweep_round(deps.db, deps.store, deps.metrics, deps.settings, watch, now=later)
        record = await gw.wait_usage(access, grant["reservation_id"])
        assert (record["status"], record["output_tokens"]) == ("failed", 12)


@pytest.mark.parametrize("skew", [600.0, -600.0], ids=["ahead", "behind"])
async def test_a_silent_streams_reconciliation_lag_is_not_the_edges_clock_offset(
    migrated_pg_url: str, skew: float
) -> None:
    """`llmgw_cp_reconciliation_lag_seconds` (LLMGWReconciliationLagHigh: p95 over a
    minute) counts from a silent stream's last checkpoint to its settlement; the
    checkpoint is dated by the edge, the settlement by the control plane."""
    env = {**base_env(migrated_pg_url), "LLMGW_SWEEP_INTERVAL_SECONDS": "3600"}
    async with Gateway(env) as gw:
        app = await gw.add_edge("skewed", clock=lambda: time.time() + skew)
        assert await app.state.store_clock.sync(gw.store)
        deps = gw.cp.state.deps
        access = await gw.new_user("5")
        grant = await gw.init_ok(access, {"query": "long [[mock tokens=400 delay_ms=50]]"})
        async with opened(await gw.get(grant["stream_url"], edge="skewed")) as response:
            assert len(await events(response, stop_after=5)) == 5
            key = checkpoint_key(grant["reservation_id"])
            await eventually(lambda: gw.store.get(key), "the stream's checkpoint")
            # The edge's next heartbeat is up to 2 s away; the watch's clock jumps past
            # the silence limit between two rounds (`test_credits_sweeper.py`).
            moments = [0.0]
            watch = SilenceWatch(
                silent_after(deps.settings.resume_grace_seconds), lambda: moments[0]
            )
            lag = deps.metrics.registry.get_sample_value
            args = (deps.db, deps.store, deps.metrics, deps.settings, watch)
            for _ in range(10):
                await sweep_round(*args, clock=deps.clock)
                moments[0] += watch.silent_after
                await sweep_round(*args, clock=deps.clock)
                if lag("llmgw_cp_reconciliation_lag_seconds_count"):
                    break
            assert lag("llmgw_cp_reconciliation_lag_seconds_count") == 1
            await events(response)  # revoked: the stream ends
        # Seconds since the edge's last write, not its host's offset (or none of it).
        observed = lag("llmgw_cp_reconciliation_lag_seconds_sum")
        assert observed is not None and 0 < observed < 30, observed


@pytest.mark.parametrize("skew", [600.0, -600.0], ids=["ahead", "behind"])
async def test_a_reported_streams_reconciliation_lag_is_not_the_edges_clock_offset(
    migrated_pg_url: str, skew: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same histogram for the common settlement, a webhook: counted from the
    report's ``ended_at``, which the edge dated by its host's clock while the control
    plane read its own, so every stream of an edge 10 minutes behind observed ~600 s
    (LLMGWReconciliationLagHigh: p95 over a minute) and one ahead hid the lag."""

    class HostClock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> HostClock:
            return cls.fromtimestamp(time.time() + skew, tz)

    # The skewed edge's host: what it reads as the time of day.
    monkeypatch.setattr("stream_edge.usage_report.datetime", HostClock)
    async with Gateway(base_env(migrated_pg_url)) as gw:
        app = await gw.add_edge("skewed", clock=lambda: time.time() + skew)
        assert await app.state.store_clock.sync(gw.store)
        deps = gw.cp.state.deps
        access = await gw.new_user("5")
        grant = await gw.init_ok(access, {"query": f"q [[mock tokens={TOKENS}]]"})
        async with opened(await gw.get(grant["stream_url"], edge="skewed")) as response:
            assert (await events(response))[-1].event == "complete"
        await gw.wait_usage(access, grant["reservation_id"])
        lag = deps.metrics.registry.get_sample_value
        # Observed once the settlement's commit is back: the usage record may be
        # read (same event loop) before that (an edge behind: its webhook's retry).
        await eventually(
            lambda: lag("llmgw_cp_reconciliation_lag_seconds_count"), "the lag observed"
        )
        assert lag("llmgw_cp_reconciliation_lag_seconds_count") == 1
        observed = lag("llmgw_cp_reconciliation_lag_seconds_sum")
        assert observed is not None and 0 < observed < 30, observed
