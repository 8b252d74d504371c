"""The database's record of stream tokens revoked with no `revocations` row: a
deleted chat session's (`routes.chat.delete_session`) and a silent stream's (the
sweeper's, `sweeper.reconcile`). ``reservations.revoked_at`` is set in the
transaction that deletes the session or settles the stream, so the republishing
pass (`revocation_republish.standing`) can put the edges' `jti` key back after the
store lost it, by ``ix_reservations_revoked_at`` (partial, migration 0021)."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.tables import Reservation


def mark_revoked(session: Session, company_id: str, jtis: Collection[str], now: datetime) -> None:
    """Record that `jtis`' tokens are revoked at the edges from `now` (by the unique
    ``jti`` index; a few rows)."""
    if not jtis:
        return
    session.execute(
        update(Reservation)
        .where(col(Reservation.company_id) == company_id, col(Reservation.jti).in_(jtis))
        .values(revoked_at=now)
    )


def revoked_since(session: Session, since: datetime) -> list[tuple[str, str, datetime]]:
    """(jti, company_id, revoked_at) of the stream tokens revoked after `since`."""
    rows = session.execute(
        select(
            col(Reservation.jti), col(Reservation.company_id), col(Reservation.revoked_at)
        ).where(col(Reservation.revoked_at).is_not(None), col(Reservation.revoked_at) > since)
    ).all()
    return [(jti, company_id, at) for jti, company_id, at in rows if at is not None]


def stream_revoked(session: Session, company_id: str, jti: str) -> bool:
    """Whether `jti`'s token is revoked here (a lift of an admin's revocation of the
    same token must leave the edges' key: `revoking.in_force_besides`)."""
    found = session.execute(
        select(col(Reservation.id))
        .where(
            col(Reservation.jti) == jti,
            col(Reservation.company_id) == company_id,
            col(Reservation.revoked_at).is_not(None),
        )
        .limit(1)
    ).first()
    return found is not None
