"""Usage webhooks → settlement, exactly once (DESIGN §7).

`parse_usage_event` is pure: the signed body as a `UsageEvent`, or a 422 naming the
field. `settle_event` settles in one transaction: record the webhook id, flip the
reservation from ``active`` to ``settled`` with a conditional UPDATE, move the money
and write the ledger rows, the usage record and the assistant's reply. A second
delivery (same webhook id, or another id for the same reservation, even
concurrently) finds the id taken or the reservation no longer active and changes
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import chat_sessions
from control_plane.db import Database
from control_plane.errors import ReservationMismatch, ReservationNotFound, ValidationFailed
from control_plane.ledger import charge_for, reservation_price, settle_reservation
from control_plane.tables import Reservation, UsageRecord, WebhookEvent, new_id, utcnow
from shared.webhooks import STATUSES, USAGE_SOURCES, UsageEvent

TRANSCRIPT_STATUSES = ("completed", "cancelled")
MAX_TOKENS_REPORTED = 10**9


def _str(data: dict[str, Any], name: str, *, required: bool, max_len: int = 200) -> str:
    value = data.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ValidationFailed(f"data.{name}", "must be a non-empty string")
    if len(value) > max_len:
        raise ValidationFailed(f"data.{name}", f"must be at most {max_len} characters")
    return value


def _count(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 0 <= value <= MAX_TOKENS_REPORTED
    ):
        raise ValidationFailed(f"data.{name}", "must be a non-negative integer")
    return value


def parse_usage_event(doc: dict[str, Any]) -> UsageEvent:
    data = doc.get("data")
    if not isinstance(data, dict):
        raise ValidationFailed("data", "must be an object")
    status = data.get("status")
    if status not in STATUSES:
        raise ValidationFailed("data.status", f"must be one of {', '.join(STATUSES)}")
    if doc.get("type") != f"stream.{status}":
        raise ValidationFailed("type", f"must be stream.{status} for status {status}")
    usage_source = data.get("usage_source")
    if usage_source not in USAGE_SOURCES:
        raise ValidationFailed("data.usage_source", f"must be one of {', '.join(USAGE_SOURCES)}")
    finish_reason = data.get("finish_reason")
    if finish_reason is not None and not isinstance(finish_reason, str):
        raise ValidationFailed("data.finish_reason", "must be a string or null")
    content = data.get("content")
    if content is not None and not isinstance(content, str):
        raise ValidationFailed("data.content", "must be a string")
    first_token_at = data.get("first_token_at")
    return UsageEvent(
        jti=_str(data, "jti", required=True, max_len=64),
        reservation_id=_str(data, "reservation_id", required=True, max_len=64),
        company_id=_str(data, "company_id", required=True, max_len=64),
        user_id=_str(data, "user_id", required=False, max_len=64),
        session_id=_str(data, "session_id", required=False, max_len=64),
        request_id=_str(data, "request_id", required=False, max_len=128),
        model=_str(data, "model", required=False),
        provider=_str(data, "provider", required=False),
        status=str(status),
        finish_reason=finish_reason[:64] if finish_reason else None,
        input_tokens=_count(data, "input_tokens"),
        output_tokens=_count(data, "output_tokens"),
        usage_source=str(usage_source),
        started_at=_str(data, "started_at", required=False, max_len=64),
        first_token_at=first_token_at if isinstance(first_token_at, str) else None,
        ended_at=_str(data, "ended_at", required=False, max_len=64),
        content=content,
    )


def parse_time(value: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Outcome:
    duplicate: bool
    charged_micro: int = 0
    released_micro: int = 0


DUPLICATE = Outcome(duplicate=True)


def _settle(session: Session, webhook_id: str, event: UsageEvent, transcripts: bool) -> Outcome:
    reservation = session.get(Reservation, event.reservation_id)
    if reservation is None:
        raise ReservationNotFound(f"No reservation {event.reservation_id!r}.")
    if reservation.jti != event.jti or reservation.company_id != event.company_id:
        raise ReservationMismatch("The event's jti or company_id does not match the reservation.")
    if session.get(WebhookEvent, webhook_id) is not None:
        return DUPLICATE
    session.add(
        WebhookEvent(webhook_id=webhook_id, reservation_id=reservation.id, received_at=utcnow())
    )
    session.flush()  # a concurrent twin with the same id fails here (IntegrityError)
    charge = charge_for(
        event.status,
        event.input_tokens,
        event.output_tokens,
        reservation_price(reservation),
        reservation.hold_micro,
    )
    settled = settle_reservation(session, reservation, charge, request_id=event.request_id or None)
    if settled is None:
        return DUPLICATE
    session.add(
        UsageRecord(
            id=new_id(),
            reservation_id=reservation.id,
            jti=reservation.jti,
            company_id=reservation.company_id,
            user_id=reservation.user_id,
            session_id=reservation.session_id,
            model=reservation.model,
            provider=reservation.provider,
            status=event.status,
            finish_reason=event.finish_reason,
            input_tokens=event.input_tokens,
            output_tokens=event.output_tokens,
            usage_source=event.usage_source,
            cost_micro=settled.charged_micro,
            created_at=utcnow(),
        )
    )
    if transcripts and event.content and event.status in TRANSCRIPT_STATUSES:
        # False when the user deleted the session meanwhile: nothing to append to.
        chat_sessions.append_messages(
            session, reservation.session_id, [{"role": "assistant", "content": event.content}]
        )
    session.flush()
    return Outcome(
        duplicate=False,
        charged_micro=settled.charged_micro,
        released_micro=settled.released_micro,
    )


def _already_settled(session: Session, webhook_id: str, reservation_id: str) -> bool:
    if session.get(WebhookEvent, webhook_id) is not None:
        return True
    status = session.scalar(
        select(col(Reservation.status)).where(col(Reservation.id) == reservation_id)
    )
    return status is not None and status != "active"


async def settle_event(
    db: Database, webhook_id: str, event: UsageEvent, *, transcripts: bool
) -> Outcome:
    try:
        return await db.transaction(lambda s: _settle(s, webhook_id, event, transcripts))
    except IntegrityError:
        # Lost a race with a concurrent delivery of the same stream: its
        # transaction committed the settlement, ours rolled back entirely.
        if await db.transaction(lambda s: _already_settled(s, webhook_id, event.reservation_id)):
            return DUPLICATE
        raise
