"""An edge that dies mid-stream (SIGKILL, OOM, a lost node) sends no report, and the
report is what gives the stream's concurrency slots back. The sweeper finds the
stream's checkpoint silent within `silent_after` (16 s by default) and settles its
hold then; its slots must go back then too, not at their expiry
(``LLMGW_MAX_STREAM_SECONDS``, 15 minutes by default), or the user (and, for an edge
that carried many of them, the company) is refused 429 ``too_many_streams`` for a
quarter of an hour after the edge is gone and replaced.

Driven on the app's real store (MemoryStore on SQLite, Redis on PostgreSQL) and a
silence watch on a clock the test moves; the slots are taken by the store's own
admission, as the edge takes them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import DBAPIError

from control_plane import sweeper
from control_plane.liveness import SilenceWatch
from control_plane.pending_inits import used_key
from control_plane.revocation_republish import republish_pass
from control_plane.revoking import revocation_ttl
from control_plane.sweeper import sweep_silent_streams
from shared.checkpoints import UsageCheckpoint, checkpoint_key, silent_after
from shared.revocations import revocation_key
from shared.store import Admission, SlotRelease
from shared.stream_slots import slot_keys
from tests.lost_commits import lose_the_transaction_answer_of
from tests.polling import wait_until
from tests.test_control_plane import CP, cp, data_of, micro, start_cp, usage_event
from tests.token_claims import claims_of

__all__ = ["cp"]  # the fixture (sqlite, postgres)

ONE_STREAM_PER_USER = [1, 200]  # user, company
MAX_STREAM_SECONDS = 900.0  # the slots' own expiry, the default


def admit(cp: CP, company_id: str, user_id: str, jti: str) -> str:
    """Take `jti`'s stream slots as the edge's admission does; the verdict."""
    now = time.time()
    admission = Admission(
        revocation_keys=[],
        used_key=used_key(company_id, jti),
        path="stream",
        used_ttl_seconds=300,
        slot_keys=slot_keys(company_id, user_id),
        limits=ONE_STREAM_PER_USER,
        member=jti,
        now=now,
        slots_expire_at=now + MAX_STREAM_SECONDS,
    )
    store = cp.app.state.store
    return str(cp.on_loop(lambda: store.admit(admission)).verdict)


@dataclass
class Running:
    """A stream admitted as the edge admits it, its checkpoint written, and a silence
    watch on a clock the test moves."""

    client: Any
    company_id: str
    user_id: str
    jti: str
    grant: dict[str, Any]
    clock: list[float]
    watch: SilenceWatch


def running_stream(cp: CP) -> Running:
    client, company_id = cp.owner_client("10")
    grant = data_of(client.post("/v1/chat/init", json={"query": "hi", "max_tokens": 200}), 201)
    claims = claims_of(grant["stream_token"])
    user_id, jti = str(claims["sub"]), str(claims["jti"])
    assert admit(cp, company_id, user_id, jti) == "ok"
    point = UsageCheckpoint(jti, grant["reservation_id"], 12, 70, "t", beat=4)
    store = cp.app.state.store
    cp.on_loop(lambda: store.set(checkpoint_key(grant["reservation_id"]), point.dumps(), 600))
    clock = [0.0]
    watch = SilenceWatch(silent_after(cp.settings.resume_grace_seconds), lambda: clock[0])
    return Running(client, company_id, user_id, jti, grant, clock, watch)


def sweep(cp: CP, run: Running) -> Any:
    state = cp.app.state
    return cp.on_loop(
        lambda: sweep_silent_streams(
            state.db, state.store, state.metrics, run.watch, revoke_ttl=600
        )
    )


def next_stream(cp: CP, run: Running) -> str:
    """The user's next stream's admission, on a healthy edge."""
    grant = data_of(run.client.post("/v1/chat/init", json={"query": "hi", "max_tokens": 200}), 201)
    return admit(cp, run.company_id, run.user_id, str(claims_of(grant["stream_token"])["jti"]))


def test_a_dead_edges_stream_gives_its_slots_back_when_the_sweeper_settles_it(cp: CP) -> None:
    # The edge is killed: no report, the checkpoint stops changing.
    run = running_stream(cp)
    assert sweep(cp, run).settled == 0  # first sight
    run.clock[0] += run.watch.silent_after
    assert sweep(cp, run).settled == 1  # 16 s on: settled from its checkpoint
    # The user's next stream, seconds after the settlement: its slot is free, where it
    # stayed taken for the 15 minutes of the slot's life.
    assert next_stream(cp, run) == "ok"


def test_a_stalled_edges_late_report_after_the_sweep_changes_nothing_more(cp: CP) -> None:
    """The edge was only stalled: the sweeper settled and freed the stream, then its
    own report arrives with its slot release. A duplicate, and the other stream's
    slot, taken meanwhile, stays taken."""
    run = running_stream(cp)
    sweep(cp, run)
    run.clock[0] += run.watch.silent_after
    sweep(cp, run)
    assert next_stream(cp, run) == "ok"

    late = usage_event(run.grant, run.company_id, input_tokens=12, output_tokens=90)
    assert data_of(cp.webhook(late)) == {"duplicate": True}
    store = cp.app.state.store
    keys = slot_keys(run.company_id, run.user_id)
    cp.on_loop(lambda: store.release_slots(SlotRelease(keys, run.jti)))
    assert next_stream(cp, run) == "full"


def test_a_silent_settlement_whose_answer_was_lost_still_revokes_and_frees_the_stream(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweeper's settlement of a silent stream commits and the connection dies
    before its answer (a cut network, a killed backend). Before, the pass saw only a
    failure: no revocation, no slots given back, and every later pass found the hold
    settled (nothing to do), so a stalled edge relayed the rest of its answer
    unbilled and the user's slot stayed taken for its 15 minutes."""
    with start_cp(request, tmp_path, "postgres") as cp:
        run = running_stream(cp)
        sweep(cp, run)  # first sight
        run.clock[0] += run.watch.silent_after
        cut: list[str] = []
        lose_the_transaction_answer_of(monkeypatch, sweeper, "reconcile", cut)
        with pytest.raises(DBAPIError):
            sweep(cp, run)
        assert cut == ["after the commit"]
        monkeypatch.undo()
        # It did commit: the hold is settled from the checkpoint.
        credits = data_of(run.client.get("/v1/credits"))
        assert micro(credits["held"]) == 0 and micro(credits["balance"]) < 10_000_000
        store = cp.app.state.store
        revoked = revocation_key("jti", run.jti, run.company_id)
        wait_until(
            lambda: cp.on_loop(lambda: store.get(revoked)) is not None,
            "the stream whose settlement's answer was lost is revoked",
            within=15,
        )
        wait_until(lambda: next_stream(cp, run) == "ok", "its slot is given back", within=15)
        assert sweep(cp, run).settled == 0  # nothing more to do


