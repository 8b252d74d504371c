"""Reconciliation: settle holds whose stream never reported (DESIGN §5: "a hold whose
stream never reports (the edge died) is settled after its deadline from the edge's
last usage checkpoint, or released if none").

A reservation's deadline is its token's expiry plus ``LLMGW_HOLD_GRACE_SECONDS``.
Every ``LLMGW_SWEEP_INTERVAL_SECONDS`` the sweeper lists active reservations past
their deadline and, for each, reads the edge's checkpoint from the store
(`shared.checkpoints`):

* a checkpoint for this stream → settled through `settlement.settle_usage`, the same
  exactly-once path as a webhook, as status ``failed`` with usage source
  ``estimated``: input plus the output relayed so far, nothing when no output token
  was relayed, capped at the hold (DESIGN §9 "What is billed");
* none (or one that is unreadable or belongs to another stream) → released.

Each reservation is its own conditional transaction, so several control planes may
sweep at once, and a webhook that arrives afterwards finds the reservation no longer
active: a harmless duplicate (200, nothing charged). When the store cannot be read
the sweep stops and retries next time: releasing a hold because Redis blinked would
give away usage that a checkpoint recorded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from control_plane.audit import SWEEPER_ACTOR
from control_plane.db import Database
from control_plane.ledger import expired_reservation_ids, release_reservation
from control_plane.metrics import Metrics
from control_plane.settlement import MAX_TOKENS_REPORTED, Usage, parse_time, settle_usage
from control_plane.tables import Reservation, utcnow
from shared.checkpoints import UsageCheckpoint, checkpoint_key
from shared.store import Store

log = logging.getLogger("control_plane.sweeper")

RELEASE_REASON = "hold expired without a usage report"
BATCH = 100
MAX_BATCHES = 50  # per sweep; the rest wait for the next one


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What one reservation's reconciliation did: ``settled`` (from a checkpoint),
    ``released``, or ``none`` (already settled or released by someone else)."""

    action: str
    charged_micro: int = 0
    released_micro: int = 0


NOTHING = Reconciled("none")


@dataclass(frozen=True, slots=True)
class SweepResult:
    settled: int = 0
    released: int = 0


def _usable(checkpoint: UsageCheckpoint | None, reservation: Reservation) -> bool:
    return (
        checkpoint is not None
        and checkpoint.reservation_id == reservation.id
        and checkpoint.jti == reservation.jti
        and 0 <= checkpoint.input_tokens <= MAX_TOKENS_REPORTED
        and 0 <= checkpoint.output_tokens <= MAX_TOKENS_REPORTED
    )


def reconcile(
    session: Session, reservation_id: str, checkpoint: UsageCheckpoint | None
) -> Reconciled:
    """One expired reservation's use case (one transaction): settle it from
    `checkpoint`, or release it."""
    reservation = session.get(Reservation, reservation_id)
    if reservation is None or reservation.status != "active":
        return NOTHING
    if checkpoint is not None and _usable(checkpoint, reservation):
        outcome = settle_usage(
            session,
            reservation,
            Usage(
                status="failed",
                input_tokens=checkpoint.input_tokens,
                output_tokens=checkpoint.output_tokens,
                usage_source="estimated",
            ),
            actor=SWEEPER_ACTOR,
            request_id=reservation.request_id,
            details={"source": "checkpoint", "checkpoint_updated_at": checkpoint.updated_at},
        )
        if outcome.duplicate:
            return NOTHING
        return Reconciled("settled", outcome.charged_micro, outcome.released_micro)
    details = {"source": "no checkpoint" if checkpoint is None else "checkpoint of another stream"}
    released = release_reservation(
        session, reservation_id, RELEASE_REASON, actor=SWEEPER_ACTOR, details=details
    )
    return NOTHING if released is None else Reconciled("released", 0, released)


def _decode(reservation_id: str, raw: bytes | None) -> UsageCheckpoint | None:
    if raw is None:
        return None
    try:
        return UsageCheckpoint.loads(raw)
    except ValueError:
        log.warning("unreadable usage checkpoint for reservation %s; releasing", reservation_id)
        return None


async def sweep_expired_holds(
    db: Database, store: Store, metrics: Metrics, *, now: datetime | None = None
) -> SweepResult:
    """Reconcile every active reservation whose deadline is before `now`."""
    moment = now or utcnow()
    settled = released = 0
    for _ in range(MAX_BATCHES):
        ids = await db.transaction(lambda s: expired_reservation_ids(s, moment, BATCH))
        for reservation_id in ids:
            try:
                raw = await store.get(checkpoint_key(reservation_id))
            except Exception:
                log.warning("store unreachable; reconciliation retries next sweep", exc_info=True)
                return SweepResult(settled, released)
            checkpoint = _decode(reservation_id, raw)
            done = await db.transaction(
                functools.partial(reconcile, reservation_id=reservation_id, checkpoint=checkpoint)
            )
            if done.action == "none":
                continue
            metrics.settled(done.charged_micro, done.released_micro)
            if done.action == "settled":
                settled += 1
                last = parse_time(checkpoint.updated_at) if checkpoint else None
                if last is not None:
                    lag = (utcnow() - last).total_seconds()
                    metrics.reconciliation_lag.observe(max(lag, 0.0))
            else:
                released += 1
        if len(ids) < BATCH:
            break
    if settled or released:
        log.warning(
            "reconciled expired holds: %d settled from checkpoints, %d released", settled, released
        )
    return SweepResult(settled, released)


async def run_sweeper(db: Database, store: Store, metrics: Metrics, interval: float) -> None:
    """Sweep every `interval` seconds until cancelled (the app's lifespan owns it)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await sweep_expired_holds(db, store, metrics)
        except Exception:
            log.exception("hold sweep failed; retrying in %.1f s", interval)
