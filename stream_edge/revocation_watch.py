"""Running streams end within about a second of a revocation.

One task per edge process, not one per stream: each pass reads the revocation keys of
every running stream in a single store round trip and aborts the revoked ones with an
`error` event `revoked`. With 2,000 streams open that is one read a second instead of
2,000, and no watcher task to start and cancel with each stream.
"""

from __future__ import annotations

import asyncio
import logging

from shared.revocations import grant_keys
from stream_edge.state import EdgeState

log = logging.getLogger("llmgw.edge.revocations")

# Revoked streams end within this plus one store read (the issue asks for 2 s).
CHECK_SECONDS = 1.0
# Keys per store read; a pass over many streams takes a few reads.
BATCH_KEYS = 3000


async def watch_revocations(state: EdgeState, interval: float = CHECK_SECONDS) -> None:
    """Check forever; cancelled by the app's lifespan at shutdown."""
    while True:
        await asyncio.sleep(interval)
        try:
            await check_running(state)
        except Exception as exc:  # the store is briefly down: check again next pass
            log.warning("revocation check failed: %s", type(exc).__name__)


async def check_running(state: EdgeState) -> None:
    running = [(stream, stream.grant) for stream in list(state.active)]
    watched = [(stream, grant_keys(grant)) for stream, grant in running if grant is not None]
    if not watched:
        return
    per_stream = len(watched[0][1])
    batch = max(1, BATCH_KEYS // per_stream)
    for start in range(0, len(watched), batch):
        group = watched[start : start + batch]
        values = await state.store.get_many([key for _, keys in group for key in keys])
        for index, (stream, _) in enumerate(group):
            flags = values[index * per_stream : (index + 1) * per_stream]
            if any(value is not None for value in flags):
                stream.revoke()
