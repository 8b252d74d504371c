"""Per-user and per-company rate limits on ``POST /v1/chat/init`` (DESIGN §9).

Fixed one-minute windows counted in the store (`CounterStore.hit`), so every control-plane
process shares the same counters through Redis. The key names the window's start,
so a new window is a new key and the old one expires with its TTL. Checked after
authentication and before any credits are reserved; a refused request still counts
(a client hammering the endpoint does not get a free retry loop).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from control_plane.errors import RateLimited, StoreUnavailable
from shared.store import CounterStore

log = logging.getLogger("control_plane.rate_limits")

WINDOW_SECONDS = 60


@dataclass(frozen=True, slots=True)
class Window:
    start: int
    retry_after: int  # whole seconds until the window ends, at least 1


def window_at(now: float, window_seconds: int = WINDOW_SECONDS) -> Window:
    start = int(now // window_seconds) * window_seconds
    return Window(start, max(1, math.ceil(start + window_seconds - now)))


def limit_key(scope: str, subject: str, window: Window) -> str:
    return f"rl:init:{scope}:{subject}:{window.start}"


async def check_init_rate(
    store: CounterStore,
    *,
    user_id: str,
    company_id: str,
    per_user: int,
    per_company: int,
    now: float,
) -> None:
    """Count this init for its user and its company; RateLimited (429) over either."""
    window = window_at(now)
    limits = (("user", user_id, per_user), ("company", company_id, per_company))
    for scope, subject, limit in limits:
        try:
            count = await store.hit(limit_key(scope, subject, window), WINDOW_SECONDS)
        except Exception:
            log.exception("rate-limit counter unavailable")
            raise StoreUnavailable() from None
        if count > limit:
            raise refusal(scope, limit, window)


def refusal(scope: str, limit: int, window: Window) -> RateLimited:
    return RateLimited(
        f"Too many chat inits for this {scope} ({limit} per minute); "
        f"retry in {window.retry_after} s.",
        window.retry_after,
    )
