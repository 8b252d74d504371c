"""Build the usage webhook event for a finished stream, and its status (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

from shared.tokens import StreamGrant
from shared.webhooks import UsageEvent, iso_utc
from stream_edge.meter import Meter


def webhook_status(completed: bool, outcome: str) -> str:
    """What the stream did (`completed`: the relay or the completion ran to its end),
    else why it stopped: `outcome` is `EventStreamResponse`'s (`finished` when the
    stream was never served or ended on its own)."""
    if completed:
        return "completed"
    if outcome in ("client_gone", "slow_client"):
        return "cancelled"
    if outcome == "revoked":
        return "revoked"
    return "failed"


def usage_event(
    grant: StreamGrant, provider: str, meter: Meter, status: str, model: str | None = None
) -> UsageEvent:
    """`model`/`provider`: what served (a fallback of the grant's chain, or its model)."""
    billing = meter.billing()
    served = model or grant.model
    return UsageEvent(
        jti=grant.jti,
        reservation_id=grant.reservation_id,
        company_id=grant.company_id,
        user_id=grant.user_id,
        session_id=grant.session_id,
        request_id=grant.request_id,
        model=served,
        provider=provider,
        status=status,
        finish_reason=meter.finish_reason,
        input_tokens=billing.input_tokens,
        output_tokens=billing.output_tokens,
        usage_source=billing.source,
        started_at=iso_utc(meter.started_at),
        first_token_at=iso_utc(meter.first_token_at) if meter.first_token_at else None,
        ended_at=iso_utc(datetime.now(UTC)),
        content=meter.content,
        tool_calls=[c.openai() for c in meter.tool_calls()] or None
        if meter.keep_transcript
        else None,
        cached_input_tokens=billing.cached_input_tokens,
        cache_write_tokens=billing.cache_write_tokens,
        reasoning_tokens=billing.reasoning_tokens,
        fallback_from=grant.model if served != grant.model else None,
    )
