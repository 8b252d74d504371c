"""The silence watch's memory while more streams run than one sweep reads (review
soak). A pass reads at most `MAX_BATCHES` pages of `BATCH` active reservations
(5,000), oldest id first, and only a pass that read them all (a page short of
`BATCH`) let the watch forget the streams that stopped: past 5,000 active holds (a
busy hour, or members keeping inits they never start) it never did, and the watch
kept every stream it had ever seen for as long as that lasted.

Driven on the app's real database and store, with the pages made small (the same
code past 5,000); the silence watch on a clock the test moves (`tests/hold_sweeps`)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from control_plane import sweeper
from shared.checkpoints import UsageCheckpoint, checkpoint_key
from tests.hold_sweeps import silence_sweep
from tests.test_control_plane import CP, cp, data_of, usage_event
from tests.token_claims import claims_of

__all__ = ["cp"]  # the fixture (sqlite, postgres)

BATCH, MAX_BATCHES = 4, 2  # a pass reads 8 active reservations at most
RUNNING_AT_ONCE = 12  # more than a pass reads: no pass is a full scan
STREAMS = 60


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
