"""Release holds whose stream never reported (DESIGN §5: "a hold whose stream never
reports … is released"), once they pass their deadline (token expiry plus
``LLMGW_HOLD_GRACE_SECONDS``). Each release is its own conditional transaction, so
several control planes may sweep at once and a late webhook still settles at most
once (it then finds the reservation released and answers "duplicate")."""

from __future__ import annotations

import asyncio
import functools
import logging

from control_plane.db import Database
from control_plane.ledger import expired_reservation_ids, release_reservation
from control_plane.metrics import Metrics
from control_plane.tables import utcnow

log = logging.getLogger("control_plane.sweeper")

SWEEP_INTERVAL_SECONDS = 30.0
REASON = "hold expired without a usage report"


async def release_expired_holds(db: Database, metrics: Metrics) -> int:
    now = utcnow()
    ids = await db.transaction(lambda s: expired_reservation_ids(s, now))
    released = 0
    for reservation_id in ids:
        amount = await db.transaction(
            functools.partial(release_reservation, reservation_id=reservation_id, reason=REASON)
        )
        if amount is not None:
            released += 1
            metrics.settled(0, amount)
    if released:
        log.warning("released %d expired holds with no usage report", released)
    return released


async def run_sweeper(
    db: Database, metrics: Metrics, interval: float = SWEEP_INTERVAL_SECONDS
) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await release_expired_holds(db, metrics)
        except Exception:
            log.exception("hold sweep failed; retrying in %.0f s", interval)
