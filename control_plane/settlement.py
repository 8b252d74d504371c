"""Usage → settlement, exactly once (DESIGN §7, §9).

`parse_usage_event` is pure: the signed body as a `UsageEvent`, or a 422 naming the
field. `settle_usage` is the one settlement path, shared by the webhook and the
reconciliation sweeper: price the usage (DESIGN §9 "What is billed", capped at the
hold), flip the reservation from ``active`` to ``settled`` with a conditional
UPDATE, move the money, write the ledger rows, their audit events and the usage
record, all in the caller's transaction.

`settle_webhook` first records the webhook id (primary key), then settles. A second
delivery finds the id taken (same id, sequential) or loses on the primary key
(same id, concurrent: IntegrityError, the whole transaction rolls back) or finds
the reservation no longer active (another id, a cancelled-after-completed event, a
webhook after the sweeper settled or released the hold) and changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import chat_sessions, hot_statements
from control_plane.audit import WEBHOOK_ACTOR
from control_plane.db import Database
from control_plane.errors import (
    Conflict,
    InvalidCharacters,
    ReservationMismatch,
    ReservationNotFound,
    ValidationFailed,
    WebhookProviderMismatch,
)
from control_plane.fallbacks import served_price
from control_plane.ledger import charge_for, reservation_price, settle_reservation
from control_plane.tables import Reservation, UsageRecord, WebhookEvent, new_id, utcnow
from control_plane.validation import NUL, without_nul
from shared.catalog import Price
from shared.input_size import InputRejected
from shared.pricing import TokenUsage, split_problem
from shared.tool_shapes import check_tool_calls
from shared.webhooks import STATUSES, USAGE_DETAILS, USAGE_SOURCES, UsageEvent

log = logging.getLogger("control_plane.settlement")
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
    if NUL in value:
        raise InvalidCharacters(f"data.{name} contains a NUL character.")
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


def _optional_count(data: dict[str, Any], name: str) -> int:
    # Added in DESIGN §11 "Prices": absent (an older edge, a backend's own event) is 0.
    return 0 if data.get(name) is None else _count(data, name)


def _split(data: dict[str, Any]) -> tuple[int, int, int]:
    """The cache and reasoning parts; 422 when a part exceeds its whole. Refused, not
    clamped: our edge clamps what a vendor reports before signing, so only a broken
    or hostile signer sends this, and pricing it could only guess which count lies."""
    usage = TokenUsage(
        _count(data, "input_tokens"),
        _count(data, "output_tokens"),
        *(_optional_count(data, name) for name in USAGE_DETAILS),
    )
    problem = split_problem(usage)
    if problem is not None:
        field = "reasoning_tokens" if problem.startswith("reasoning") else "cached_input_tokens"
        raise ValidationFailed(f"data.{field}", problem)
    return usage.cached_input_tokens, usage.cache_write_tokens, usage.reasoning_tokens


def _optional_time(value: Any) -> str | None:
    return value if isinstance(value, str) and NUL not in value else None


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
    tool_calls = data.get("tool_calls")
    if tool_calls is not None:
        try:
            tool_calls = check_tool_calls(tool_calls, "data.tool_calls")
        except InputRejected:
            # Transcript only: a malformed call is left out, the usage is still settled.
            tool_calls = None
    first_token_at = data.get("first_token_at")
    cached, cache_write, reasoning = _split(data)
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
        finish_reason=without_nul(finish_reason[:64]) if finish_reason else None,
        input_tokens=_count(data, "input_tokens"),
        output_tokens=_count(data, "output_tokens"),
        usage_source=str(usage_source),
        started_at=_str(data, "started_at", required=False, max_len=64),
        first_token_at=_optional_time(first_token_at),
        ended_at=_str(data, "ended_at", required=False, max_len=64),
        content=content,
        tool_calls=tool_calls,
        cached_input_tokens=cached,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
        fallback_from=_str(data, "fallback_from", required=False) or None,
    )


def parse_time(value: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# A TTFT beyond this is a sender's clock error, not a measurement: not recorded.
TTFT_MAX_MS = 3_600_000


def ttft_ms(started_at: str, first_token_at: str | None) -> int | None:
    """Milliseconds from the stream's start to its first token, from the webhook's
    own timestamps; None when either is missing, unparsable or out of range (a
    sender's bad clock must not skew the console's percentiles)."""
    if not started_at or not first_token_at:
        return None
    start, first = parse_time(started_at), parse_time(first_token_at)
    if start is None or first is None:
        return None
    millis = round((first - start).total_seconds() * 1000)
    return millis if 0 <= millis <= TTFT_MAX_MS else None


@dataclass(frozen=True, slots=True)
class Usage:
    """What a stream used, from a webhook or the edge's last checkpoint."""

    status: str
    input_tokens: int
    output_tokens: int
    usage_source: str
    finish_reason: str | None = None
    ttft_ms: int | None = None  # time to first token, when the sender measured it
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    duplicate: bool
    charged_micro: int = 0
    released_micro: int = 0
    # For the tokens-per-minute correction (`tpm.correct`): who, the hold's token
    # estimate, when it was counted (the init's instant, epoch seconds).
    user_id: str = ""
    held_tokens: int = 0
    held_at: float = 0.0


