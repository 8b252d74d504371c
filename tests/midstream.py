"""Something done to a stream while it runs: read a stream URL to its end, acting
once, after its first few chunks (a revocation, a deletion) — the stream's
answer to it is the test's to check."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from shared.sse import ServerSentEvent, SSEDecoder


def events_acting_midway(
    stream_url: str, act: Callable[[], None], after_chunks: int = 5
) -> tuple[list[ServerSentEvent], int]:
    """GET `stream_url` (200) and read every event; call `act()` once `after_chunks`
    chunks have come. The events, and how many had come when it acted."""
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    acted_at = None
    with httpx.stream("GET", stream_url, timeout=10) as r:
        assert r.status_code == 200
        for raw in r.iter_raw():
            events.extend(decoder.feed(raw))
            if acted_at is None and sum(e.event == "chunk" for e in events) >= after_chunks:
                act()
                acted_at = len(events)
    assert acted_at is not None
    return events, acted_at
