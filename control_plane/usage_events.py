"""Usage webhook bodies as `UsageEvent`s (DESIGN §7), without I/O.

`parse_usage_event` is pure: the signed body as a `UsageEvent`, or a 422 naming the
field. `ttft_ms` is the time to first token a body's own timestamps give.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from control_plane.errors import InvalidCharacters, ValidationFailed
from control_plane.validation import NUL, without_nul
from shared.input_size import InputRejected
from shared.pricing import TokenUsage, split_problem
from shared.tool_shapes import check_tool_calls
from shared.webhooks import (
    MAX_TOKENS_REPORTED,
    STATUSES,
    USAGE_DETAILS,
    USAGE_SOURCES,
    UsageEvent,
)


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
