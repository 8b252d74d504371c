"""The audit log: who moved money, on whose request, and why.

`record` adds one `AuditEvent` to the caller's session, so it commits or rolls back
with the money movement it describes; `ledger.add_entry` calls it for every ledger
row, which makes "every money movement is audited" a property of the one function
that moves money rather than a rule each use case must remember. The ledger holds
the amounts (the source of truth); the audit row adds the actor, the request id
and free-form `details` (the webhook id, token counts, the checkpoint used …).

Actors: a user id (the user's own request, e.g. a hold at init), ``admin-token``
(the platform admin token), ``edge-webhook`` (a signed usage webhook), ``sweeper``
(the reconciliation sweeper), ``seed`` (``llm-gateway dev``'s demo data).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.tables import AuditEvent, iso, new_id, utcnow
from shared.pricing import format_credits

ADMIN_TOKEN_ACTOR = "admin-token"
WEBHOOK_ACTOR = "edge-webhook"
SWEEPER_ACTOR = "sweeper"
SEED_ACTOR = "seed"


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    company_id: str | None,
    amount_micro: int | None = None,
    reservation_id: str | None = None,
    request_id: str | None = None,
    details: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> AuditEvent:
    event = AuditEvent(
        id=new_id(),
        actor=actor,
        action=action,
        company_id=company_id,
        amount_micro=amount_micro,
        reservation_id=reservation_id,
        request_id=request_id,
        details=dict(details or {}),
        created_at=now or utcnow(),
    )
    session.add(event)
    return event


def page(
    session: Session, company_id: str | None, limit: int, after: tuple[datetime, str] | None
) -> list[AuditEvent]:
    """Newest first, keyset-paginated; `limit + 1` rows so the caller sees if more exist.
    `company_id` None lists every company (platform admin only)."""
    stmt = select(AuditEvent)
    if company_id is not None:
        stmt = stmt.where(col(AuditEvent.company_id) == company_id)
    if after is not None:
        moment, last_id = after
        stmt = stmt.where(
            or_(
                col(AuditEvent.created_at) < moment,
                and_(col(AuditEvent.created_at) == moment, col(AuditEvent.id) < last_id),
            )
        )
    stmt = stmt.order_by(col(AuditEvent.created_at).desc(), col(AuditEvent.id).desc())
    return list(session.scalars(stmt.limit(limit + 1)))


def event_public(e: AuditEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "actor": e.actor,
        "action": e.action,
        "company_id": e.company_id,
        "amount": None if e.amount_micro is None else format_credits(e.amount_micro),
        "reservation_id": e.reservation_id,
        "request_id": e.request_id,
        "details": e.details,
        "created_at": iso(e.created_at),
    }
