"""Holds that end in time (issues 11.4, 11.5): a hold's deadline covers the longest
stream a token can start, and a stream whose edge went silent is settled from its
checkpoint long before that deadline, exactly once. Pure rules here; the SIGKILL
end-to-end check is in `test_e2e_edge_crash.py`, the sweeps on a real control plane
in `test_credits_sweeper.py`."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import cast

import pytest

from control_plane.chat_init import hold_deadline
from control_plane.liveness import SilenceWatch
from control_plane.settings import ControlPlaneSettings
from shared.checkpoints import (
    CHECKPOINT_EVERY_SECONDS,
    UsageCheckpoint,
    checkpoint_key,
    silent_after,
)
from shared.settings import ConfigError
from shared.store_memory import MemoryStore
from shared.tokens import LEEWAY_SECONDS, StreamGrant
from stream_edge.checkpoints import Checkpointer
from stream_edge.meter import Meter
from stream_edge.pump import remaining_life
from stream_edge.settings import EdgeSettings
from tests.conftest import new_webhook_secret

BASE = {"LLMGW_WEBHOOK_SECRET": new_webhook_secret()}


def _latest_stream_end(settings: ControlPlaneSettings, issued: int) -> float:
    """The last moment a stream of a token issued at `issued` can still run: started
    at expiry (plus the verifier's leeway), living its maximum, then its resume grace."""
    exp = issued + settings.token_ttl_seconds
    return exp + LEEWAY_SECONDS + settings.max_stream_seconds + settings.resume_grace_seconds


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LLMGW_TOKEN_TTL_SECONDS": "300"},
        {"LLMGW_MAX_STREAM_SECONDS": "3600", "LLMGW_HOLD_GRACE_SECONDS": "4000"},
        {"LLMGW_RESUME_GRACE_SECONDS": "600", "LLMGW_HOLD_GRACE_SECONDS": "2000"},
    ],
)
def test_the_hold_deadline_outlives_the_longest_stream(env: dict[str, str]) -> None:
    """11.4: with the defaults (900 s streams) a 600 s grace let the sweeper settle a
    live stream as `failed` and turned its real report into a duplicate."""
    settings = ControlPlaneSettings.from_env({**BASE, **env})
    issued = 1_800_000_000
    deadline = hold_deadline(issued, settings).timestamp()
    assert deadline > _latest_stream_end(settings, issued)


@pytest.mark.parametrize(
    "env",
    [
        {"LLMGW_HOLD_GRACE_SECONDS": "600"},  # shorter than the default 900 s stream
        {"LLMGW_MAX_STREAM_SECONDS": "3600"},  # longer streams, the default grace
        {"LLMGW_RESUME_GRACE_SECONDS": "600", "LLMGW_HOLD_GRACE_SECONDS": "1200"},
    ],
)
def test_settings_that_let_a_stream_outlive_its_hold_fail_at_start(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="LLMGW_HOLD_GRACE_SECONDS") as caught:
        ControlPlaneSettings.from_env({**BASE, **env})
    assert "\n" not in str(caught.value)


def test_the_hold_deadline_is_a_utc_instant() -> None:
    settings = ControlPlaneSettings.from_env(BASE)
    deadline = hold_deadline(1_800_000_000, settings)
    assert deadline.tzinfo is UTC
    assert deadline == datetime.fromtimestamp(
        1_800_000_000 + settings.token_ttl_seconds + settings.hold_grace_seconds, UTC
    )
    assert settings.hold_grace_seconds == 1200  # the documented default (.env.example)


# --- 11.5: silence, on the control plane's own clock --------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_silence_limit_with_the_defaults_is_well_under_a_minute() -> None:
    settings = ControlPlaneSettings.from_env(BASE)
    limit = silent_after(settings.resume_grace_seconds)
    assert limit == 3 * CHECKPOINT_EVERY_SECONDS + 10
    # first sight of the last checkpoint, then the limit, each up to a sweep late
    assert limit + 2 * settings.sweep_interval_seconds < 60