def test_a_silent_streams_revocation_the_store_lost_is_republished(cp: CP) -> None:
    """Attack: the sweeper settles a silent stream (its edge only stalled) and revokes
    its token, then the store loses that key (Redis fails over to a replica that had
    not got it). Its hold is settled, so whatever the edge relays once it wakes is
    never billed (its report a duplicate), and the revocation was the only thing
    ending it. Before the fix no pass brought the key back: the stream's reconnect
    was admitted (`reconnect`) for the rest of the token's life."""
    run = running_stream(cp)
    sweep(cp, run)
    run.clock[0] += run.watch.silent_after
    assert sweep(cp, run).settled == 1
    state = cp.app.state
    revoked = revocation_key("jti", run.jti, run.company_id)
    assert cp.on_loop(lambda: state.store.get(revoked)) is not None
    cp.on_loop(lambda: state.store.delete(revoked))  # the failover

    ttl = revocation_ttl(cp.settings)
    cp.on_loop(lambda: republish_pass(state.db, state.store, ttl))
    reconnect = Admission(
        revocation_keys=[revocation_key("user", run.user_id, run.company_id), revoked],
        used_key=used_key(run.company_id, run.jti),
        path="stream",
        used_ttl_seconds=300,
        slot_keys=slot_keys(run.company_id, run.user_id),
        limits=ONE_STREAM_PER_USER,
        member=run.jti,
        now=time.time(),
        slots_expire_at=time.time() + MAX_STREAM_SECONDS,
    )
    assert cp.on_loop(lambda: state.store.admit(reconnect)).verdict == "revoked"
    late = usage_event(run.grant, run.company_id, input_tokens=12, output_tokens=900)
    assert data_of(cp.webhook(late)) == {"duplicate": True}  # what it relays is free
