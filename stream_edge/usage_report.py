"""Build the usage webhook event for a finished stream, and its status (pure)."""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime

import orjson

from shared.tokens import StreamGrant
from shared.webhooks import MAX_USAGE_BODY_BYTES, UsageEvent, iso_utc
from stream_edge.meter import Meter

log = logging.getLogger("llmgw.edge.jobs")

# What a report's body may weigh: the receiver's cap, less room for what may vary
# between the body measured here and the one each delivery attempt signs.
REPORT_BUDGET_BYTES = MAX_USAGE_BODY_BYTES - 4096


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
    grant: StreamGrant,
    provider: str,
    meter: Meter,
    status: str,
    model: str | None = None,
    *,
    ended: float | None = None,
) -> UsageEvent:
    """`model`/`provider`: what served (a fallback of the grant's chain, or its model).
    `ended`: now on the store's clock (`EdgeState.store_clock`; None: this host's),
    as ``ended_at``: the control plane times the settlement from it on the same
    clock (``llmgw_cp_reconciliation_lag_seconds``), and this host's may be minutes
    off."""
    billing = meter.billing()
    served = model or grant.model
    event = UsageEvent(
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
        ended_at=iso_utc(
            datetime.now(UTC) if ended is None else datetime.fromtimestamp(ended, UTC)
        ),
        content=meter.content,
        tool_calls=[c.openai() for c in meter.tool_calls()] or None
        if meter.keep_transcript
        else None,
        cached_input_tokens=billing.cached_input_tokens,
        cache_write_tokens=billing.cache_write_tokens,
        reasoning_tokens=billing.reasoning_tokens,
        fallback_from=grant.model if served != grant.model else None,
    )
    return fit_transcript(event)


def fit_transcript(event: UsageEvent, budget: int = REPORT_BUDGET_BYTES) -> UsageEvent:
    """`event`, its transcript cut until its body weighs at most `budget` bytes.

    The usage must always reach the control plane, which reads at most
    `MAX_USAGE_BODY_BYTES` of a webhook: a longer body is a 413 the outbox takes as
    permanent, and the stream was billed only at its hold's deadline from its
    checkpoint, or not at all (a `stream: false` answer writes none). An answer's
    text has no such bound (100k tokens of tabs and newlines, escaped in JSON, come
    to 1.6 MB), so the text is cut first, then the tool calls go too. A session
    keeps about that much at most anyway (`LLMGW_MAX_SESSION_BYTES`)."""
    if _transcript_chars(event) * MAX_ESCAPED_CHAR_BYTES + OTHER_FIELDS_BYTES <= budget:
        return event  # every report but the longest, without encoding it once more
    size = len(event.body())
    if size <= budget:
        return event
    log.warning("usage report of %d bytes: its transcript is cut to fit", size)
    trimmed = _cut_content(event, size, budget)
    if trimmed is not None:
        return trimmed
    bare = dataclasses.replace(event, tool_calls=None)
    trimmed = _cut_content(bare, len(bare.body()), budget)
    return trimmed if trimmed is not None else dataclasses.replace(bare, content=None)


# JSON spells a control character `\u00XX`: no character costs more bytes.
MAX_ESCAPED_CHAR_BYTES = 6
# Everything else a report holds, bounded well below this (ids, names, counts, times).
OTHER_FIELDS_BYTES = 16 * 1024


def _transcript_chars(event: UsageEvent) -> int:
    calls = event.tool_calls or ()
    return len(event.content or "") + sum(
        len(str(call.get("id", ""))) + len(str(call.get("function", "")))  # an upper bound
        for call in calls
    )


def _cut_content(event: UsageEvent, size: int, budget: int) -> UsageEvent | None:
    """`event` with the longest prefix of its content that fits `budget`; None when
    even no content leaves it too large."""
    content = event.content or ""
    if size <= budget:
        return event
    room = budget - (size - len(orjson.dumps(content)))
    if room < 2:  # not even the empty string's quotes
        return None
    # Each character takes at least one byte: at most `room` of them fit.
    low, high = 0, min(len(content), room)
    while low < high:
        middle = (low + high + 1) // 2
        if len(orjson.dumps(content[:middle])) <= room:
            low = middle
        else:
            high = middle - 1
    return dataclasses.replace(event, content=content[:low])
