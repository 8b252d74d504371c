"""Replicas whose clocks disagree (no NTP, a VM resumed from pause) share one Redis:
what one writes there with its clock, another must not judge with its own. Two
control planes on one PostgreSQL database and one Redis prefix, the second's wall
clock ten minutes ahead (edges whose clocks disagree: `test_clock_skew.py`)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.test_abuse_storage import _stashes
from tests.test_control_plane import CP, error_of, pg_settings, serve_cp

PENDING = 3
SKEW_SECONDS = 600.0
# A short stream and grace: a hold's deadline (the token's 120 s + 100 s) is then
# shorter than the skew, as the defaults' 22 minutes are shorter than a larger one.
LIMITS = {
    "LLMGW_MAX_PENDING_INITS_PER_USER": str(PENDING),
    "LLMGW_MAX_PENDING_INITS_PER_COMPANY": "50",
    "LLMGW_MAX_STREAM_SECONDS": "10",
    "LLMGW_HOLD_GRACE_SECONDS": "100",
}


@pytest.fixture(scope="module")
def replicas(pg_server: str) -> Iterator[tuple[CP, CP]]:
    with (
        pg_settings(pg_server, LIMITS) as settings,
        serve_cp(settings) as first,
        serve_cp(settings) as ahead,
    ):
        ahead.app.state.deps.wall_clock = lambda: time.time() + SKEW_SECONDS
        yield first, ahead


def _member_on_both(replicas: tuple[CP, CP]) -> tuple[str, list[httpx.Client]]:
    first, ahead = replicas
    company_id = first.company("10")
    key = first.api_key(first.user(company_id, role="member", password=None)["id"])
    return company_id, [first.client(key), ahead.client(key)]


def test_a_replica_whose_clock_runs_ahead_keeps_the_pending_init_cap(
    replicas: tuple[CP, CP],
) -> None:
    """The pending sets' members were scored with the minting replica's deadline and
    pruned with the caller's `now`: the replica ten minutes ahead dropped the other's
    live grants as expired, so a member alternating between the two got 6 pending
    inits (and 6 stashed requests) past a cap of 3. Now the store's own clock
    (Redis `TIME`) scores and prunes them: the cap holds whichever replica counts."""
    company_id, clients = _member_on_both(replicas)
    answers = [clients[i % 2].post("/v1/chat/init", json={"query": "hi"}) for i in range(8)]
    granted = [r for r in answers if r.status_code == 201]
    assert len(granted) == PENDING, [r.status_code for r in answers]
    assert _stashes(replicas[0], company_id) == PENDING
    settings = replicas[0].settings
    for refused in answers[PENDING:]:
        error_of(refused, 429, "too_many_pending_inits")
        # In the refusing replica's own terms: the deadline less its clock.
        retry_after = int(refused.headers["Retry-After"])
        assert 0 < retry_after <= settings.token_ttl_seconds + settings.hold_grace_seconds + 1
