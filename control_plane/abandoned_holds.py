"""Holds whose init was answered 503 before its transaction committed.

A database call past its bound (`db_threads`, ``LLMGW_DATABASE_TIMEOUT_SECONDS``)
answers 503 ``database_unavailable`` while its thread still waits on the socket: a
PostgreSQL that went silent (stopped, a lock held) runs the statement once it is
back. For init that statement takes the hold, for a client that has its 503 and
no token: nobody can ever stream on it, so it is released at once rather than
held until the sweeper reaches its deadline (the token's lifetime plus the hold
grace: ~22 minutes by default). Its hold is counted in ``llmgw_cp_credits_reserved``
once it has committed and its release in ``_released``, as the ledger has both: the
sweeper's release of one whose release here failed is then not a release of credits
never reserved.

The same for a hold whose init heard a lost connection instead of its answer
(`release_unacknowledged`): the write was sent, then the connection died (a cut
network, a killed backend, a proxy restarting) after or during its commit. Its
outcome is unknown to the caller, which answers 503 with no token, but PostgreSQL
may have committed it: before, such a hold stayed until its deadline (~22 minutes),
and the client's retry found those credits gone (402). The release waits, bounded,
until the backend that ran the hold has ended its transaction, and is tried again
while the database cannot be reached (`lost_settlements.once_over`): a hold that
committed after a release made at once had found nothing, or whose release met the
outage that cut its connection, was left to the sweeper's deadline.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.background import in_background
from control_plane.db import Database, lost_backend, outcome_unknown
from control_plane.init_writes import NewReservation
from control_plane.ledger import release_reservation
from control_plane.lost_settlements import once_over
from control_plane.metrics import Metrics
from control_plane.tables import LedgerEntry

log = logging.getLogger("control_plane.abandoned_holds")

REASON = "init answered before the database"
LOST_REASON = "init's answer from the database lost"


def release_later(
    db: Database, metrics: Metrics, reservation: NewReservation, user_id: str
) -> None:
    """Count `reservation`'s hold, which has just committed, and release it in the
    background (called on the loop, by `Database.unit`'s ``late``)."""
    metrics.reserved(reservation.hold_micro)
    in_background(_release(db, metrics, reservation.id, user_id), "release-abandoned-hold")


async def release_counted(
    db: Database, metrics: Metrics, reservation_id: str, reason: str, actor: str
) -> None:
    """Give back an init's own hold (counted in ``_reserved`` when it committed) and
    count the release in ``llmgw_cp_credits_released``; one that commits after its
    caller gave up is counted then (``late``), and one whose answer was lost once
    read back (`released_by`): before, the ledger had that release and the
    counters never did (the sweeper finds the hold released and counts nothing)."""
    try:
        released = await db.transaction(
            lambda s: release_reservation(s, reservation_id, reason, actor=actor),
            late=metrics.released,
        )
    except Exception as exc:
        if outcome_unknown(exc):
            read = functools.partial(
                released_by, reservation_id=reservation_id, reason=reason, actor=actor
            )
            in_background(_count_lost(db, metrics, read, lost_backend(exc)), "lost-release")
        raise
    metrics.released(released)


def released_by(session: Session, reservation_id: str, reason: str, actor: str) -> int | None:
    """The amount of `reservation_id`'s release written by `actor` for `reason`, if
    there is one (a hold is released once at most, whoever releases it)."""
    amount = session.scalar(
        select(col(LedgerEntry.amount_micro)).where(
            col(LedgerEntry.reservation_id) == reservation_id,
            col(LedgerEntry.kind) == "release",
            col(LedgerEntry.reason) == reason,
            col(LedgerEntry.actor) == actor,
        )
    )
    return amount if isinstance(amount, int) else None


def release_or_found(session: Session, reservation_id: str, reason: str, actor: str) -> int | None:
    """`release_reservation`, or what an earlier try of the same release whose answer
    was lost released (`released_by`): safe to run again, and counted once."""
    released = release_reservation(session, reservation_id, reason, actor=actor)
    return released if released is not None else released_by(session, reservation_id, reason, actor)


async def _count_lost(
    db: Database, metrics: Metrics, read: Callable[[Session], int | None], backend: int | None
) -> None:
    try:
        metrics.released(await once_over(db, backend, read))
    except Exception as exc:  # the counters miss it, as they did before
        log.warning("could not read back a release whose answer was lost: %r", exc)


async def _release(db: Database, metrics: Metrics, reservation_id: str, user_id: str) -> None:
    try:
        await release_counted(db, metrics, reservation_id, REASON, user_id)
    except Exception as exc:  # still unreachable: the sweeper releases it at its deadline
        log.warning("could not release abandoned hold %s: %r", reservation_id, exc)


def release_unacknowledged(
    db: Database, metrics: Metrics, reservation_id: str, user_id: str, backend: int | None
) -> None:
    """An init whose hold may have committed, though its caller heard a lost
    connection (`db.outcome_unknown`): released in the background if it is there, and
    then counted as reserved and released, as the ledger has both; nothing if it
    never committed (the release is conditional: an unknown id releases nothing).
    Released once `backend`, which ran the hold, has ended its transaction."""
    in_background(
        _release_if_held(db, metrics, reservation_id, user_id, backend), "release-lost-hold"
    )


def _reserved_and_released(metrics: Metrics, released: int | None) -> None:
    if released is not None:
        metrics.reserved(released)
        metrics.released(released)


async def _release_if_held(
    db: Database, metrics: Metrics, reservation_id: str, user_id: str, backend: int | None
) -> None:
    try:
        # Safe to try again: an earlier try that committed is found, not repeated.
        released = await once_over(
            db,
            backend,
            lambda s: release_or_found(s, reservation_id, LOST_REASON, user_id),
            late=lambda late: _reserved_and_released(metrics, late),
        )
    except Exception as exc:  # still unreachable: the sweeper releases it at its deadline
        log.warning("could not release hold %s whose init lost its answer: %r", reservation_id, exc)
        return
    _reserved_and_released(metrics, released)
