"""Concurrent-stream limits per user and per company, shared by every edge through
the store. Each stream holds a slot that expires at the stream's maximum life, so an
edge that crashes leaks its slots for no longer than that."""

from __future__ import annotations

from shared.hash_tags import company_tag
from shared.tokens import StreamGrant
from stream_edge.errors import TooManyRequests
from stream_edge.settings import EdgeSettings


def slot_keys(grant: StreamGrant) -> list[str]:
    # Both under the company's hash tag: admission takes them in one script.
    tag = company_tag(grant.company_id)
    return [f"streams:{tag}:user:{grant.user_id}", f"streams:{tag}:company:{grant.company_id}"]


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
