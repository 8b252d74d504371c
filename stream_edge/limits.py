"""Concurrent-stream limits per user and per company, shared by every edge through
the store. Each stream holds a slot that expires at the stream's maximum life. An
edge that crashes gives none back: the control plane's sweeper frees those of each
stream whose checkpoint it finds silent (about 20 s on, `control_plane.sweeper`);
one that died before its first checkpoint (still opening) leaks its slots until
their expiry."""

from __future__ import annotations

from shared import stream_slots
from shared.tokens import StreamGrant
from stream_edge.errors import TooManyRequests
from stream_edge.settings import EdgeSettings


def slot_keys(grant: StreamGrant) -> list[str]:
    return stream_slots.slot_keys(grant.company_id, grant.user_id)


class StreamLimits:
    """The limits; slots are taken by `Store.admit` and given back with the stream's
    usage report (`Store.outbox_put`)."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.limits = [settings.max_streams_per_user, settings.max_streams_per_company]

    def too_many(self, full_index: int) -> TooManyRequests:
        who = "user" if full_index == 0 else "company"
        return TooManyRequests(
            f"too many concurrent streams for this {who} ({self.limits[full_index]} at most)",
            retry_after=1,
            code="too_many_streams",
        )
