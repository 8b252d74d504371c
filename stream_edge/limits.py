"""Concurrent-stream limits per user and per company, shared by every edge through
the store. Each stream holds a slot that expires at the stream's maximum life, so an
edge that crashes leaks its slots for no longer than that."""

from __future__ import annotations

import time

from shared.settings import Settings
from shared.store import Store
from shared.tokens import StreamGrant
from stream_edge.errors import TooManyRequests


def slot_keys(grant: StreamGrant) -> list[str]:
    return [f"streams:user:{grant.user_id}", f"streams:company:{grant.company_id}"]


class StreamLimits:
    def __init__(self, store: Store, settings: Settings) -> None:
        self._store = store
        self._limits = [settings.max_streams_per_user, settings.max_streams_per_company]
        self._max_life = settings.max_stream_seconds

    async def acquire(self, grant: StreamGrant) -> None:
        now = time.time()
        full = await self._store.acquire_slots(
            slot_keys(grant), self._limits, grant.jti, now, now + self._max_life
        )
        if full >= 0:
            who = "user" if full == 0 else "company"
            raise TooManyRequests(
                f"too many concurrent streams for this {who} ({self._limits[full]} at most)",
                retry_after=1,
                code="too_many_streams",
            )

    async def release(self, grant: StreamGrant) -> None:
        await self._store.release_slots(slot_keys(grant), grant.jti)