DUPLICATE = Outcome(duplicate=True)


def settle_usage(
    session: Session,
    reservation: Reservation,
    usage: Usage,
    *,
    actor: str,
    request_id: str | None,
    details: dict[str, Any] | None = None,
    served: tuple[str, str, Price] | None = None,
) -> Outcome:
    """Charge `usage` against the hold and release the rest, once; DUPLICATE when the
    reservation is no longer active. `served`: (model, provider, price) of the
    fallback that served (issue 16.2), checked against the reservation's chain by
    the caller; None: the reservation's own model."""
    charge = charge_for(
        usage.status,
        usage.input_tokens,
        usage.output_tokens,
        served[2] if served is not None else reservation_price(reservation),
        reservation.hold_micro,
        cached_input_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens,
    )
    context = {
        "status": usage.status,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "usage_source": usage.usage_source,
        **{name: getattr(usage, name) for name in USAGE_DETAILS if getattr(usage, name)},
        **(details or {}),
    }
    settled = settle_reservation(
        session, reservation, charge, actor=actor, request_id=request_id, details=context
    )
    if settled is None:
        return DUPLICATE
    # Built as the model, written as one Core INSERT (no unit of work; issue 14.3).
    hot_statements.insert_row(
        session,
        UsageRecord(
            id=new_id(),
            reservation_id=reservation.id,
            jti=reservation.jti,
            company_id=reservation.company_id,
            user_id=reservation.user_id,
            session_id=reservation.session_id,
            model=served[0] if served is not None else reservation.model,
            provider=served[1] if served is not None else reservation.provider,
            status=usage.status,
            finish_reason=usage.finish_reason,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            usage_source=usage.usage_source,
            cost_micro=settled.charged_micro,
            created_at=utcnow(),
            api_key_id=reservation.api_key_id,
            ttft_ms=usage.ttft_ms,
        ),
    )
    return Outcome(
        duplicate=False,
        charged_micro=settled.charged_micro,
        released_micro=settled.released_micro,
        user_id=reservation.user_id,
        held_tokens=reservation.input_estimate + reservation.max_tokens,
        held_at=reservation.created_at.timestamp(),
    )


