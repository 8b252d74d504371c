"""The silence watch's memory while more streams run than one sweep reads (review
soak). A pass reads at most `MAX_BATCHES` pages of `BATCH` active reservations
(5,000), oldest id first, and only a pass that read them all (a page short of
`BATCH`) let the watch forget the streams that stopped: past 5,000 active holds (a
busy hour, or members keeping inits they never start) it never did, and the watch
kept every stream it had ever seen for as long as that lasted. And every pass read
the same oldest 5,000: a dead edge's streams with newer ids were never checked for
silence, their holds left to their deadlines (~20 min) and their slots to expiry.

Driven on the app's real database and store, with the pages made small (the same
code past 5,000); the silence watch on a clock the test moves (`tests/hold_sweeps`)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from control_plane import sweeper
from control_plane.liveness import SilenceWatch
from shared.checkpoints import UsageCheckpoint, checkpoint_key
from tests.hold_sweeps import silence_sweep
from tests.test_control_plane import CP, cp, data_of, usage_event
from tests.token_claims import claims_of

__all__ = ["cp"]  # the fixture (sqlite, postgres)

BATCH, MAX_BATCHES = 4, 2  # a pass reads 8 active reservations at most
RUNNING_AT_ONCE = 12  # more than a pass reads: no pass is a full scan
STREAMS = 60
INTERVAL = 5.0  # seconds between passes, the default sweep interval


def test_streams_that_ended_are_forgotten_though_no_pass_reads_them_all(
    cp: CP, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweeper, "BATCH", BATCH)
    monkeypatch.setattr(sweeper, "MAX_BATCHES", MAX_BATCHES)
    _, watch, sweep = silence_sweep(cp)
    client, company_id = cp.owner_client("1000")
    store = cp.app.state.store
    running: list[dict[str, object]] = []
    for _ in range(STREAMS):
        grant = data_of(client.post("/v1/chat/init", json={"query": "hi", "max_tokens": 16}), 201)
        jti, rid = claims_of(grant["stream_token"])["jti"], grant["reservation_id"]
        beat = UsageCheckpoint(jti, rid, 12, 1, datetime.now(UTC).isoformat(), beat=1).dumps()
        cp.on_loop(lambda rid=rid, beat=beat: store.set(checkpoint_key(rid), beat, 600))
        running.append(grant)
        if len(running) > RUNNING_AT_ONCE:  # the oldest stream ends: its report settles it
            report = cp.webhook(usage_event(running.pop(0), company_id))
            assert data_of(report)["settled"] is True
        sweep()
    # At most what the last pass read, plus what earlier passes read past it.
    assert len(watch) <= 2 * BATCH * MAX_BATCHES, len(watch)


def _beat(cp: CP, grant: dict[str, object], beat: int) -> None:
    """The edge rewrites `grant`'s checkpoint (a new `beat`: a new marker)."""
    jti, rid = claims_of(str(grant["stream_token"]))["jti"], str(grant["reservation_id"])
    raw = UsageCheckpoint(jti, rid, 12, 1 + beat, datetime.now(UTC).isoformat(), beat=beat)
    store = cp.app.state.store
    cp.on_loop(lambda: store.set(checkpoint_key(rid), raw.dumps(), 600))


def test_a_dead_stream_past_what_one_pass_reads_is_settled_within_a_few_passes(
    cp: CP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: 12 running, 8 read a pass, the stream with the highest id dead from
    the start: 0 settled in 20 passes (100 s on the watch's clock). Now each pass
    goes on from where the last stopped, so it is read every 2 passes and settled
    once seen unchanged for the silence limit; the live ones never are."""
    monkeypatch.setattr(sweeper, "BATCH", BATCH)
    monkeypatch.setattr(sweeper, "MAX_BATCHES", MAX_BATCHES)
    clock, watch, sweep = silence_sweep(cp)
    client, company_id = cp.owner_client("1000")
    grants = [
        data_of(client.post("/v1/chat/init", json={"query": "hi", "max_tokens": 16}), 201)
        for _ in range(RUNNING_AT_ONCE)
    ]
    grants.sort(key=lambda grant: str(grant["reservation_id"]))
    *live, dead = grants  # the newest id: past what the first pass reads
    _beat(cp, dead, 0)  # its edge's last checkpoint, then SIGKILL
    settled_at: list[float] = []
    for n in range(20):
        for grant in live:
            _beat(cp, grant, n)
        settled_at += [clock[0]] * sweep().settled
        clock[0] += INTERVAL
    assert len(settled_at) == 1, settled_at  # the dead one, once; no live one
    passes_a_round = -(-RUNNING_AT_ONCE // (BATCH * MAX_BATCHES))
    # Seen first within a round of passes, then silent at the first visit past the limit.
    latest = (passes_a_round - 1) * INTERVAL + watch.silent_after + passes_a_round * INTERVAL
    assert watch.silent_after <= settled_at[0] <= latest, settled_at
    assert data_of(cp.webhook(usage_event(dead, company_id))) == {"duplicate": True}
    assert data_of(cp.webhook(usage_event(live[-1], company_id)))["settled"] is True


def test_a_pass_forgets_only_among_the_ids_it_read() -> None:
    """A pass that began after "c" and wrapped round to "a" read everything but
    ("a", "c"]: "b" is kept with its first sighting (judged by the next pass that
    reads it), "d" and "a", read and no longer running, are forgotten."""
    clock = [0.0]
    watch = SilenceWatch(16.0, lambda: clock[0])
    for rid in "abde":
        watch.is_silent(rid, 1)
    watch.keep_only_read("c", "a", ["e"])
    assert len(watch) == 2  # "b", unread, and "e", running
    clock[0] = 16.0
    assert watch.is_silent("b", 1) is True  # unchanged since its first sighting
    assert watch.is_silent("e", 1) is True
    watch.keep_only_read("a", "b", [])  # not wrapped: ("a", "b"] read
    assert len(watch) == 1  # "e"
