"""Running streams end within about a second of a revocation (or of the retirement
of the key that signed their token), and connections to a resumable stream within
about a second of a reconnect that superseded them.

One task per edge process, not one per stream: each pass reads the revocation keys of
every running stream — and, for EventSource connections, the key naming the stream's
live connection (see resume.py) — in a single store round trip; it aborts the revoked
streams with an `error` event `revoked` and detaches the superseded connections. With
2,000 streams open that is one read a second instead of 2,000, and no watcher task to
start and cancel with each stream.

Each pass also reads the signing keys a platform admin retired
(`shared.revocations.RETIRED_SIGNING_KEYS`, one read): new tokens they signed are
refused from then on, where the JWKS cache would have kept them up to 5 minutes.
"""

from __future__ import annotations

import asyncio
import logging

from shared.revocations import grant_keys, retired_signing_keys
from stream_edge.state import EdgeState, RunningStream

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
            await check_pass(state)
        except Exception as exc:  # the store is briefly down: check again next pass
            log.warning("revocation check failed: %s", type(exc).__name__)


async def check_pass(state: EdgeState) -> None:
    """One pass: the retired signing keys, then the running streams."""
    retired = await retired_signing_keys(state.store)
    state.grants.retire(retired)
    await check_running(state, retired)


async def check_running(state: EdgeState, retired: frozenset[str] = frozenset()) -> None:
    watched: list[tuple[RunningStream, list[str]]] = []
    for stream in [*state.active, *state.answering]:
        if stream.grant is not None and stream.grant.kid in retired:
            stream.revoke()
            continue
        keys = grant_keys(stream.grant) if stream.grant is not None else []
        if stream.live is not None:
            keys.append(stream.live[0])
        if keys:
            watched.append((stream, keys))
    start = 0
    while start < len(watched):
        group: list[tuple[RunningStream, list[str]]] = []
        size = 0
        while start < len(watched) and (not group or size + len(watched[start][1]) <= BATCH_KEYS):
            group.append(watched[start])
            size += len(watched[start][1])
            start += 1
        values = iter(await state.store.get_many([key for _, keys in group for key in keys]))
        for stream, keys in group:
            found = [next(values) for _ in keys]
            live = found.pop() if stream.live is not None else None
            if any(value is not None for value in found):
                stream.revoke()
            elif stream.live is not None and superseded(stream.live[1], live):
                stream.supersede()


def superseded(mine: bytes | None, live: bytes | None) -> bool:
    """Whether another connection took the stream over: the first connection (no id)
    yields to any reconnect; a reconnect yields to a later one."""
    return live is not None and live != mine