def _shortest_settling_stall(limit: float, sweep_every: float) -> float:
    """The shortest pause in a live stream's heartbeats (its edge or the store
    stalled) after which a sweep finds it silent: the edge writes a checkpoint every
    `CHECKPOINT_EVERY_SECONDS` up to t = 0 and its next at t = stall; the sweeps run
    every `sweep_every` seconds at any phase (quarter seconds: exact floats)."""
    for quarters in range(1, 4 * 120):
        stall = quarters / 4
        for phase in range(int(sweep_every * 4)):
            clock = FakeClock()
            watch = SilenceWatch(limit, clock)
            clock.now = -40 + phase / 4
            while clock.now < stall:
                last_write = min(0.0, (clock.now // CHECKPOINT_EVERY_SECONDS) * 2)
                if watch.is_silent("r1", last_write):
                    return stall
                clock.now += sweep_every
    raise AssertionError("no stall under two minutes settles")


@pytest.mark.parametrize("sweep_every", ["5", "0.5"])
def test_a_resume_grace_of_0_leaves_the_silence_limit_its_margin(sweep_every: str) -> None:
    """`LLMGW_RESUME_GRACE_SECONDS=0` means no resume (DESIGN §9: a client that leaves
    has its backend cancelled at once), not an edge that may stall less: the silence
    limit took the grace as its margin, 3 heartbeats + 0 = 6 s, so a pause of a few
    heartbeats (a store failover, a GC, a busy event loop) settled a live stream and
    revoked its token. Measured before: a 10.25 s pause settled it with the default
    sweep, 6.25 s with a 0.5 s sweep (3 heartbeats), against 20.25 s and 16.25 s
    with the default grace."""
    zero = ControlPlaneSettings.from_env(
        {**BASE, "LLMGW_RESUME_GRACE_SECONDS": "0", "LLMGW_SWEEP_INTERVAL_SECONDS": sweep_every}
    )
    default = ControlPlaneSettings.from_env({**BASE, "LLMGW_SWEEP_INTERVAL_SECONDS": sweep_every})
    assert zero.resume_grace_seconds == 0  # still accepted: no resume
    every = zero.sweep_interval_seconds
    shortest = _shortest_settling_stall(silent_after(zero.resume_grace_seconds), every)
    assert shortest == _shortest_settling_stall(silent_after(default.resume_grace_seconds), every)
    assert shortest > 8 * CHECKPOINT_EVERY_SECONDS


def test_silence_watch_counts_only_an_unchanged_marker() -> None:
    clock = FakeClock()
    watch = SilenceWatch(16, clock)
    assert not watch.is_silent("r1", (1, "t1", 0))  # first sight
    clock.now += 15.9
    assert not watch.is_silent("r1", (1, "t1", 0))
    clock.now += 0.1
    assert watch.is_silent("r1", (1, "t1", 0))
    # a live stream: the marker changes between sweeps, never silent
    for beat in range(2, 30):
        clock.now += 20
        assert not watch.is_silent("r2", (beat, f"t{beat}", beat))
    # a new marker restarts the count; forgotten streams start over
    assert not watch.is_silent("r1", (2, "t2", 5))
    clock.now += 16
    watch.keep_only(["r2"])
    assert len(watch) == 1
    assert not watch.is_silent("r1", (2, "t2", 5))


def test_silence_watch_counts_a_late_answer_from_its_request() -> None:
    clock = FakeClock()
    watch = SilenceWatch(16, clock)
    sent = watch.now()
    clock.now += 18  # a frozen store answers the first read late: seen from its answer
    assert not watch.is_silent("r1", "m", sent)
    sent = watch.now()
    clock.now += 17  # the next one too: not 16 s since the first was answered
    assert not watch.is_silent("r1", "m", sent)
    sent = watch.now()
    assert watch.is_silent("r1", "m", sent)  # asked 17 s after the first answer


def test_checkpoints_from_before_heartbeats_still_load() -> None:
    old = b'{"jti":"j","reservation_id":"r","input_tokens":1,"output_tokens":2,"updated_at":"x"}'
    point = UsageCheckpoint.loads(old)
    assert (point.beat, point.ended) == (0, False)
    with pytest.raises(ValueError):
        UsageCheckpoint.loads(b'{"jti":"j","reservation_id":"r","input_tokens":1,"beat":"x"}')
    with pytest.raises(ValueError):
        UsageCheckpoint.loads(b"[]")


GRANT = StreamGrant(
    jti="jti-1",
    user_id="u",
    company_id="c",
    role="member",
    scopes=("llm:chat:send",),
    session_id="s",
    model="mock-fast",
    max_tokens=100,
    max_input_tokens=100,
    reservation_id="res-1",
    request_id="req",
    issued_at=0,
    expires_at=0,
)


async def _read(store: MemoryStore) -> UsageCheckpoint:
    raw = await store.get(checkpoint_key(GRANT.reservation_id))
    assert raw is not None
    return UsageCheckpoint.loads(raw)


async def test_the_edge_heartbeats_while_no_token_flows_and_ends_last() -> None:
    """11.5: a stream waiting on a slow backend still shows it is alive; a finished
    one says so, so its report (not the sweeper) settles it."""
    store = MemoryStore()
    meter = Meter(input_estimate=12, keep_transcript=False)
    checkpointer = Checkpointer(store, GRANT, meter, ttl_seconds=600, every_seconds=0.01)
    checkpointer.start()
    deadline = asyncio.get_running_loop().time() + 10
    while (await store.get(checkpoint_key(GRANT.reservation_id))) is None or (
        await _read(store)
    ).beat < 3:
        assert asyncio.get_running_loop().time() < deadline, "no heartbeat"
        await asyncio.sleep(0.01)
    beating = await _read(store)
    assert (beating.output_tokens, beating.ended, beating.input_tokens) == (0, False, 12)
    await checkpointer.close()
    final = await _read(store)
    assert final.ended and final.beat > beating.beat
    # The heartbeat stopped: no task of the checkpointer is left to overwrite the end.
    others = asyncio.all_tasks() - {asyncio.current_task()}
    assert all(task.done() for task in others), others
    assert await _read(store) == final


def test_a_streams_life_counts_from_its_request_not_from_its_backends_answer() -> None:
    """The stream's slots expire `LLMGW_MAX_STREAM_SECONDS` after admission and its
    hold's deadline assumes no stream outlives that; the relay's clock started only
    once the backend had answered, so a stream whose opening took long (retries, a
    fallback waiting up to a minute for its first token) ran past its slots, and its
    whole answer past the hold's deadline. What is left is counted from arrival."""
    settings = cast(EdgeSettings, SimpleNamespace(max_stream_seconds=10))
    opened_late = remaining_life(settings, time.perf_counter() - 4)
    assert 5.0 < opened_late <= 6.0
    assert remaining_life(settings, time.perf_counter() - 60) == 0.0
    assert 9.0 < remaining_life(settings, time.perf_counter()) <= 10.0