def settle_webhook(
    session: Session,
    webhook_id: str,
    event: UsageEvent,
    *,
    transcripts: bool,
    http_request_id: str | None = None,
    signer_provider: str | None = None,
    session_limits: chat_sessions.SessionLimits | None = None,
) -> Outcome:
    """The webhook's use case (one transaction): validate against the reservation,
    record the webhook id, settle, and append the assistant's reply.

    `signer_provider`: the backend whose own secret signed (None: the platform's). It
    settles only reservations routed to it, so one backend's secret cannot settle
    (say, at 0 as `stream.failed`) another provider's streams (DESIGN §11)."""
    reservation = session.get(Reservation, event.reservation_id)
    if reservation is None:
        raise ReservationNotFound(f"No reservation {event.reservation_id!r}.")
    if reservation.jti != event.jti or reservation.company_id != event.company_id:
        raise ReservationMismatch("The event's jti or company_id does not match the reservation.")
    if signer_provider is not None and reservation.provider != signer_provider:
        raise WebhookProviderMismatch(
            f"This reservation is routed to {reservation.provider!r}, "
            f"not to {signer_provider!r} whose secret signed the event."
        )
    # A served model other than the reservation's must be one of its chain (422
    # otherwise): a forged event cannot pick a cheaper model to be billed at.
    fallback = served_price(reservation, event.model)
    served = (event.model, fallback[0], fallback[1]) if fallback is not None else None
    seen = session.scalar(hot_statements.SELECT_WEBHOOK_EVENT, {"p_webhook_id": webhook_id})
    if seen is not None:
        if seen != reservation.id:
            raise Conflict("This webhook id was already used for another reservation.")
        return DUPLICATE
    # A concurrent twin with the same id fails here (IntegrityError).
    session.execute(
        hot_statements.INSERT_WEBHOOK_EVENT,
        {"webhook_id": webhook_id, "reservation_id": reservation.id, "received_at": utcnow()},
    )
    details: dict[str, Any] = {"source": "webhook", "webhook_id": webhook_id}
    if http_request_id is not None:
        details["http_request_id"] = http_request_id
    outcome = settle_usage(
        session,
        reservation,
        Usage(
            status=event.status,
            input_tokens=event.input_tokens,
            output_tokens=event.output_tokens,
            usage_source=event.usage_source,
            finish_reason=event.finish_reason,
            ttft_ms=ttft_ms(event.started_at, event.first_token_at),
            cached_input_tokens=event.cached_input_tokens,
            cache_write_tokens=event.cache_write_tokens,
            reasoning_tokens=event.reasoning_tokens,
        ),
        actor=WEBHOOK_ACTOR,
        request_id=event.request_id or reservation.request_id,
        details=details,
        served=served,
    )
    if outcome.duplicate:
        return outcome
    if transcripts and (event.content or event.tool_calls) and event.status in TRANSCRIPT_STATUSES:
        reply: dict[str, Any] = {"role": "assistant", "content": event.content or ""}
        if event.tool_calls and event.status == "completed":
            # Only a finished call can be run and answered (`tool_results` at init).
            reply["tool_calls"] = event.tool_calls
        if reply["content"] or "tool_calls" in reply:
            append_transcript(session, reservation.session_id, reply, session_limits)
    return outcome


def append_transcript(
    session: Session,
    session_id: str,
    reply: dict[str, Any],
    limits: chat_sessions.SessionLimits | None = None,
) -> None:
    """The assistant's reply, best effort: in a savepoint, so that a failed write
    (whatever the model sent) rolls back only itself and never the charge, which
    commits with the rest of the transaction. Before this, a NUL in a reply failed
    the whole webhook on PostgreSQL, the sweeper released the hold, and a completed
    stream was charged nothing. A session at its caps keeps no more replies."""
    try:
        with session.begin_nested():
            # "gone" when the user deleted the session meanwhile: nothing to append to.
            if chat_sessions.append_messages(session, session_id, [reply], limits) == "full":
                log.warning("session %s is full; this reply is not kept", session_id)
    except SQLAlchemyError:
        log.exception("transcript of session %s not stored; the usage is settled", session_id)


def already_settled(session: Session, webhook_id: str, reservation_id: str) -> bool:
    if session.get(WebhookEvent, webhook_id) is not None:
        return True
    status = session.scalar(
        select(col(Reservation.status)).where(col(Reservation.id) == reservation_id)
    )
    return status is not None and status != "active"


async def settle_event(
    db: Database,
    webhook_id: str,
    event: UsageEvent,
    *,
    transcripts: bool,
    http_request_id: str | None = None,
    signer_provider: str | None = None,
    session_limits: chat_sessions.SessionLimits | None = None,
) -> Outcome:
    """`settle_webhook` in its own transaction, on the database threads."""
    try:
        return await db.transaction(
            lambda s: settle_webhook(
                s,
                webhook_id,
                event,
                transcripts=transcripts,
                http_request_id=http_request_id,
                signer_provider=signer_provider,
                session_limits=session_limits,
            )
        )
    except IntegrityError:
        # Lost a race with a concurrent delivery of the same stream: its
        # transaction committed the settlement, ours rolled back entirely.
        if await db.transaction(lambda s: already_settled(s, webhook_id, event.reservation_id)):
            return DUPLICATE
        raise
