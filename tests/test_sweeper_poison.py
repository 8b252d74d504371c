"""One reservation the sweeper cannot reconcile must not hold up every other
company's (attack review: poison pills in shared passes).

Before, the first reservation whose reconciliation raised ended the pass, and the
next pass listed it first again (oldest deadline first; the silent-stream pass by
id): one company's row the database refused, or held by a long transaction, kept
every other company's expired holds held and its silent streams unsettled, for as
long as it lasted. Now that reservation is skipped for the pass, the others are
reconciled, and the pass raises its first failure for the loop's log.

The poison is real: a company row held by another connection (FOR UPDATE), or a
company row whose cached ``held_micro`` no longer covers its holds, so that the
database refuses the release (CHECK ``held_micro >= 0``), as it would after a
hand-made fix gone wrong."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from control_plane import sweeper
from control_plane.db import Database
from control_plane.db_threads import DatabaseTimeout
from control_plane.sweeper import sweep_expired_holds
from control_plane.tables import Company, Reservation
from tests.hold_sweeps import expire_hold as _expire
from tests.hold_sweeps import silence_sweep
from tests.test_control_plane import CP, assert_books_balance, cp, credits_of
from tests.test_credits_sweeper import _checkpoint, _init

__all__ = ["cp"]  # the fixture (sqlite, postgres) shared with test_control_plane

postgres_only = pytest.mark.parametrize("cp", ["postgres"], indirect=True)


def _poison(cp: CP, company_id: str) -> None:
    """The company's cached held amount no longer covers its holds: the database
    refuses any release or settlement of them (CHECK ``held_micro >= 0``)."""

    def drift(session: Any) -> None:
        session.execute(update(Company).where(col(Company.id) == company_id).values(held_micro=0))

    cp.on_loop(lambda: cp.app.state.db.transaction(drift))


def _status(cp: CP, reservation_id: str) -> str:
    def read(session: Any) -> str:
        return str(session.get(Reservation, reservation_id).status)

    return str(cp.on_loop(lambda: cp.app.state.db.transaction(read)))


def test_a_reservation_the_database_refuses_holds_up_no_other_companys_hold(
    cp: CP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Company A's three holds expired first and the database refuses to release
    them; company B's expired later. B's is released in the same pass (pages of two:
    A's are not listed again), A's stay for the next pass, which raises again."""
    monkeypatch.setattr(sweeper, "BATCH", 2)
    poisoned, poisoned_id = cp.owner_client("10")
    victim, victim_id = cp.owner_client("10")
    bad = [_init(poisoned) for _ in range(3)]
    good = _init(victim)
    for i, init in enumerate(bad):
        _expire(cp, init["reservation_id"], timedelta(minutes=10 - i))
    _expire(cp, good["reservation_id"], timedelta(minutes=1))
    _poison(cp, poisoned_id)
    state = cp.app.state

    def sweep() -> Any:
        return cp.on_loop(lambda: sweep_expired_holds(state.db, state.store, state.metrics))

    with pytest.raises(IntegrityError):
        sweep()
    assert _status(cp, good["reservation_id"]) == "released"
    assert credits_of(victim)["held"] == "0.000000"
    assert_books_balance(cp, victim_id, victim)
    assert [_status(cp, init["reservation_id"]) for init in bad] == ["active"] * 3
    with pytest.raises(IntegrityError):  # tried again by the next pass
        sweep()


@postgres_only
def test_a_company_row_held_by_a_long_transaction_holds_up_no_other_companys_hold(
    cp: CP,
) -> None:
    """Another connection holds company A's row (a long admin transaction, an
    operator's psql): A's release waits past the database's bound. Company B's hold,
    expired later, is released in the same pass; A's second hold is not even tried
    (it would hold a second thread on the same lock); A's first commits once the
    lock goes, and the next pass releases the other."""
    locked, locked_id = cp.owner_client("10")
    victim, victim_id = cp.owner_client("10")
    first, second = _init(locked), _init(locked)
    good = _init(victim)
    _expire(cp, first["reservation_id"], timedelta(minutes=10))
    _expire(cp, second["reservation_id"], timedelta(minutes=9))
    _expire(cp, good["reservation_id"], timedelta(minutes=1))
    state = cp.app.state
    # The same database, with a bound this test's lock outlasts (held until the
    # rollback below), and long enough for company B's release on a loaded machine
    # (0.5 s timed it out once in CI, three workers on two CPUs).
    quick = Database(state.settings.database_url, pool_size=3, timeout=2.0)
    try:
        with state.db.engine.connect() as locker:
            locker.execute(
                text("SELECT 1 FROM companies WHERE id = :id FOR UPDATE"), {"id": locked_id}
            )
            with pytest.raises(DatabaseTimeout):
                cp.on_loop(lambda: sweep_expired_holds(quick, state.store, state.metrics))
            assert _status(cp, good["reservation_id"]) == "released"
            assert _status(cp, second["reservation_id"]) == "active"
            locker.rollback()
        cp.on_loop(lambda: sweep_expired_holds(quick, state.store, state.metrics))
    finally:
        quick.close()
    assert credits_of(locked)["held"] == "0.000000"
    assert credits_of(victim)["held"] == "0.000000"
    assert_books_balance(cp, locked_id, locked)
    assert_books_balance(cp, victim_id, victim)


def test_a_silent_stream_the_database_refuses_holds_up_no_other_companys(cp: CP) -> None:
    """Two dead edges' streams, of two companies; the database refuses to settle the
    one listed first. The other is settled from its checkpoint in the same pass."""
    one, one_id = cp.owner_client("10")
    other, other_id = cp.owner_client("10")
    streams = {one_id: (one, _init(one)), other_id: (other, _init(other))}
    for _, init in streams.values():
        _checkpoint(cp, init, input_tokens=12, output_tokens=70)
    # The pass goes by reservation id: the first one listed is the poisoned one.
    poisoned_id, victim_id = sorted(streams, key=lambda c: streams[c][1]["reservation_id"])
    _poison(cp, poisoned_id)
    victim, victim_init = streams[victim_id]
    clock, watch, sweep = silence_sweep(cp)

    assert sweep().settled == 0  # first sight of both checkpoints
    clock[0] += watch.silent_after + 1
    with pytest.raises(IntegrityError):
        sweep()
    assert _status(cp, victim_init["reservation_id"]) == "settled"
    assert credits_of(victim)["held"] == "0.000000"
    assert_books_balance(cp, victim_id, victim)
    assert _status(cp, streams[poisoned_id][1]["reservation_id"]) == "active"
