"""Replicas whose clocks disagree (no NTP, a VM resumed from pause) share one Redis:
what one writes there with its clock, another must not judge with its own. Two
control planes on one PostgreSQL database and one Redis prefix, the second's wall
clock ten minutes ahead (edges whose clocks disagree: `test_clock_skew.py`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from control_plane.app import create_app
from tests.conftest import REDIS_URL
from tests.test_abuse_storage import _stashes
from tests.test_control_plane import CP, data_of, error_of, pg_settings, serve_cp, usage_event

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


@contextlib.contextmanager
def replicas_of(
    pg_server: str, env: dict[str, str], skew: float = SKEW_SECONDS
) -> Iterator[tuple[CP, CP]]:
    """Two control planes sharing a database and a Redis prefix; the second's host
    clock runs `skew` ahead."""
    with pg_settings(pg_server, env) as settings:
        ahead = create_app(settings, wall_clock=lambda: time.time() + skew)
        with serve_cp(settings) as first, serve_cp(settings, ahead) as second:
            yield first, second


@pytest.fixture(scope="module")
def replicas(pg_server: str) -> Iterator[tuple[CP, CP]]:
    with replicas_of(pg_server, LIMITS) as both:
        yield both


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


RATE = 4


def test_a_replica_whose_clock_runs_ahead_keeps_the_init_rate(pg_server: str) -> None:
    """The init-rate windows are named by their minute, which each replica read on its
    host's clock: ten minutes apart, the two counted in windows of their own, and a
    member alternating between them made 8 inits in a minute past a limit of 4. Now
    every replica reads the windows on the store's clock (`shared.store_clock`)."""
    env = {"LLMGW_INIT_RATE_PER_USER": str(RATE), "LLMGW_INIT_RATE_PER_COMPANY": "100"}
    with replicas_of(pg_server, env) as both:
        for replica in both:  # both have read the store's clock (their lifespan's task)
            assert _read_store_clock(replica)
        _, clients = _member_on_both(both)
        answers = [clients[i % 2].post("/v1/chat/init", json={"query": "hi"}) for i in range(8)]
    granted = [r for r in answers if r.status_code == 201]
    assert len(granted) == RATE, [r.status_code for r in answers]
    for refused in answers[RATE:]:
        error_of(refused, 429, "rate_limited")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60


def _read_store_clock(replica: CP) -> bool:
    """A reading of the store's clock now (the lifespan's task may not have had its
    first yet)."""
    state = replica.app.state
    return bool(replica.on_loop(lambda: state.store_clock.sync(state.store)))


def test_a_replica_whose_clock_runs_ahead_keeps_the_login_failure_limit(pg_server: str) -> None:
    """The failed-login windows (15 minutes, per email and per address) were named on
    each replica's host clock too: a guesser alternating between two replicas a
    window apart had 6 wrong passwords checked past a limit of 3. Now both count in
    the store clock's window."""
    env = {"LLMGW_LOGIN_FAILURES_PER_15MIN": "3"}
    with replicas_of(pg_server, env, skew=15 * 60) as both:
        for replica in both:
            assert _read_store_clock(replica)
        first = both[0]
        email = first.user(first.company("1"), role="member")["email"]
        clients = [replica.client() for replica in both]
        answers = [
            clients[i % 2].post("/v1/auth/login", json={"email": email, "password": f"no-{i}"})
            for i in range(8)
        ]
    assert [r.status_code for r in answers] == [401] * 3 + [429] * 5


TPM = 250  # two inits of 100 tokens and a short query fit, a third does not
TPM_ENV = {
    "LLMGW_TPM_PER_USER": str(TPM),
    "LLMGW_TPM_PER_COMPANY": "1000000",
    "LLMGW_INIT_RATE_PER_USER": "100",
    "LLMGW_MAX_PENDING_INITS_PER_USER": "50",
    "LLMGW_MAX_PENDING_INITS_PER_COMPANY": "50",
}
SMALL = {"query": "hi", "max_tokens": 100}


def _store_time(replica: CP) -> float:
    async def read() -> float:
        return float(await replica.app.state.store.server_time())

    return float(replica.on_loop(read))


def _clear_of_a_minute_boundary(replica: CP, margin: float = 10.0) -> int:
    """The start of the store's current minute, with at least `margin` seconds of it
    left (a test's inits then all fall in it); waits the minute out otherwise."""
    now = _store_time(replica)
    left = 60 - now % 60
    if left < margin:
        time.sleep(left + 0.1)
        now = _store_time(replica)
    return int(now // 60 * 60)


def test_a_replica_whose_clock_runs_ahead_keeps_the_tokens_per_minute(pg_server: str) -> None:
    """The tokens-per-minute windows were named by the minute of each replica's host
    clock: ten minutes apart, each counted in a window of its own, so a member
    alternating between them had 4 inits of ~105 tokens counted in a minute past a
    limit of 250 (each replica's 2). Now every replica counts in the store clock's
    minute: 2 inits, the rest 429 ``tpm_exceeded``."""
    with replicas_of(pg_server, TPM_ENV) as both:
        for replica in both:
            assert _read_store_clock(replica)
        _, clients = _member_on_both(both)
        _clear_of_a_minute_boundary(both[0])
        answers = [clients[i % 2].post("/v1/chat/init", json=SMALL) for i in range(6)]
    granted = [r for r in answers if r.status_code == 201]
    assert len(granted) == 2, [r.status_code for r in answers]
    for refused in answers[2:]:
        error_of(refused, 429, "tpm_exceeded")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60


def _tpm_windows(replica: CP, user_id: str) -> dict[int, int]:
    """The user's tokens-per-minute counters in the store, by their window's start."""
    prefix = f"{replica.settings.redis_prefix}tpm:user:{user_id}:"
    with redis.Redis.from_url(REDIS_URL) as client:
        keys = client.keys(f"{prefix}*")
        return {int(k.decode()[len(prefix) :]): int(client.get(k) or 0) for k in keys}


def test_a_settlement_on_another_replica_corrects_the_window_its_init_counted_in(
    pg_server: str,
) -> None:
    """An init on either replica counts its estimate in the store clock's minute, and
    its settlement, whichever replica (clock ahead or not) takes the webhook, puts
    the tokens used in place of the estimate in that same window, nowhere else: the
    member's next inits fit again."""
    with replicas_of(pg_server, TPM_ENV) as both:
        for replica in both:
            assert _read_store_clock(replica)
        company_id, clients = _member_on_both(both)
        minute = _clear_of_a_minute_boundary(both[0])
        inits = [data_of(clients[i].post("/v1/chat/init", json=SMALL), 201) for i in (1, 0)]
        user_id = usage_event(inits[0], company_id).user_id
        [(start, estimate)] = _tpm_windows(both[0], user_id).items()
        assert start == minute and estimate > 200, (start, minute, estimate)
        error_of(clients[0].post("/v1/chat/init", json=SMALL), 429, "tpm_exceeded")
        # The ahead replica's init settled on the other, the other's on the ahead one.
        for init, settler in zip(inits, both, strict=True):
            event = usage_event(init, company_id, input_tokens=2, output_tokens=3)
            assert settler.webhook(event).status_code == 200
        assert _tpm_windows(both[0], user_id) == {minute: 10}
        for client in clients:
            data_of(client.post("/v1/chat/init", json=SMALL), 201)
