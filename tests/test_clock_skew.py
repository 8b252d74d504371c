"""Hosts whose wall clocks disagree: an edge minutes ahead of (or behind) the control
plane. Standard Webhooks refuses a signature dated more than 5 minutes off the
receiver's clock (DESIGN §7: 401), and the edge's outbox takes a 401 as permanent.

In process (`tests.inproc.Gateway`) on PostgreSQL: the edge's wall clock is skewed,
the control plane's is the real one."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from shared.webhooks import generate_secret, sign
from tests.inproc import Gateway, events, opened
from tests.stack import base_env, micro
from tests.test_outbox_linger import event

TOKENS = 7


@pytest.mark.parametrize("skew", [360.0, -360.0], ids=["ahead", "behind"])
async def test_an_edge_whose_clock_is_minutes_off_still_settles_each_stream_once(
    pg_database_url: str, skew: float
) -> None:
    async with Gateway(base_env(pg_database_url)) as gw:
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
    pg_database_url: str,
) -> None:
    async with Gateway(base_env(pg_database_url)) as gw:
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
