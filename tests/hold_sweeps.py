"""A running control plane's holds as the sweeper finds them, moved by the test
instead of waited for: a hold's deadline put in the past, and the silence sweep on
a clock the test moves (`tests/test_control_plane.py`'s `CP`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlmodel import col

from control_plane.liveness import SilenceWatch
from control_plane.sweeper import sweep_silent_streams
from control_plane.tables import Reservation
from shared.checkpoints import silent_after
from tests.test_control_plane import CP


def expire_hold(cp: CP, reservation_id: str, ago: timedelta = timedelta(seconds=1)) -> None:
    """The hold's deadline `ago` in the past."""

    def expire(session: Any) -> None:
        session.execute(
            update(Reservation)
            .where(col(Reservation.id) == reservation_id)
            .values(expires_at=datetime.now(UTC) - ago)
        )

    cp.on_loop(lambda: cp.app.state.db.transaction(expire))


def silence_sweep(cp: CP) -> tuple[list[float], SilenceWatch, Callable[[], Any]]:
    """`sweep_silent_streams` on `cp`'s database and store, watching silence on a
    clock the test moves (`clock[0]`, from 0): the clock, the watch and one pass."""
    clock = [0.0]
    watch = SilenceWatch(silent_after(cp.settings.resume_grace_seconds), lambda: clock[0])
    state = cp.app.state

    def sweep() -> Any:
        return cp.on_loop(
            lambda: sweep_silent_streams(
                state.db, state.store, state.metrics, watch, revoke_ttl=600
            )
        )

    return clock, watch, sweep
