"""Retry schedules as a small pure strategy object (after redis-py's `backoff.py`).

Exponential backoff with "full jitter" (AWS architecture blog, 2015): the delay for
attempt n is uniform in [0, min(cap, base * 2**n)], which spreads a thundering herd of
retries after an outage. A server's `Retry-After` wins when it asks for longer. A
`floor` raises the low end, for a retry that must never come straight back (a
receiver that just failed is not asked again within milliseconds).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


@dataclass(frozen=True)
class Backoff:
    base: float = 0.5
    cap: float = 300.0
    floor: float = 0.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(attempt, 32)))
        jittered = self.rng.uniform(min(self.floor, ceiling), ceiling)
        if retry_after is not None:
            return max(jittered, min(retry_after, self.cap))
        return jittered


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    # ASCII digits only: `str.isdigit` takes '²', which `float()` refuses.
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
