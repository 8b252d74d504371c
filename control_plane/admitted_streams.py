"""Streams an edge admitted and never checkpointed: their edge died in between.

An edge's admission (`Store.admit`, one script) marks the token used and takes the
stream's slots; the stream's heartbeat (`shared.checkpoints`) starts after the
admission's reply, when the stream opens (`stream_edge.jobs.StreamJob.open`). An
edge killed between the two (a round trip, longer on a busy event loop) leaves a
spent token, its slots taken and no checkpoint: the silence sweep saw nothing to
watch, so the hold waited for its deadline (~20 minutes) and the slots for their
expiry (15 minutes), while the client's retry was refused `token_used`.

The token's used mark stands in for the missing checkpoint: a checkpoint of no
usage (nothing was asked of the backend before the heartbeat starts), whose marker
is the mark itself. It never changes, so the silence watch finds it silent after
the same limit as a dead edge's last checkpoint, and the sweeper settles it the same
way (nothing billed: failed before its first token), revokes it and frees its slots.
A stream that is alive writes its first checkpoint within a heartbeat, which then
replaces this one; an admission taken back (`unadmit`) deletes the mark."""

from __future__ import annotations

from collections.abc import Sequence

from control_plane.pending_inits import used_key
from shared.checkpoints import UsageCheckpoint
from shared.store import KeyValueStore


def admitted_checkpoint(reservation_id: str, jti: str, used_mark: bytes) -> UsageCheckpoint:
    """The checkpoint a stream admitted under `used_mark` would have written first."""
    return UsageCheckpoint(
        jti=jti,
        reservation_id=reservation_id,
        input_tokens=0,
        output_tokens=0,
        updated_at="admitted " + used_mark.decode("utf-8", "replace"),
    )


async def admitted_without_checkpoint(
    store: KeyValueStore, holds: Sequence[tuple[str, str, str]]
) -> dict[str, UsageCheckpoint]:
    """Of `holds` ((reservation id, company id, jti), none of them checkpointed), those
    whose token an edge admitted, by reservation id: one read of the store."""
    if not holds:
        return {}
    marks = await store.get_many([used_key(company, jti) for _, company, jti in holds])
    return {
        rid: admitted_checkpoint(rid, jti, mark)
        for (rid, _, jti), mark in zip(holds, marks, strict=True)
        if mark is not None
    }
