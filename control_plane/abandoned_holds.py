"""Holds whose init was answered 503 before its transaction committed.

A database call past its bound (`db_threads`, ``LLMGW_DATABASE_TIMEOUT_SECONDS``)
answers 503 ``database_unavailable`` while its thread still waits on the socket: a
PostgreSQL that went silent (stopped, a lock held) runs the statement once it is
back. For init that statement takes the hold, for a client that has its 503 and
no token: nobody can ever stream on it, so it is released at once rather than
held until the sweeper reaches its deadline (the token's lifetime plus the hold
grace: ~22 minutes by default).
"""

from __future__ import annotations

import logging

from control_plane.background import in_background
from control_plane.db import Database
from control_plane.ledger import release_reservation

log = logging.getLogger("control_plane.abandoned_holds")

REASON = "init answered before the database"


def release_later(db: Database, reservation_id: str, user_id: str) -> None:
    """Release `reservation_id` in the background (called on the loop, by
    `Database.unit`'s ``late``)."""
    in_background(_release(db, reservation_id, user_id), "release-abandoned-hold")


async def _release(db: Database, reservation_id: str, user_id: str) -> None:
    try:
        await db.transaction(
            lambda s: release_reservation(s, reservation_id, REASON, actor=user_id)
        )
    except Exception as exc:  # still unreachable: the sweeper releases it at its deadline
        log.warning("could not release abandoned hold %s: %r", reservation_id, exc)
