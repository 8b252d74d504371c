"""The sweeper's reconciliations whose commit's answer was lost are counted once in
`llmgw_cp_credits_charged_total` / `_released_total` (DESIGN §8), as the ledger has
them: a silent stream settled from its checkpoint, an expired hold released. The
connection dies right after the COMMIT (a cut network, a killed backend); the pass
sees a failure and every later pass finds the hold done, counting nothing.
PostgreSQL + Redis, a control plane on a real socket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlmodel import col

from control_plane import sweeper
from control_plane.sweeper import sweep_expired_holds
from control_plane.tables import LedgerEntry
from shared.checkpoints import checkpoint_key
from tests.hold_sweeps import expire_hold as _expire
from tests.lost_commits import lose_the_transaction_answer_of
from tests.polling import wait_until
from tests.test_control_plane import CP, data_of, start_cp
from tests.test_money_views_agree import _counters
from tests.test_sweeper_frees_slots import running_stream, sweep

pytestmark = pytest.mark.usefixtures("pg_server")


def _ledger(cp: CP, reservation_id: str) -> dict[str, int]:
    def amounts(session: Any) -> dict[str, int]:
        rows = session.execute(
            select(col(LedgerEntry.kind), col(LedgerEntry.amount_micro)).where(
                col(LedgerEntry.reservation_id) == reservation_id
            )
        )
        return dict(rows.all())

    db = cp.app.state.db
    ledger: dict[str, int] = cp.on_loop(lambda: db.transaction(amounts))
    return {"charged": -ledger.get("charge", 0), "released": ledger.get("release", 0)}


def _counted_once(cp: CP, before: dict[str, float], expected: dict[str, int]) -> None:
    def moved() -> dict[str, int]:
        now = _counters(cp)
        return {k: round((now[k] - before[k]) * 1_000_000) for k in ("charged", "released")}

    wait_until(lambda: moved() == expected, f"counted once: {moved()} vs {expected}", within=5)


@pytest.mark.parametrize("kind", ["silent", "expired"])
def test_a_reconciliation_whose_answer_was_lost_is_counted_once(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Before: 0 charged and 0 released in the counters, against the ledger's charge
    and release of the silent stream (measured: 0 and 0 against 152 and 254
    micro-credits) and the expired hold's release (0 against 406)."""
    with start_cp(request, tmp_path, "postgres") as cp:
        run = running_stream(cp)
        reservation_id = run.grant["reservation_id"]
        state = cp.app.state
        if kind == "silent":
            sweep(cp, run)  # first sight
            run.clock[0] += run.watch.silent_after
        else:
            cp.on_loop(lambda: state.store.delete(checkpoint_key(reservation_id)))
            _expire(cp, reservation_id)
        before = _counters(cp)
        cut: list[str] = []
        lose_the_transaction_answer_of(monkeypatch, sweeper, "reconcile", cut)
        if kind == "silent":
            with pytest.raises(DBAPIError):
                sweep(cp, run)
        else:
            with pytest.raises(DBAPIError):
                cp.on_loop(lambda: sweep_expired_holds(state.db, state.store, state.metrics))
        assert cut == ["after the commit"]
        monkeypatch.undo()
        expected = _ledger(cp, reservation_id)
        assert sum(expected.values()) > 0  # it did commit
        _counted_once(cp, before, expected)
        # Later passes find it done: nothing more is counted.
        sweep(cp, run)
        cp.on_loop(lambda: sweep_expired_holds(state.db, state.store, state.metrics))
        _counted_once(cp, before, expected)
        assert data_of(run.client.get("/v1/credits"))["held"] == "0.000000"
